"""Spend accounting and the daily limit (JIMENG_DAILY_LIMIT), against the real services: calls counted by day
and outcome, a limit no number of workers exceeds, its pause lifted by the day turning (on an injected clock),
reservations given back when no call was made, and `imagegen generate` counted and refused alike."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from pydantic import SecretStr

from imagegen.dev.localstack import free_port
from imagegen.errors import DailyLimitReached
from imagegen.models import RecordStatus
from imagegen.queue.accounts import fingerprint
from imagegen.queue.keys import RedisKeys
from imagegen.queue.permits import CallPermits
from imagegen.queue.spend import CallOutcome, Spend
from imagegen.queue.state import QueueState
from imagegen.settings import Settings

from .conftest import JIMENG_KEY, RecordFactory, Stack, after_target, queue_state, run_cli, wait_for_records
from .test_generate import assert_error_line
from .test_pipeline import enqueue, run_queue, wait_until, worker_running

SHANGHAI = ZoneInfo("Asia/Shanghai")
FP = fingerprint(SecretStr(JIMENG_KEY))  # the test key's account, as spend names it


class FakeClock:
    """Epoch seconds that move only when a test says so."""

    def __init__(self, start: datetime) -> None:
        self.now = start.timestamp()

    def __call__(self) -> float:
        return self.now

    def set(self, moment: datetime) -> None:
        self.now = moment.timestamp()


def spend_of(settings: Settings, redis_client, clock=None) -> Spend:
    zone = settings.daily_limit_zone
    return Spend(redis_client, RedisKeys(settings.queue_name), settings.daily_limits(), zone, clock or _now)


def _now() -> float:
    return datetime.now().timestamp()


async def _parked(state: QueueState) -> bool:
    """No live worker runs a job, and jobs wait for a resume."""
    workers = await state.workers()
    return bool(workers) and not any(w.running for w in workers) and any(w.waiting for w in workers)


@pytest.mark.timeout(180)
async def test_the_daily_limit_stops_at_exactly_n_calls_across_three_workers(
    stack: Stack, records: RecordFactory, pocketbase, redis_client, start_worker, sandbox_config
):
    limit = 5
    created = await records.many(12, prefix="a limited lighthouse")
    sandbox_config.latency = 0.3  # calls overlap across the workers
    env = {"JIMENG_DAILY_LIMIT": str(limit), "QUEUE_CONCURRENCY": "2", "WORKER_LEASE": "4"}
    workers = [start_worker(**env) for _ in range(3)]
    settings = stack.settings(jimeng_daily_limit=limit)
    state = queue_state(settings, redis_client)
    assert run_cli(stack, "add-pending").returncode == 0

    paused = await wait_until(state.paused, deadline=90)
    assert paused is not None and paused.source == "limit"
    today = datetime.now(ZoneInfo("UTC")).date().isoformat()
    assert paused.reason == (
        f"daily limit of {limit} jimeng calls reached for {today} (JIMENG_DAILY_LIMIT); resumes at 00:00 UTC"
    )
    assert await wait_until(lambda: _parked(state), deadline=60)

    assert stack.jimeng.sandbox.stats()["total_calls"] == limit
    found = [await pocketbase.get_record(r.id) for r in created]
    statuses = [r.status or "pending" for r in found]  # an empty status reads as pending
    assert statuses.count(RecordStatus.DONE.value) == limit
    assert RecordStatus.FAILED.value not in statuses
    assert set(statuses) - {"done"} <= {"pending", "queued"}, statuses
    status = json.loads(run_cli(stack, "status", "--json", JIMENG_DAILY_LIMIT=str(limit)).stdout)
    assert status["paused"]["source"] == "limit"
    counts = {"calls": limit, "images": limit, "moderated": 0, "failed": 0, "reserved": 0}
    [jimeng, ark] = status["spend"].pop("providers")
    assert status["spend"] == {"day": today, "timezone": "UTC", "limit": limit, **counts}
    assert jimeng == {"provider": "jimeng", "limit": limit, **counts, "accounts": [{"account": FP, **counts}]}
    assert ark == {"provider": "ark", "limit": None, **dict.fromkeys(counts, 0), "accounts": []}
    text = run_cli(stack, "status", JIMENG_DAILY_LIMIT=str(limit)).stdout
    assert f"spend:     {limit} jimeng calls today ({today} UTC) of {limit} a day (JIMENG_DAILY_LIMIT)" in text

    # Stopping sends the parked jobs back: nothing was reserved for them, nothing is left reserved.
    for worker in workers:
        assert worker.stop() == 0
    [day] = await spend_of(settings, redis_client).days(1)
    assert (day.calls, day.reserved) == (limit, 0)
    assert stack.jimeng.sandbox.stats()["total_calls"] == limit
    assert all(r.status != "failed" for r in [await pocketbase.get_record(r.id) for r in created])


async def test_the_limit_pause_lifts_by_itself_when_the_day_turns_and_a_manual_pause_does_not(
    stack: Stack, records: RecordFactory, pocketbase, redis_client
):
    settings = stack.settings(
        jimeng_daily_limit=2, jimeng_daily_limit_tz="Asia/Shanghai", queue_concurrency=1, worker_lease=2
    )
    clock = FakeClock(datetime(2026, 11, 28, 23, 58, tzinfo=SHANGHAI))
    created = await records.many(4, prefix="a midnight harbour")
    await enqueue(settings, *[r.id for r in created])
    state = queue_state(settings, redis_client)
    spend = spend_of(settings, redis_client, clock)
    async with worker_running(settings, clock):
        paused = await wait_until(state.paused)
        assert paused is not None and paused.source == "limit"
        assert "reached for 2026-11-28" in paused.reason and "resumes at 00:00 Asia/Shanghai" in paused.reason
        assert paused.until == datetime(2026, 11, 29, tzinfo=SHANGHAI).timestamp()
        assert await wait_until(lambda: _parked(state))
        assert stack.jimeng.sandbox.stats()["total_calls"] == 2

        clock.set(datetime(2026, 11, 29, 0, 0, 1, tzinfo=SHANGHAI))
        finished = await wait_for_records(pocketbase, [r.id for r in created], deadline=60)
        assert [r.status for r in finished] == ["done"] * 4
        assert await state.paused() is None
        assert stack.jimeng.sandbox.stats()["total_calls"] == 4
        days = await spend.days(2)
        assert [(d.day, d.images, d.reserved) for d in days] == [(date(2026, 11, 29), 2, 0), (date(2026, 11, 28), 2, 0)]

        # The day turns again: an operator's pause stays (so would an automatic or outage one).
        await state.pause("maintenance")
        clock.set(datetime(2026, 11, 30, 0, 0, 1, tzinfo=SHANGHAI))
        turned = _now() + 0.1
        assert await wait_until(lambda: _heartbeats_after(state, turned), deadline=10)
        still = await state.paused()
        assert still is not None and still.source == "manual"
    for source in ("manual", "auto", "outage"):
        await state.resume()
        await state.pause("not by the day", source=source)
        assert not await state.lift_limit_pause(clock() + 10 * 24 * 3600)
    await state.resume()
    await state.pause("limit", source="limit", until=clock() + 60)
    assert not await state.lift_limit_pause(clock())
    assert await state.lift_limit_pause(clock() + 60)


async def _heartbeats_after(state: QueueState, moment: float) -> bool:
    workers = await state.workers()
    return bool(workers) and all(w.seen > moment for w in workers)


async def test_calls_are_counted_by_outcome_and_shown_by_spend_and_status(
    stack: Stack, records: RecordFactory, redis_client
):
    settings = stack.settings(queue_attempts=1)
    prompts = {
        "a plain harbour": "done",
        "a refused harbour [[jimeng:-2006]]": "moderated",
        "a refused harbour again [[jimeng:-2007-2038]]": "moderated",
        "a harbour behind a bad gateway [[jimeng:http-502]]": "failed",
        "a harbour on a dropped line [[jimeng:drop]]": "failed",
    }
    created = [await records.create(prompt) for prompt in prompts]
    await enqueue(settings, *[r.id for r in created])
    await run_queue(settings)
    assert stack.jimeng.sandbox.stats()["total_calls"] == 5

    result = run_cli(stack, "spend", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    today = datetime.now(ZoneInfo("UTC")).date()
    assert report["timezone"] == "UTC" and report["limit"] is None
    assert report["limits"] == {"jimeng": None, "ark": None}
    assert len(report["days"]) == 7
    counts = {"calls": 5, "images": 1, "moderated": 2, "failed": 2, "reserved": 0}
    assert report["days"][0] == {
        "day": today.isoformat(),
        **counts,
        "providers": [
            {"provider": "jimeng", "limit": None, **counts, "accounts": [{"account": FP, **counts}]},
            {"provider": "ark", "limit": None, **dict.fromkeys(counts, 0), "accounts": []},
        ],
    }
    assert all(day["calls"] == 0 for day in report["days"][1:])
    zero = dict.fromkeys(counts, 0)
    assert report["total"] == {**counts, "providers": {"jimeng": counts, "ark": zero}}

    text = run_cli(stack, "spend", "--days", "2")
    assert text.returncode == 0, text.stderr
    lines = after_target(stack, text).splitlines()
    assert [line.split() for line in lines] == [
        ["day", "calls", "images", "moderated", "failed", "reserved"],
        [today.isoformat(), "5", "1", "2", "2", "0"],
        ["jimeng", "5", "1", "2", "2", "0"],
        [FP, "5", "1", "2", "2", "0"],
        [(today - timedelta(days=1)).isoformat(), "0", "0", "0", "0", "0"],
        ["total", "5", "1", "2", "2", "0"],
        ["jimeng", "5", "1", "2", "2", "0"],
        ["days", "in", "UTC;", "no", "JIMENG_DAILY_LIMIT,", "no", "ARK_DAILY_LIMIT"],
    ]

    status = json.loads(run_cli(stack, "status", "--json").stdout)
    assert status["spend"]["calls"] == 5 and status["spend"]["limit"] is None
    shown = run_cli(stack, "status").stdout
    assert f"spend:     5 jimeng calls today ({today.isoformat()} UTC) (no JIMENG_DAILY_LIMIT): 1 images" in shown
    assert f"  {FP}  5 calls: 1 images, 2 moderated, 2 failed" in shown
    assert "ark calls today" not in shown  # not a provider here, and no calls
    # The counts expire by themselves, long after any report needs them.
    ttl = await redis_client.ttl(RedisKeys(settings.queue_name).spend(today.isoformat(), "jimeng"))
    assert 399 * 24 * 3600 < ttl <= 400 * 24 * 3600


async def test_a_call_that_never_left_counts_nothing_and_gives_its_reservation_back(
    stack: Stack, records: RecordFactory, pocketbase, redis_client
):
    settings = stack.settings(jimeng_daily_limit=1, queue_attempts=1)
    dead = stack.settings(jimeng_daily_limit=1, queue_attempts=1, jimeng_api_url=f"http://127.0.0.1:{free_port()}/v1")
    refused = await records.create("a harbour nobody answers")
    await enqueue(dead, refused.id)
    await run_queue(dead)
    failed = await pocketbase.get_record(refused.id)
    assert failed.status == "failed" and "could not connect" in failed.error
    spend = spend_of(settings, redis_client)
    today = await spend.today()
    assert (today.calls, today.reserved) == (0, 0)

    # The one call of the day is still there to make, and then there is none.
    first, second = await records.create("a harbour at noon"), await records.create("a harbour at dusk")
    await enqueue(settings, first.id)
    await run_queue(settings)
    assert (await pocketbase.get_record(first.id)).status == "done"
    await enqueue(settings, second.id)
    async with worker_running(settings):
        paused = await wait_until(queue_state(settings, redis_client).paused)
        assert paused is not None and paused.source == "limit"
    assert (await pocketbase.get_record(second.id)).status in ("", "pending", "queued")
    assert stack.jimeng.sandbox.stats()["total_calls"] == 1
    today = await spend.today()
    assert (today.calls, today.images, today.reserved) == (1, 1, 0)


async def test_reservations_never_pass_the_limit_and_are_released_when_no_call_follows(stack: Stack, redis_client):
    settings = stack.settings(jimeng_daily_limit=5)
    keys = RedisKeys(settings.queue_name)
    spend = spend_of(settings, redis_client)
    permits = CallPermits(redis_client, keys, 0, 0, 10, spend)

    async def try_one(n: int):
        try:
            return await permits.take(f"token-{n}", 0)
        except DailyLimitReached:
            return None

    taken = [r for r in await asyncio.gather(*(try_one(n) for n in range(20))) if r is not None]
    assert len(taken) == 5
    assert (await spend.today()).reserved == 5
    # Two calls made, three runs stopped before theirs.
    for reservation, outcome in zip(taken, [CallOutcome.IMAGES, CallOutcome.FAILED, None, None, None], strict=True):
        await permits.finish(reservation, outcome)
    today = await spend.today()
    assert (today.calls, today.images, today.failed, today.reserved) == (2, 1, 1, 0)
    assert await permits.take("token-next", 0) is not None

    # A run cut off during its round trip (the script may have run) holds nothing afterwards.
    before = (await spend.today()).reserved
    cut_off = asyncio.create_task(permits.take("token-cut", 0))
    await asyncio.sleep(0)  # it sends its script and awaits the answer
    cut_off.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cut_off
    _, reserved = spend.day_keys(spend.day(), "jimeng")
    assert not await redis_client.sismember(reserved, "token-cut")
    assert (await spend.today()).reserved == before


async def test_generate_counts_its_call_and_refuses_once_the_limit_is_reached(stack: Stack, redis_client):
    moderated = run_cli(stack, "generate", "a refused kite [[jimeng:-2006]]", JIMENG_DAILY_LIMIT="2")
    assert moderated.returncode == 3
    ok = run_cli(stack, "generate", "a paper kite", JIMENG_DAILY_LIMIT="2")
    assert ok.returncode == 0, ok.stderr
    refused = run_cli(stack, "generate", "one kite too many", JIMENG_DAILY_LIMIT="2")
    assert refused.returncode == 4
    line = assert_error_line(refused.stderr, "daily limit of 2 jimeng calls reached", "no call made")
    assert refused.stderr.strip() == line and refused.stdout == ""
    assert stack.jimeng.sandbox.stats()["total_calls"] == 2
    spend = json.loads(run_cli(stack, "spend", "--json", "--days", "1", JIMENG_DAILY_LIMIT="2").stdout)
    assert spend["limit"] == 2
    counts = {"calls": 2, "images": 1, "moderated": 1, "failed": 0, "reserved": 0}
    [jimeng, _] = spend["days"][0].pop("providers")
    assert spend["days"][0] | {"day": None} == {"day": None, **counts}
    assert jimeng["accounts"] == [{"account": FP, **counts}]
    # A limit that can't be checked is not spent around.
    dead = run_cli(stack, "generate", "a kite without redis", REDIS_PORT=str(free_port()), JIMENG_DAILY_LIMIT="2")
    assert dead.returncode == 3
    assert_error_line(dead.stderr, "JIMENG_DAILY_LIMIT can't be checked")
    assert stack.jimeng.sandbox.stats()["total_calls"] == 2


def test_a_time_zone_that_does_not_exist_is_one_line(stack: Stack):
    result = run_cli(stack, "spend", JIMENG_DAILY_LIMIT_TZ="Mars/Olympus")
    assert result.returncode == 2
    assert_error_line(result.stderr, "JIMENG_DAILY_LIMIT_TZ: must be an IANA time zone name")


async def test_counts_written_before_providers_and_accounts_count_as_jimengs_and_under_its_limit(
    stack: Stack, redis_client
):
    # A deployment upgraded mid-day: the day's counts so far are in the hash older versions wrote.
    settings = stack.settings(jimeng_daily_limit=4, image_providers="jimeng,ark", ark_api_key="ark-key-1234")
    keys = RedisKeys(settings.queue_name)
    spend = spend_of(settings, redis_client)
    await redis_client.hset(f"{keys.prefix}spend:{spend.day().isoformat()}", mapping={"images": 2, "failed": 1})
    permits = CallPermits(redis_client, keys, 0, 0, 10, spend)

    first = await permits.take("token-1", 0, providers=["jimeng", "ark"])
    second = await permits.take("token-2", 0, providers=["jimeng", "ark"])
    assert first is not None and second is not None
    # One place was left under jimeng's limit of four; the next call goes to Ark.
    assert (first.provider, second.provider) == ("jimeng", "ark")
    await permits.finish(dataclasses.replace(first, account=FP), CallOutcome.IMAGES)
    await permits.finish(dataclasses.replace(second, account="0123456789ab"), CallOutcome.IMAGES)
    with pytest.raises(DailyLimitReached, match="daily limit of 4 jimeng calls reached"):
        await permits.take("token-3", 0)

    today = await spend.today()
    jimeng, ark = today.providers
    assert (today.calls, jimeng.calls, jimeng.images, jimeng.failed, ark.calls) == (5, 4, 3, 1, 1)
    assert [(a.account, a.calls) for a in jimeng.accounts] == [(FP, 1), ("", 3)]
    assert [(a.account, a.calls) for a in ark.accounts] == [("0123456789ab", 1)]
    text = run_cli(stack, "spend", "--days", "1", JIMENG_DAILY_LIMIT="4").stdout
    assert "(no account recorded)" in text


async def test_a_reservation_moved_to_the_next_provider_keeps_its_permit_and_leaves_no_place_behind(
    stack: Stack, redis_client
):
    # A call reserved under jimeng whose pool turns out to have no usable account goes to Ark.
    settings = stack.settings(
        jimeng_daily_limit=3, ark_daily_limit=1, image_providers="jimeng,ark", ark_api_key="ark-key-1234"
    )
    spend = spend_of(settings, redis_client)
    permits = CallPermits(redis_client, RedisKeys(settings.queue_name), 2, 0, 10, spend)

    async def reserved() -> tuple[int, int]:
        jimeng, ark = (await spend.today()).providers
        return jimeng.reserved, ark.reserved

    first = await permits.take("token-1", 0, providers=["jimeng", "ark"])
    assert first is not None and first.provider == "jimeng" and await reserved() == (1, 0)
    moved = await permits.move(first, ["ark"])
    assert moved.provider == "ark" and await reserved() == (0, 1)
    assert await permits.in_use() == 1  # its permit stays with it

    second = await permits.take("token-2", 0, providers=["jimeng", "ark"])
    assert second is not None
    with pytest.raises(DailyLimitReached, match=r"daily limit of 1 ark calls reached .* \(ARK_DAILY_LIMIT\)"):
        await permits.move(second, ["ark"])
    assert await reserved() == (0, 1)
    await permits.finish(moved, CallOutcome.IMAGES)
    await permits.finish(second, None)
    assert await reserved() == (0, 0) and await permits.in_use() == 0
    jimeng, ark = (await spend.today()).providers
    assert (jimeng.calls, ark.calls) == (0, 1)
