"""A pool of jimeng accounts (JIMENG_API_KEY with several keys): a dead or empty account is set aside after at
most one failed call, its prompts go to the others without losing an attempt, and the queue pauses only when
no account is left, lifting that pause by itself when one comes back."""

from __future__ import annotations

import json
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
from loguru import logger
from pydantic import SecretStr

from imagegen.clients.jimeng import AccountRoutes
from imagegen.errors import FailureKind, JimengError
from imagegen.queue.accounts import COOL_AFTER, AccountPool, AccountState, accounts_of
from imagegen.queue.keys import RedisKeys
from imagegen.worker.credits import CreditWatch

from .conftest import JIMENG_KEY, RecordFactory, Stack, queue_state, run_cli, wait_for_records
from .test_pipeline import enqueue, wait_until, worker_running
from .test_spend import FakeClock, spend_of
from .test_web_api import open_api

SECOND_KEY = "pool-key-second-0a1b"
THIRD_KEY = "pool-key-third-9z8y"
POOL = f"{JIMENG_KEY}, {SECOND_KEY},{THIRD_KEY},{SECOND_KEY}"  # spaces and a repeat, as people write them
SHANGHAI = ZoneInfo("Asia/Shanghai")


def test_the_keys_are_split_trimmed_and_deduplicated_and_each_is_a_secret(stack: Stack):
    settings = stack.settings(jimeng_api_key=POOL)
    assert [key.get_secret_value() for key in settings.jimeng_keys()] == [JIMENG_KEY, SECOND_KEY, THIRD_KEY]
    assert {JIMENG_KEY, SECOND_KEY, THIRD_KEY} <= set(settings.secrets())
    labels = [account.label for account in accounts_of(settings.jimeng_keys())]
    assert labels == ["key 1 of 3 (…77c1)", "key 2 of 3 (…0a1b)", "key 3 of 3 (…9z8y)"]


@pytest.mark.timeout(240)
async def test_an_expiring_and_an_emptied_account_cost_no_prompt_and_no_attempt(
    stack: Stack, records: RecordFactory, pocketbase, redis_client
):
    sandbox = stack.jimeng.sandbox
    sandbox.add_account(SECOND_KEY, credits=10)  # runs out after ten calls
    sandbox.add_account(THIRD_KEY)
    generations = 0

    def expire_the_third_after_twenty(prompt: str) -> None:
        nonlocal generations
        generations += 1
        if generations == 20:
            sandbox.expire_key(THIRD_KEY)

    sandbox.on_generation = expire_the_third_after_twenty
    # One call at a time per account: a call on an account starts only after its previous one returned.
    settings = stack.settings(jimeng_api_key=POOL, jimeng_account_concurrency=1, queue_concurrency=5)
    created = await records.many(100, prefix="a pooled orchard")
    await enqueue(settings, *[r.id for r in created])
    async with worker_running(settings) as worker:
        finished = await wait_for_records(pocketbase, [r.id for r in created], deadline=180)
        worker_metrics = worker.ctx["services"].metrics
    assert [r.status for r in finished] == ["done"] * 100
    assert all(r.image_url and not r.error for r in finished)
    # Each prompt paid once: no prompt's images were generated twice.
    assert [sandbox.generations(r.prompt) for r in created] == [1] * 100
    calls = sandbox.calls_by_key()
    # The emptied account: its ten calls, then one -2009; the expired one: at most one -2002 after it expired.
    assert calls[SECOND_KEY] == 11
    third_images = calls[THIRD_KEY] - 1
    assert third_images >= 1 and calls[JIMENG_KEY] + 10 + third_images == 100
    assert await queue_state(settings, redis_client).paused() is None

    # Each account's calls in the worker's metrics, under its fingerprint.
    rendered = worker_metrics.render().decode()
    second = accounts_of(settings.jimeng_keys())[1].fingerprint
    assert f'imagegen_provider_calls_total{{account="{second}",provider="jimeng",result="images"}} 10.0' in rendered
    assert f'imagegen_provider_calls_total{{account="{second}",provider="jimeng",result="failed"}} 1.0' in rendered

    result = run_cli(stack, "status", "--json", JIMENG_API_KEY=POOL)
    accounts = {a["account"]: a for a in json.loads(result.stdout)["accounts"]}
    assert accounts["key 1 of 3 (…77c1)"]["state"] == "healthy"
    assert accounts["key 2 of 3 (…0a1b)"]["state"] == "out of credits"
    assert "(ret 5000)" in accounts["key 2 of 3 (…0a1b)"]["reason"]
    assert accounts["key 3 of 3 (…9z8y)"]["state"] == "expired"
    assert accounts["key 2 of 3 (…0a1b)"]["calls_today"] == 11
    text = run_cli(stack, "accounts", JIMENG_API_KEY=POOL).stdout
    assert "3 jimeng keys: 1 healthy, 1 out of credits, 1 expired" in text
    assert all(key not in result.stdout + text for key in (JIMENG_KEY, SECOND_KEY, THIRD_KEY))


@pytest.mark.timeout(180)
async def test_with_every_account_out_of_credits_the_queue_pauses_and_resumes_when_the_day_turns(
    stack: Stack, records: RecordFactory, pocketbase, redis_client
):
    sandbox = stack.jimeng.sandbox
    sandbox.set_credits(JIMENG_KEY, 0)
    sandbox.add_account(SECOND_KEY, credits=0)
    two = f"{JIMENG_KEY},{SECOND_KEY}"
    settings = stack.settings(
        jimeng_api_key=two, jimeng_daily_limit_tz="Asia/Shanghai", queue_concurrency=1, worker_lease=2
    )
    clock = FakeClock(datetime(2026, 11, 28, 22, 0, tzinfo=SHANGHAI))
    [record] = [await records.create("a harbour before dawn")]
    await enqueue(settings, record.id)
    state = queue_state(settings, redis_client)
    async with worker_running(settings, clock):
        paused = await wait_until(state.paused)
        assert paused is not None and paused.source == "accounts"
        assert "no jimeng account can take a call" in paused.reason
        assert "key 1 of 2 (…77c1) out of credits until" in paused.reason
        assert "key 2 of 2 (…0a1b) out of credits until" in paused.reason
        assert paused.until == datetime(2026, 11, 29, tzinfo=SHANGHAI).timestamp()
        assert sandbox.calls_by_key() == {JIMENG_KEY: 1, SECOND_KEY: 1}
        waiting = await pocketbase.get_record(record.id)
        assert waiting.status != "failed"

        # Midnight in Shanghai: the credits are back and so is the queue, with no one resuming it.
        sandbox.set_credits(JIMENG_KEY, 5)
        sandbox.set_credits(SECOND_KEY, 5)
        clock.set(datetime(2026, 11, 29, 0, 0, 1, tzinfo=SHANGHAI))
        [done] = await wait_for_records(pocketbase, [record.id], deadline=60)
    assert done.status == "done" and done.image_url
    assert await state.paused() is None
    assert sandbox.generations(record.prompt) == 1
    assert sum(sandbox.calls_by_key().values()) == 3


async def test_a_worker_started_with_a_replaced_key_lifts_the_accounts_pause(
    stack: Stack, records: RecordFactory, pocketbase, redis_client
):
    sandbox = stack.jimeng.sandbox
    sandbox.expire_key(JIMENG_KEY)
    expired = stack.settings(queue_concurrency=1)
    record = await records.create("a lantern in the rain")
    await enqueue(expired, record.id)
    state = queue_state(expired, redis_client)
    async with worker_running(expired):
        paused = await wait_until(state.paused)
        assert paused is not None and paused.source == "accounts" and paused.until == 0
        assert "key 1 of 1 (…77c1) expired: replace its session id in JIMENG_API_KEY" in paused.reason
    # The operator replaces the session id and restarts: the new key is a new account.
    sandbox.add_account(SECOND_KEY)
    async with worker_running(stack.settings(jimeng_api_key=SECOND_KEY)):
        [done] = await wait_for_records(pocketbase, [record.id], deadline=60)
    assert done.status == "done"
    assert await state.paused() is None
    assert sandbox.generations(record.prompt) == 1


async def test_check_names_each_dead_key_without_showing_it(stack: Stack):
    stack.jimeng.sandbox.add_account(SECOND_KEY)
    stack.jimeng.sandbox.add_account(THIRD_KEY)
    stack.jimeng.sandbox.expire_key(THIRD_KEY)
    pool = f"{JIMENG_KEY},{SECOND_KEY},{THIRD_KEY}"
    result = run_cli(stack, "check", JIMENG_API_KEY=pool)
    assert result.returncode == 3
    line = next(line for line in result.stdout.splitlines() if line.startswith("jimeng"))
    assert "key 3 of 3 (…9z8y) is dead: replace the expired session id in JIMENG_API_KEY" in line
    assert "2 of 3 keys live" in line
    assert all(key not in result.stdout + result.stderr for key in (JIMENG_KEY, SECOND_KEY, THIRD_KEY))
    stack.jimeng.sandbox.add_account(THIRD_KEY)
    healthy = run_cli(stack, "check", JIMENG_API_KEY=pool)
    assert healthy.returncode == 0, healthy.stdout
    assert "3 of 3 keys live" in healthy.stdout


async def test_transient_failures_in_a_row_cool_an_account_and_a_success_ends_the_streak(stack: Stack, redis_client):
    settings = stack.settings(jimeng_api_key=f"{JIMENG_KEY},{SECOND_KEY}")
    clock = FakeClock(datetime(2026, 11, 28, 12, 0, tzinfo=SHANGHAI))
    spend = spend_of(settings, redis_client, clock)
    pool = AccountPool(redis_client, RedisKeys(settings.queue_name), accounts_of(settings.jimeng_keys()), spend)
    first, second = pool.accounts
    timeout = JimengError("no answer within JIMENG_TIMEOUT (600 s)", kind=FailureKind.TRANSIENT)
    for _ in range(COOL_AFTER - 1):
        assert await pool.failed(first, timeout) is None
    assert await pool.take("run-a", wait=0) is first  # still usable: fewest in flight, first in order
    await pool.release(first, "run-a", images=True)  # a success ends the streak
    for _ in range(COOL_AFTER - 1):
        assert await pool.failed(first, timeout) is None
    assert await pool.failed(first, timeout) is AccountState.COOLING
    health = {h.account.index: h for h in await pool.health()}
    assert health[1].state is AccountState.COOLING and health[1].until == clock() + 30
    assert await pool.take("run-b", wait=0) is second
    clock.now += 31
    assert await pool.take("run-c", wait=0) is first  # cooled down: back, and it has fewer calls in flight
    moderated = JimengError("blocked", kind=FailureKind.PERMANENT, code=-2006, moderated=True)
    assert await pool.failed(second, moderated) is None  # the prompt's fault, not the account's
    shown = json.dumps([h.to_json() for h in await pool.health()])
    assert all(secret not in shown for secret in (JIMENG_KEY, SECOND_KEY))


def test_a_key_is_known_by_a_fingerprint_so_a_replaced_key_is_a_new_account():
    old, new = accounts_of([SecretStr("session-a-1234")]), accounts_of([SecretStr("session-b-1234")])
    assert old[0].fingerprint != new[0].fingerprint and old[0].label == new[0].label


async def test_credits_seen_back_or_claimed_return_an_emptied_account_and_lift_the_pause(
    stack: Stack, sandbox_config, redis_client, http
):
    sandbox = stack.jimeng.sandbox
    settings = stack.settings(jimeng_api_key=f"{JIMENG_KEY},{SECOND_KEY}")
    sandbox.add_account(SECOND_KEY, credits=0)
    sandbox.set_credits(JIMENG_KEY, 0)
    clock = FakeClock(datetime(2026, 11, 28, 12, 0, tzinfo=SHANGHAI))
    pool = AccountPool(
        redis_client,
        RedisKeys(settings.queue_name),
        accounts_of(settings.jimeng_keys()),
        spend_of(settings, redis_client, clock),
    )
    state = queue_state(settings, redis_client)
    empty = JimengError("error -2009: out of credits", kind=FailureKind.ACCOUNT, code=-2009)
    for account in pool.accounts:
        assert await pool.failed(account, empty) is AccountState.NO_CREDITS
    unavailable = await pool.unavailable()
    await state.pause(str(unavailable), source="accounts", until=unavailable.until)
    routes = AccountRoutes(http, settings)
    watch = CreditWatch(redis_client, pool, routes, state, clock, claim_daily=False)

    await watch.step()  # nothing came back: the pause stays
    assert (await state.paused()) is not None
    sandbox.set_credits(SECOND_KEY, 3)  # bought: /token/points shows them
    await watch.step()
    states = [h.state for h in await pool.health()]
    assert states == [AccountState.NO_CREDITS, AccountState.HEALTHY]
    assert await state.paused() is None

    # With JIMENG_CLAIM_DAILY the day's free credits are claimed, once a day for each account.
    sandbox_config.daily_credits = 4
    claiming = CreditWatch(redis_client, pool, routes, state, clock, claim_daily=True)
    await claiming.step()
    assert [sandbox.credits_of(JIMENG_KEY), sandbox.credits_of(SECOND_KEY)] == [4, 4]
    assert [h.state for h in await pool.health()] == [AccountState.HEALTHY, AccountState.HEALTHY]
    sandbox.set_credits(JIMENG_KEY, 0)
    await claiming.step()
    assert sandbox.credits_of(JIMENG_KEY) == 0  # claimed today already: not again

    result = run_cli(stack, "accounts", "--json", JIMENG_API_KEY=f"{JIMENG_KEY},{SECOND_KEY}")
    assert [a["credits"] for a in json.loads(result.stdout)["accounts"]] == [0, 4]


async def test_the_api_lists_the_accounts_without_their_keys(stack: Stack, redis_client):
    settings = stack.settings(jimeng_api_key=POOL)
    pool = AccountPool(
        redis_client,
        RedisKeys(settings.queue_name),
        accounts_of(settings.jimeng_keys()),
        spend_of(settings, redis_client),
    )
    expired = JimengError("error -2002: the API key's session has expired", kind=FailureKind.ACCOUNT, code=-2002)
    await pool.failed(pool.accounts[2], expired)
    async with open_api(stack, jimeng_api_key=POOL) as api:
        status, body = await api.call("GET", "/api/accounts")
    assert status == 200
    assert [(a["account"], a["state"]) for a in body["accounts"]] == [
        ("key 1 of 3 (…77c1)", "healthy"),
        ("key 2 of 3 (…0a1b)", "healthy"),
        ("key 3 of 3 (…9z8y)", "expired"),
    ]
    assert all(key not in json.dumps(body) for key in (JIMENG_KEY, SECOND_KEY, THIRD_KEY))


async def test_generate_takes_a_usable_account_and_calls_nothing_when_none_is(stack: Stack, redis_client):
    sandbox = stack.jimeng.sandbox
    sandbox.add_account(SECOND_KEY)
    two = f"{JIMENG_KEY},{SECOND_KEY}"
    settings = stack.settings(jimeng_api_key=two)
    spend = spend_of(settings, redis_client)
    pool = AccountPool(redis_client, RedisKeys(settings.queue_name), accounts_of(settings.jimeng_keys()), spend)
    empty = JimengError("error -2009: out of credits", kind=FailureKind.ACCOUNT, code=-2009)
    await pool.failed(pool.accounts[0], empty)
    made = run_cli(stack, "generate", "a paper boat", JIMENG_API_KEY=two)
    assert made.returncode == 0, made.stderr
    assert sandbox.calls_by_key() == {JIMENG_KEY: 0, SECOND_KEY: 1}

    await pool.failed(pool.accounts[1], empty)
    refused = run_cli(stack, "generate", "a paper boat", JIMENG_API_KEY=two)
    assert refused.returncode == 3
    assert refused.stderr.startswith("imagegen: no jimeng account can take a call: key 1 of 2 (…77c1) out of credits")
    assert "Traceback" not in refused.stderr
    assert sandbox.calls_by_key() == {JIMENG_KEY: 0, SECOND_KEY: 1}
    [day] = await spend.days(1)
    assert (day.calls, day.reserved) == (1, 0)


async def test_an_account_back_in_service_is_logged_once(stack: Stack, redis_client, http):
    settings = stack.settings(jimeng_api_key=f"{JIMENG_KEY},{SECOND_KEY}")
    clock = FakeClock(datetime(2026, 11, 28, 12, 0, tzinfo=SHANGHAI))
    spend = spend_of(settings, redis_client, clock)
    pool = AccountPool(redis_client, RedisKeys(settings.queue_name), accounts_of(settings.jimeng_keys()), spend)
    state = queue_state(settings, redis_client)
    watch = CreditWatch(redis_client, pool, AccountRoutes(http, settings), state, clock, claim_daily=False)
    refused = JimengError("HTTP 403: the API refused the key", kind=FailureKind.ACCOUNT, status=403)
    assert await pool.failed(pool.accounts[1], refused) is AccountState.REFUSED
    lines: list[str] = []
    sink = logger.add(lines.append, format="{message}")
    try:
        await watch.step()
        clock.now += 3601
        await watch.step()
        await watch.step()
    finally:
        logger.remove(sink)
    back = [line for line in lines if "back in service" in line]
    assert back == ["jimeng key 2 of 2 (…0a1b): back in service (healthy)\n"]
