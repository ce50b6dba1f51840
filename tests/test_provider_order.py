"""Providers in order (IMAGE_PROVIDERS): with every jimeng account dead the queue goes on through Ark, and Ark's
own answers (links, inline images, groups, partial successes) end as stored images on a done record."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from loguru import logger
from pydantic import SecretStr

from imagegen.clients.download import sniff_image_type
from imagegen.dev.ark_sandbox import ERRORS, ArkSandboxConfig, ArkSandboxThread
from imagegen.errors import ConfigError, FailureKind
from imagegen.queue.accounts import fingerprint
from imagegen.queue.state import PauseInfo
from imagegen.settings import Settings, load_settings

from .conftest import JIMENG_KEY, RecordFactory, Stack, queue_state, run_cli, wait_for_records
from .test_ark import ACCOUNT, PERMANENT, ROWS, TRANSIENT
from .test_pipeline import enqueue, wait_until, worker_running

ARK_KEY = "ark-test-key-5e6f"


@pytest.fixture(scope="module")
def ark() -> Iterator[ArkSandboxThread]:
    with ArkSandboxThread(ArkSandboxConfig(api_key=ARK_KEY)) as running:
        yield running


@pytest.fixture(autouse=True)
def fresh_ark(ark: ArkSandboxThread) -> None:
    ark.sandbox.reset()


def with_ark(stack: Stack, ark: ArkSandboxThread, **more: object) -> Settings:
    values: dict[str, object] = {"image_providers": "jimeng,ark", "ark_api_key": ARK_KEY, "ark_base_url": ark.base_url}
    return stack.settings(**(values | more))


async def stored_types(stack: Stack, urls: list[str], http) -> list[str]:
    found = []
    for url in urls:
        async with http.get(url) as response:
            assert response.status == 200, url
            kind = sniff_image_type((await response.read())[:16])
            found.append(kind.value if kind else "not an image")
    return found


async def test_with_every_jimeng_account_dead_the_prompts_go_to_ark(
    stack: Stack, ark: ArkSandboxThread, records: RecordFactory, pocketbase, redis_client, http
):
    stack.jimeng.sandbox.expire_key(JIMENG_KEY)
    settings = with_ark(stack, ark, queue_concurrency=2, jimeng_account_concurrency=1)
    created = await records.many(6, prefix="a fallback meadow")
    await enqueue(settings, *[r.id for r in created])
    async with worker_running(settings):
        finished = await wait_for_records(pocketbase, [r.id for r in created], deadline=90)
    assert [r.status for r in finished] == ["done"] * 6
    # jimeng: one failed call set its only account aside; Ark made every image, each prompt paid once there.
    assert sum(stack.jimeng.sandbox.calls_by_key().values()) == 1
    assert [ark.sandbox.calls(r.prompt) for r in created] == [1] * 6
    assert await queue_state(settings, redis_client).paused() is None
    for record in finished:
        assert record.images == [record.image_url]
        assert "not an image" not in await stored_types(stack, record.images, http)
        assert record.image_url.startswith(settings.tos_public_base_url)
    body = ark.sandbox.received(created[0].prompt)[0]
    assert body["watermark"] is False and body["response_format"] == "url"


async def test_inline_images_of_a_group_are_stored_one_by_one(
    stack: Stack, ark: ArkSandboxThread, records: RecordFactory, pocketbase, http
):
    settings = with_ark(stack, ark, image_providers="ark", ark_response_format="b64_json", ark_max_images=4)
    record = await records.create("three lanterns [[ark:images=3]]")
    await enqueue(settings, record.id)
    async with worker_running(settings):
        [done] = await wait_for_records(pocketbase, [record.id], deadline=60)
    assert done.status == "done" and len(done.images) == 3
    assert ark.sandbox.calls(record.prompt) == 1
    served = ark.sandbox.served_images(record.prompt)
    for url, original in zip(done.images, served, strict=True):
        async with http.get(url) as response:
            assert await response.read() == original
    assert stack.jimeng.sandbox.stats()["total_calls"] == 0


async def test_a_partial_success_is_done_with_the_delivered_images_and_says_how_many_were_blocked(
    stack: Stack, ark: ArkSandboxThread, records: RecordFactory, pocketbase
):
    settings = with_ark(stack, ark, image_providers="ark", ark_max_images=4)
    record = await records.create("four kites [[ark:images=4]] [[ark:blocked=2]]")
    await enqueue(settings, record.id)
    async with worker_running(settings):
        [done] = await wait_for_records(pocketbase, [record.id], deadline=60)
    assert done.status == "done" and len(done.images) == 3
    # The fake blocks position 2 (counting from 0): the third image.
    assert done.error.startswith("1 of 4 images blocked by content moderation: image 3: OutputImageSensitiveContent")
    assert ark.sandbox.calls(record.prompt) == 1


@pytest.mark.timeout(180)
async def test_each_provider_has_its_own_daily_limit_and_a_spent_one_passes_calls_to_the_next(
    stack: Stack, ark: ArkSandboxThread, records: RecordFactory, pocketbase, redis_client
):
    # Providers in order: jimeng's limit used up, calls go on to Ark (as with no jimeng account left) until
    # Ark's own limit is used up too; only then does the queue pause, until the day turns.
    settings = with_ark(stack, ark, jimeng_daily_limit=2, ark_daily_limit=3, queue_concurrency=1)
    created = await records.many(7, prefix="a budgeted lighthouse")
    await enqueue(settings, *[r.id for r in created])
    state = queue_state(settings, redis_client)

    async def five_done() -> bool:
        found = [await pocketbase.get_record(r.id) for r in created]
        return [r.status for r in found].count("done") == 5

    async with worker_running(settings) as worker:
        paused = await wait_until(state.paused, deadline=90)
        assert await wait_until(five_done, deadline=60)
        rendered = worker.started.metrics.render().decode()
    today = datetime.now(ZoneInfo("UTC")).date().isoformat()
    assert paused is not None and paused.source == "limit"
    assert paused.reason == (
        f"daily limit of 2 jimeng calls reached for {today} (JIMENG_DAILY_LIMIT); daily limit of 3 ark calls "
        f"reached for {today} (ARK_DAILY_LIMIT); resumes at 00:00 UTC"
    )
    assert stack.jimeng.sandbox.stats()["total_calls"] == 2
    assert sum(ark.sandbox.calls(r.prompt) for r in created) == 3
    statuses = [(await pocketbase.get_record(r.id)).status for r in created]
    assert statuses.count("done") == 5 and "failed" not in statuses

    ark_account = fingerprint(SecretStr(ARK_KEY))

    def cli(*args: str) -> str:
        return run_cli(
            stack, *args, IMAGE_PROVIDERS="jimeng,ark", ARK_API_KEY=ARK_KEY, JIMENG_DAILY_LIMIT="2", ARK_DAILY_LIMIT="3"
        ).stdout

    report = json.loads(cli("spend", "--json", "--days", "1"))
    assert report["limits"] == {"jimeng": 2, "ark": 3}
    jimeng, ark_spend = report["days"][0]["providers"]
    assert (jimeng["provider"], jimeng["limit"], jimeng["calls"], jimeng["images"]) == ("jimeng", 2, 2, 2)
    assert [(a["account"], a["calls"]) for a in jimeng["accounts"]] == [(fingerprint(SecretStr(JIMENG_KEY)), 2)]
    assert (ark_spend["provider"], ark_spend["limit"], ark_spend["calls"], ark_spend["images"]) == ("ark", 3, 3, 3)
    assert [(a["account"], a["calls"]) for a in ark_spend["accounts"]] == [(ark_account, 3)]
    assert f'imagegen_provider_calls_total{{account="{ark_account}",provider="ark",result="images"}} 3.0' in rendered
    shown = cli("status")
    assert f"spend:     2 jimeng calls today ({today} UTC) of 2 a day (JIMENG_DAILY_LIMIT)" in shown
    assert f"spend:     3 ark calls today ({today} UTC) of 3 a day (ARK_DAILY_LIMIT)" in shown
    # Ark's key among the accounts, at its cap for the day.
    assert "accounts:  1 jimeng key: 1 healthy; 1 ark key: 1 daily cap reached" in shown
    listed = json.loads(cli("accounts", "--json"))["accounts"]
    assert [(a["provider"], a["fingerprint"], a["state"], a["calls_today"]) for a in listed] == [
        ("jimeng", fingerprint(SecretStr(JIMENG_KEY)), "healthy", 2),
        ("ark", ark_account, "daily cap reached", 3),
    ]
    assert ARK_KEY not in shown and JIMENG_KEY not in shown


async def test_with_no_jimeng_account_left_and_arks_limit_spent_the_queue_pauses_on_both(
    stack: Stack, ark: ArkSandboxThread, records: RecordFactory, pocketbase, redis_client
):
    stack.jimeng.sandbox.expire_key(JIMENG_KEY)
    settings = with_ark(stack, ark, ark_daily_limit=1, queue_concurrency=1)
    created = await records.many(3, prefix="a stranded lighthouse")
    await enqueue(settings, *[r.id for r in created])
    state = queue_state(settings, redis_client)
    async with worker_running(settings):
        paused = await wait_until(state.paused, deadline=60)
    assert paused is not None and paused.source == "accounts"
    assert paused.reason.startswith("no jimeng account can take a call: key 1 of 1 (…77c1) expired")
    assert "daily limit of 1 ark calls reached" in paused.reason
    # Back at the next midnight, when Ark's day starts again (the expired key only comes back replaced).
    assert (
        paused.until
        == datetime.combine(
            datetime.now(ZoneInfo("UTC")).date() + timedelta(days=1), datetime.min.time(), tzinfo=ZoneInfo("UTC")
        ).timestamp()
    )
    assert sum(stack.jimeng.sandbox.calls_by_key().values()) == 1
    assert sum(ark.sandbox.calls(r.prompt) for r in created) == 1
    assert "failed" not in [(await pocketbase.get_record(r.id)).status for r in created]


@pytest.mark.timeout(300)
async def test_each_error_row_of_ark_ends_its_record_as_its_class_says(
    stack: Stack, ark: ArkSandboxThread, records: RecordFactory, pocketbase, redis_client, monkeypatch
):
    # Permanent rows fail the record at once; transient rows are tried again (after Retry-After when a 429
    # sends one) and end done; account rows pause the queue until a person resumes it, the record still queued.
    monkeypatch.setattr(ark.sandbox.config, "retry_after", 1)
    settings = with_ark(stack, ark, image_providers="ark", queue_concurrency=1, queue_backoff=0.05)
    rows = {kind: sorted(code for code, (k, _) in ROWS.items() if k is kind) for kind in FailureKind}
    refused = {code: await records.create(f"a refused harbour [[ark:{code}]]") for code in rows[PERMANENT]}
    once = {code: await records.create(f"a harbour failing once with {code}") for code in rows[TRANSIENT]}
    held = {code: await records.create(f"a harbour held once by {code}") for code in rows[ACCOUNT]}
    for code, record in (once | held).items():
        ark.sandbox.script(record.prompt, [code, "ok"])
    every = [*refused.values(), *once.values(), *held.values()]
    state = queue_state(settings, redis_client)
    lines: list[str] = []
    sink = logger.add(lines.append, format="{message}")
    pauses: list[PauseInfo] = []
    try:
        await enqueue(settings, *[r.id for r in every])
        async with worker_running(settings):
            while len(pauses) < len(held):
                paused = await wait_until(state.paused, deadline=60)
                assert paused is not None, [p.reason for p in pauses]
                pauses.append(paused)
                stopped = [await pocketbase.get_record(r.id) for r in held.values()]
                assert "failed" not in [r.status for r in stopped]
                await state.resume()
            finished = await wait_for_records(pocketbase, [r.id for r in every], ("done", "failed"), deadline=120)
    finally:
        logger.remove(sink)
    outcome = {record.id: record for record in finished}
    for code, record in refused.items():
        assert outcome[record.id].status == "failed", code
        assert ROWS[code][1] in outcome[record.id].error and code in outcome[record.id].error
        assert ark.sandbox.calls(record.prompt) == 1, code
    for code, record in (once | held).items():
        assert outcome[record.id].status == "done", (code, outcome[record.id].error)
        assert ark.sandbox.calls(record.prompt) == 2, code
    for code in once:
        status = ERRORS[code][0]
        retried = [line for line in lines if f" {code}: " in line and "retrying in" in line]
        assert len(retried) == 1, (code, retried)
        # A 429 waits its Retry-After (1 s here) rather than the far shorter backoff.
        assert retried[0].rstrip().endswith("retrying in 1s" if status == 429 else "retrying in 0s"), retried[0]
    assert {p.source for p in pauses} == {"auto"}
    assert sorted(code for p in pauses for code in held if f" {code}: " in p.reason) == sorted(held)


def test_ark_in_the_providers_needs_its_key(stack: Stack, monkeypatch):
    monkeypatch.setenv("IMAGE_PROVIDERS", "jimeng,dalle")
    with pytest.raises(ConfigError, match="IMAGE_PROVIDERS"):
        load_settings(None)
    result = run_cli(stack, "status", IMAGE_PROVIDERS="ark")
    assert result.returncode == 2
    assert "IMAGE_PROVIDERS names ark but ARK_API_KEY is empty" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_covers_ark_when_it_is_a_provider(stack: Stack, ark: ArkSandboxThread):
    result = run_cli(stack, "check", IMAGE_PROVIDERS="jimeng,ark", ARK_API_KEY=ARK_KEY, ARK_BASE_URL=ark.base_url)
    assert result.returncode == 0, result.stdout
    assert "ARK_API_KEY accepted and model doubao-seedream-4-0-250828 not refused" in result.stdout
    refused = run_cli(
        stack, "check", IMAGE_PROVIDERS="jimeng,ark", ARK_API_KEY="ark-wrong-key-0000", ARK_BASE_URL=ark.base_url
    )
    assert refused.returncode == 3
    line = next(line for line in refused.stdout.splitlines() if line.startswith("ark"))
    assert "FAIL" in line and "ark-wrong-key-0000" not in refused.stdout
    assert not any(line.startswith("ark") for line in run_cli(stack, "check").stdout.splitlines())
