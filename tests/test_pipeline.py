"""The job, run by a real arq worker in this process, against real Redis, PocketBase and SeaweedFS.

Each test checks what a user would: the record's status, error and image URLs, what the bucket holds, and
how many paid generations the fake counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import aiohttp
import pytest

from imagegen.clients.download import sniff_image_type
from imagegen.clients.storage import open_s3_client
from imagegen.ops.control import open_control
from imagegen.settings import Settings
from imagegen.worker.arqworker import ImagegenWorker

from .conftest import RecordFactory, Stack, queue_state


async def run_queue(settings: Settings) -> ImagegenWorker:
    """Run an in-process worker until the queue is empty (retries included)."""
    worker = ImagegenWorker(settings, burst=True, handle_signals=False)
    try:
        await worker.main()
    finally:
        await worker.close()
    return worker


@asynccontextmanager
async def worker_running(settings: Settings, clock: Callable[[], float] | None = None) -> AsyncIterator[ImagegenWorker]:
    """An in-process worker that keeps running (through pauses) until the block ends; `clock` stands in for the
    time of day (JIMENG_DAILY_LIMIT)."""
    worker = ImagegenWorker(settings, clock=clock, handle_signals=False)
    task = asyncio.create_task(worker.async_run())
    try:
        yield worker
    finally:
        # Let jobs arq has just picked reach the job function first: a cancel inside arq's own start of a job
        # leaves its hour-long in-progress mark behind (a worker's reconcile sweep frees it; a test can't wait).
        worker.allow_pick_jobs = False
        await wait_until(lambda: _jobs_entered(worker), deadline=10)
        # Cancel what runs, as a stop past its grace would; arq's close() gives up (skipping the shutdown
        # hook that stops the heartbeat and the sweep) when a job task it gathers ended cancelled.
        worker.handle_sig(signal.SIGUSR1)
        await asyncio.gather(*worker.tasks.values(), return_exceptions=True)
        worker.tasks.clear()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await worker.close()


async def _jobs_entered(worker: ImagegenWorker) -> bool:
    return all(task.done() or job_id in worker.job_tasks for job_id, task in worker.tasks.items())


async def wait_until(condition, deadline: float = 30):
    """Poll an async condition until it holds; returns its last value."""
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline
    while True:
        value = await condition()
        if value or loop.time() > end:
            return value
        await asyncio.sleep(0.05)


async def enqueue(settings: Settings, *ids: str, force: bool = False) -> None:
    async with open_control(settings) as control:
        for prompt_id in ids:
            report = await control.enqueue(prompt_id, force=force)
            assert report.outcome.value == "queued", report


async def bucket_keys(settings: Settings) -> list[str]:
    async with open_s3_client(settings) as s3:
        listing = await s3.list_objects_v2(Bucket=settings.tos_bucket)
        return sorted(item["Key"] for item in listing.get("Contents", []))


async def fetch(http: aiohttp.ClientSession, url: str) -> tuple[int, str, bytes]:
    async with http.get(url) as response:
        return response.status, response.content_type, await response.read()


async def test_record_gets_all_four_images_hosted_with_their_real_type(
    stack: Stack, settings: Settings, records: RecordFactory, pocketbase, http
):
    record = await records.create("a lighthouse at dawn", "blurry")
    await enqueue(settings, record.id)
    await run_queue(settings)

    done = await pocketbase.get_record(record.id)
    assert done.status == "done"
    assert done.error == ""
    assert len(done.images) == 4
    assert done.image_url == done.images[0]
    served = stack.jimeng.sandbox.served_images(record.prompt)
    assert len(served) == 4
    for url, original in zip(done.images, served, strict=True):
        assert url.startswith(f"{settings.tos_public_base_url}/imagegen/{record.id}/")
        status, content_type, body = await fetch(http, url)
        assert status == 200
        assert hashlib.sha256(body).hexdigest() == hashlib.sha256(original).hexdigest()
        kind = sniff_image_type(body[:16])
        assert kind is not None
        assert content_type == kind.value
        assert url.endswith("." + kind.extension)
    assert stack.jimeng.sandbox.generations(record.prompt) == 1
    assert await bucket_keys(settings) == sorted(u.split(f"/{settings.tos_bucket}/", 1)[1] for u in done.images)


@pytest.mark.parametrize(
    ("marker", "words"),
    [
        ("-2006", "moderation"),
        ("-2007-2038", "moderation (2038)"),
        ("-1000", "rejected as invalid"),
    ],
)
async def test_permanent_errors_fail_the_record_after_one_call(
    stack: Stack, settings: Settings, records: RecordFactory, pocketbase, marker, words
):
    record = await records.create(f"a prompt [[jimeng:{marker}]]")
    await enqueue(settings, record.id)
    await run_queue(settings)

    failed = await pocketbase.get_record(record.id)
    assert failed.status == "failed"
    assert words in failed.error
    assert failed.image_url == ""
    assert stack.jimeng.sandbox.calls(record.prompt) == 1
    assert await bucket_keys(settings) == []


async def test_transient_error_is_retried_and_then_succeeds(
    stack: Stack, settings: Settings, records: RecordFactory, pocketbase
):
    record = await records.create("a harbour at night")
    stack.jimeng.sandbox.script(record.prompt, ["-2007", "http-502", "ok"])
    await enqueue(settings, record.id)
    await run_queue(settings)

    done = await pocketbase.get_record(record.id)
    assert done.status == "done"
    assert len(done.images) == 4
    assert stack.jimeng.sandbox.calls(record.prompt) == 3
    assert stack.jimeng.sandbox.generations(record.prompt) == 1


async def test_transient_errors_exhaust_the_attempts_then_fail(
    stack: Stack, settings: Settings, records: RecordFactory, pocketbase
):
    record = await records.create("a mountain lake [[jimeng:empty]]")
    await enqueue(settings, record.id)
    await run_queue(settings)

    failed = await pocketbase.get_record(record.id)
    assert failed.status == "failed"
    assert "no images" in failed.error
    assert stack.jimeng.sandbox.calls(record.prompt) == settings.queue_attempts


async def test_bad_image_bytes_are_retried_without_paying_again(
    stack: Stack, settings: Settings, records: RecordFactory, pocketbase
):
    record = await records.create("a desert road [[jimeng:img-notimage]]")
    await enqueue(settings, record.id)
    await run_queue(settings)

    failed = await pocketbase.get_record(record.id)
    assert failed.status == "failed"
    assert "did not serve an image" in failed.error
    # Three attempts at the download, one paid generation.
    assert stack.jimeng.sandbox.calls(record.prompt) == 1
    assert await bucket_keys(settings) == []


async def test_oversized_image_fails_with_the_limit_named(stack: Stack, records: RecordFactory, pocketbase):
    settings = stack.settings(download_max_bytes=1024 * 1024)
    record = await records.create("a whale [[jimeng:img-huge]]")
    await enqueue(settings, record.id)
    await run_queue(settings)

    failed = await pocketbase.get_record(record.id)
    assert failed.status == "failed"
    assert "DOWNLOAD_MAX_BYTES" in failed.error
    assert stack.jimeng.sandbox.calls(record.prompt) == 1


async def test_fresh_links_refused_fail_clearly_after_one_generation(
    stack: Stack, settings: Settings, records: RecordFactory, pocketbase
):
    record = await records.create("a forest path [[jimeng:img-403]]")
    await enqueue(settings, record.id)
    await run_queue(settings)

    failed = await pocketbase.get_record(record.id)
    # A 403 on links seconds old is no expiry: every attempt tries the same links, nothing is paid twice.
    assert failed.status == "failed"
    assert "answered HTTP 403 although the generation is only" in failed.error
    assert "JIMENG_LINK_LIFETIME" in failed.error
    assert stack.jimeng.sandbox.calls(record.prompt) == 1
    assert stack.jimeng.sandbox.generations(record.prompt) == 1


async def test_links_past_their_lifetime_are_generated_again_once(
    stack: Stack, records: RecordFactory, pocketbase, sandbox_config
):
    # Links live 2 s here; the first attempt's downloads keep failing, the retry comes after they expired.
    settings = stack.settings(jimeng_link_lifetime=2, queue_backoff=2.5, download_tries=1)
    sandbox_config.link_ttl = 2
    record = await records.create("an old map")
    stack.jimeng.sandbox.script(record.prompt, ["img-500-once", "ok"])
    await enqueue(settings, record.id)
    await run_queue(settings)

    done = await pocketbase.get_record(record.id)
    assert done.status == "done"
    assert len(done.images) == 4
    assert stack.jimeng.sandbox.generations(record.prompt) == 2
    async with open_control(settings) as control:
        assert (await control.inspect(record.id)).tries == 2


@pytest.mark.parametrize(("prompt", "words"), [("   ", "empty prompt"), ("x" * 5000, "PROMPT_MAX_CHARS")])
async def test_unusable_prompts_fail_without_any_paid_call(
    stack: Stack, settings: Settings, records: RecordFactory, pocketbase, prompt, words
):
    record = await records.create(prompt)
    await enqueue(settings, record.id)
    await run_queue(settings)

    failed = await pocketbase.get_record(record.id)
    assert failed.status == "failed"
    assert words in failed.error
    assert stack.jimeng.sandbox.stats()["total_calls"] == 0


async def test_record_deleted_after_queueing_fails_the_job_and_writes_nothing(
    stack: Stack, settings: Settings, records: RecordFactory, pocketbase
):
    record = await records.create("a ghost ship")
    await enqueue(settings, record.id)
    await pocketbase.delete_record(record.id)
    await run_queue(settings)

    async with open_control(settings) as control:
        report = await control.inspect(record.id)
    assert report.state.value == "failed"
    assert "no record" in report.error
    assert report.record_status is None
    assert stack.jimeng.sandbox.stats()["total_calls"] == 0
    assert await bucket_keys(settings) == []


async def test_forced_rerun_overwrites_and_leaves_no_stray_objects(
    stack: Stack, settings: Settings, records: RecordFactory, pocketbase
):
    record = await records.create("a teapot")
    await enqueue(settings, record.id)
    await run_queue(settings)
    first = await pocketbase.get_record(record.id)

    await enqueue(settings, record.id, force=True)
    await run_queue(settings)
    second = await pocketbase.get_record(record.id)

    assert second.status == "done"
    assert stack.jimeng.sandbox.generations(record.prompt) == 2
    keys = await bucket_keys(settings)
    assert len(keys) == 4
    assert all(k.startswith(f"imagegen/{record.id}/") for k in keys)
    assert sorted(second.images) == sorted(settings.tos_public_base_url + "/" + k for k in keys)
    assert len(first.images) == 4


async def test_a_done_record_is_not_generated_again_without_force(
    stack: Stack, settings: Settings, records: RecordFactory, pocketbase
):
    record = await records.create("a quiet library")
    await enqueue(settings, record.id)
    await run_queue(settings)
    async with open_control(settings) as control:
        report = await control.enqueue(record.id)
    assert report.outcome.value == "already done"
    assert stack.jimeng.sandbox.generations(record.prompt) == 1


@pytest.mark.parametrize("mode", ["-2001", "html-502", "nonjson", "drop", "http-429", "http-503", "http-504"])
async def test_each_transient_answer_is_retried_to_success(
    stack: Stack, settings: Settings, records: RecordFactory, pocketbase, mode
):
    record = await records.create(f"a transient {mode}")
    stack.jimeng.sandbox.script(record.prompt, [mode])
    await enqueue(settings, record.id)
    await run_queue(settings)
    done = await pocketbase.get_record(record.id)
    assert done.status == "done"
    assert stack.jimeng.sandbox.calls(record.prompt) == 2
    assert stack.jimeng.sandbox.generations(record.prompt) == 1


@pytest.mark.parametrize(
    ("mode", "words"),
    [
        ("-2002", "renew JIMENG_API_KEY"),
        ("-2001-shark", "risk control"),
        ("http-401", "check JIMENG_API_KEY"),
        ("http-403", "check JIMENG_API_KEY"),
    ],
)
async def test_account_level_answers_pause_the_queue_with_the_reason(
    stack: Stack, settings: Settings, records: RecordFactory, pocketbase, redis_client, mode, words
):

    record = await records.create(f"an account problem {mode}")
    stack.jimeng.sandbox.script(record.prompt, [mode])
    await enqueue(settings, record.id)
    state = queue_state(settings, redis_client)

    async def noted():
        current = await pocketbase.get_record(record.id)
        return current if current.status == "queued" and words in current.error else None

    async with worker_running(settings):
        paused = await wait_until(state.paused)
        # The job notes on the record why it waits, just after pausing the queue.
        waiting = await wait_until(noted)
    assert paused is not None
    assert words in paused.reason
    assert waiting is not None
    # The operator's resume (`imagegen resume`): it also gives the set-aside account another call.
    async with open_control(settings) as control:
        await control.resume()
    await run_queue(settings)
    assert (await pocketbase.get_record(record.id)).status == "done"
    assert stack.jimeng.sandbox.calls(record.prompt) == 2


@pytest.mark.parametrize(("mode", "words"), [("img-404", "answered HTTP 404 although"), ("img-truncate", "cut off")])
async def test_broken_image_links_fail_clearly(
    stack: Stack, settings: Settings, records: RecordFactory, pocketbase, mode, words
):
    record = await records.create(f"a broken link [[jimeng:{mode}]]")
    await enqueue(settings, record.id)
    await run_queue(settings)
    failed = await pocketbase.get_record(record.id)
    assert failed.status == "failed"
    assert words in failed.error
    assert await bucket_keys(settings) == []
    assert stack.jimeng.sandbox.generations(record.prompt) == 1


async def test_record_deleted_mid_job_leaves_no_images_behind(
    stack: Stack, settings: Settings, records: RecordFactory, pocketbase
):
    record = await records.create("a sandcastle")
    stack.jimeng.sandbox.script(record.prompt, ["slow:1"])
    await enqueue(settings, record.id)

    async def processing():
        return (await pocketbase.get_record(record.id)).status == "processing"

    async with worker_running(settings):
        assert await wait_until(processing)
        await pocketbase.delete_record(record.id)

        async def finished():
            async with open_control(settings) as control:
                report = await control.inspect(record.id)
            return report if report.state.value == "failed" else None

        report = await wait_until(finished)
    assert report
    assert "deleted" in report.error
    assert await bucket_keys(settings) == []


async def test_a_hanging_api_call_times_out_and_is_retried(stack: Stack, records: RecordFactory, pocketbase):
    settings = stack.settings(jimeng_timeout=300)
    record = await records.create("an hourglass")
    stack.jimeng.sandbox.script(record.prompt, ["hang"])
    await enqueue(settings, record.id)
    await run_queue(settings)
    done = await pocketbase.get_record(record.id)
    assert done.status == "done"
    assert stack.jimeng.sandbox.calls(record.prompt) == 2
    async with open_control(settings) as control:
        assert (await control.inspect(record.id)).tries == 2
