"""Faults from outside the worker, in the shapes they take in production: services down or frozen for tens of
seconds, Redis refusing writes, the job's own timeout, signals at awkward moments, a worker frozen past its
lease, links refused while fresh, a Redis flush. Every record must end in a true state with one paid
generation each and no manual command."""

from __future__ import annotations

import asyncio
import json
import re
import signal
from typing import Any

import pytest
import redis as sync_redis
from arq.constants import in_progress_key_prefix

from imagegen.ops.control import open_control
from imagegen.queue.keys import RedisKeys
from imagegen.queue.ledger import GenerationLedger
from imagegen.queue.state import QueueState

from .conftest import REDIS_PASSWORD, RecordFactory, Stack, queue_state, run_cli, wait_for_records
from .test_pipeline import bucket_keys, enqueue, run_queue, wait_until, worker_running

OUTAGE = 25.0


async def hold(seconds: float, *conditions) -> None:
    """Keep a fault in place for `seconds` and until every condition has held once (checked as it lasts)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    pending = list(conditions)
    while pending or loop.time() < end:
        pending = [c for c in pending if not await c()]
        await asyncio.sleep(0.2)


def status(stack: Stack) -> tuple[int, dict[str, Any]]:
    done = run_cli(stack, "status", "--json")
    return done.returncode, json.loads(done.stdout)


async def all_generating(stack: Stack, created, count: int | None = None):
    return sum(stack.jimeng.sandbox.calls(r.prompt) for r in created) >= (count or len(created))


def assert_one_generation_each(stack: Stack, created) -> None:
    assert {r.id: stack.jimeng.sandbox.generations(r.prompt) for r in created} == {r.id: 1 for r in created}


@pytest.mark.timeout(240)
async def test_pocketbase_down_for_25s_mid_run_pauses_and_resumes_by_itself(
    stack: Stack, records: RecordFactory, pocketbase, start_worker, sandbox_config, redis_client, settings
):
    created = await records.many(4, prefix="a record store outage")
    sandbox_config.latency = 2.0
    worker = start_worker(QUEUE_CONCURRENCY="4", OUTAGE_PAUSE_AFTER="8")
    assert run_cli(stack, "add-pending").returncode == 0
    assert await wait_until(lambda: all_generating(stack, created), deadline=60)
    state = queue_state(settings, redis_client)

    stack.pocketbase.stop()
    try:

        async def outage_reported():
            code, report = status(stack)
            return (
                code == 3 and report["records"] is None and [o["service"] for o in report["outages"]] == ["pocketbase"]
            )

        async def outage_paused():
            pause = await state.paused()
            return pause is not None and pause.source == "outage" and "pocketbase down" in pause.reason

        await hold(OUTAGE, outage_reported, outage_paused)
    finally:
        stack.pocketbase.start()

    finished = await wait_for_records(pocketbase, [r.id for r in created], deadline=60)
    assert [r.status for r in finished] == ["done"] * 4
    assert_one_generation_each(stack, created)
    assert await wait_until(lambda: _not_paused(state))
    log = worker.output()
    assert "pocketbase is down" in log
    assert "pocketbase answers again" in log
    assert "queue resumed: pocketbase answers again" in log

    async def outage_cleared():
        code, report = status(stack)  # as of each worker's last heartbeat, a few seconds at most
        return code == 0 and report["outages"] == []

    assert await wait_until(outage_cleared)


async def test_an_outage_pause_left_behind_is_lifted_once_the_service_answers(
    stack: Stack, records: RecordFactory, pocketbase, start_worker, redis_client, settings
):
    # As a worker that paused for an outage and died (or whose jobs all gave up waiting) leaves it.
    state = queue_state(settings, redis_client)
    await state.pause("pocketbase down for 60 s (refused)", source="outage", service="pocketbase")
    record = await records.create("after the outage")
    assert run_cli(stack, "add", record.id).returncode == 0
    worker = start_worker(WORKER_LEASE="2")
    finished = await wait_for_records(pocketbase, [record.id], deadline=60)
    assert finished[0].status == "done"
    assert await state.paused() is None
    assert "queue resumed: pocketbase answers again" in worker.output()


async def _not_paused(state: QueueState) -> bool:
    return await state.paused() is None


@pytest.mark.timeout(240)
@pytest.mark.parametrize("fault", ["frozen", "stopped"])
async def test_storage_frozen_or_down_for_25s_mid_run_finishes_every_record(
    stack: Stack, records: RecordFactory, pocketbase, start_worker, sandbox_config, settings, fault
):
    created = await records.many(4, prefix=f"a {fault} bucket")
    sandbox_config.latency = 1.0
    worker = start_worker(QUEUE_CONCURRENCY="4")
    assert run_cli(stack, "add-pending").returncode == 0
    assert await wait_until(lambda: all_generating(stack, created), deadline=60)

    away, back = (
        (stack.seaweed.freeze, stack.seaweed.thaw) if fault == "frozen" else (stack.seaweed.stop, stack.seaweed.start)
    )
    away()
    try:
        # A frozen bucket hangs each upload; one that is down refuses it, and the worker says so.
        reported = [] if fault == "frozen" else [lambda: _logged(worker, "storage is down (")]
        await hold(OUTAGE, *reported)
        # Nothing can have landed while the bucket was away.
        assert [(await pocketbase.get_record(r.id)).status for r in created] == ["processing"] * 4
    finally:
        back()

    finished = await wait_for_records(pocketbase, [r.id for r in created], deadline=90)
    assert [r.status for r in finished] == ["done"] * 4
    assert_one_generation_each(stack, created)
    stored = await bucket_keys(settings)
    assert len(stored) == 16
    assert sorted(stored) == sorted(u.split(f"/{settings.tos_bucket}/", 1)[1] for r in finished for u in r.images)


@pytest.mark.timeout(180)
async def test_redis_refusing_writes_right_after_the_paid_call_reuses_the_generation(
    stack: Stack, records: RecordFactory, pocketbase, start_worker, settings
):
    record = await records.create("a lighthouse in a full Redis")
    admin = sync_redis.Redis(host="127.0.0.1", port=settings.redis_port, password=REDIS_PASSWORD)
    refused: list[str] = []

    def refuse_writes(prompt: str) -> None:
        # Runs in the fake before its answer leaves: the worker's next write meets a full Redis.
        admin.config_set("maxmemory", 1)
        refused.append(prompt)

    stack.jimeng.sandbox.on_generation = refuse_writes
    worker = start_worker()
    try:
        assert run_cli(stack, "add", record.id).returncode == 0
        assert await wait_until(lambda: _logged(worker, "Redis unavailable (OutOfMemoryError"), deadline=60)
        await hold(3)
    finally:
        admin.config_set("maxmemory", 0)
        admin.close()

    finished = await wait_for_records(pocketbase, [record.id], deadline=60)
    assert finished[0].status == "done"
    assert refused == [record.prompt]
    assert stack.jimeng.sandbox.generations(record.prompt) == 1
    assert worker.process.poll() is None
    assert "Redis answers again" in worker.output()


async def _logged(worker, text: str) -> bool:
    return text in worker.output()


async def test_the_jobs_own_timeout_uses_an_attempt_says_so_and_resumes(
    stack: Stack, records: RecordFactory, pocketbase, sandbox_config
):
    # 16 s job timeout keeps 10 s to record the outcome: 6 s for the work, which needs about 1 + 4 x 1.5 s.
    settings = stack.settings(queue_job_timeout=16, jimeng_timeout=2000, download_timeout=2)
    sandbox_config.image_latency = 1.5
    record = await records.create("an hourglass running out")
    stack.jimeng.sandbox.script(record.prompt, ["slow:1"])
    await enqueue(settings, record.id)

    async def noted():
        current = await pocketbase.get_record(record.id)
        return current if "ran out of time" in current.error else None

    async with worker_running(settings):
        note = await wait_until(noted, deadline=60)
        assert note is not None
        assert note.status == "queued"
        assert "attempt 1 of 3" in note.error
        assert "QUEUE_JOB_TIMEOUT=16" in note.error

        async def job_done():
            async with open_control(settings) as control:
                report = await control.inspect(record.id)
            return report if report.state.value == "done" else None

        report = await wait_until(job_done, deadline=60)
    assert report is not None
    assert report.tries == 2
    assert report.record_status == "done"
    assert stack.jimeng.sandbox.generations(record.prompt) == 1


async def test_a_job_cut_off_after_marking_done_leaves_the_record_done_and_pays_once(
    stack: Stack, records: RecordFactory, pocketbase, monkeypatch
):
    settings = stack.settings()
    record = await records.create("a job cut off at the very end")
    await enqueue(settings, record.id)
    committed = asyncio.Event()
    forget = GenerationLedger.forget

    async def stall_after_done(self, prompt_id: str) -> None:
        # The record is done by now; the job hangs here until the worker cancels it (a stop past its grace).
        if (await pocketbase.get_record(prompt_id)).status == "done":
            committed.set()
            await asyncio.Event().wait()
        await forget(self, prompt_id)

    monkeypatch.setattr(GenerationLedger, "forget", stall_after_done)
    async with worker_running(settings):
        assert await wait_until(lambda: _is_set(committed))
    monkeypatch.setattr(GenerationLedger, "forget", forget)
    # The cut-off did not mark the done record queued; arq's retry of the job finds it done and pays nothing.
    assert (await pocketbase.get_record(record.id)).status == "done"
    await run_queue(settings)
    done = await pocketbase.get_record(record.id)
    assert (done.status, done.error, len(done.images)) == ("done", "", 4)
    assert stack.jimeng.sandbox.generations(record.prompt) == 1


async def _is_set(event: asyncio.Event) -> bool:
    return event.is_set()


@pytest.mark.timeout(180)
async def test_sigterm_while_paused_exits_within_seconds_and_loses_nothing(
    stack: Stack, records: RecordFactory, pocketbase, start_worker
):
    assert run_cli(stack, "pause", "--reason", "maintenance").returncode == 0
    created = await records.many(3, prefix="a paused stop")
    assert run_cli(stack, "add-pending").returncode == 0
    worker = start_worker(QUEUE_CONCURRENCY="3")

    async def all_waiting():
        report = status(stack)[1]
        return report["jobs"]["waiting"] == 3 and report["jobs"]["in_progress"] == 0

    assert await wait_until(all_waiting, deadline=60)
    # The worker said at start that the queue was paused, and since when, as a date.
    assert re.search(
        r"the queue is paused since \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d: maintenance", worker.output()
    )
    worker.process.send_signal(signal.SIGTERM)
    # The grace is 20 s here: a stop that waited for the parked jobs would take all of it.
    assert await asyncio.to_thread(worker.process.wait, 15) == 0
    assert "3 jobs back to the queue at once" in worker.output()
    for record in created:
        report = json.loads(run_cli(stack, "inspect", record.id, "--json").stdout)
        assert report["state"] == "queued"
        assert report["tries"] == 0

    assert run_cli(stack, "resume").returncode == 0
    start_worker()
    finished = await wait_for_records(pocketbase, [r.id for r in created], deadline=60)
    assert [r.status for r in finished] == ["done"] * 3
    assert_one_generation_each(stack, created)


@pytest.mark.timeout(180)
async def test_sigterm_during_a_paid_call_waits_for_it_and_pays_once(
    stack: Stack, records: RecordFactory, pocketbase, start_worker
):
    record = await records.create("a slow and expensive nebula")
    stack.jimeng.sandbox.script(record.prompt, ["slow:5"])
    worker = start_worker()
    assert run_cli(stack, "add", record.id).returncode == 0
    assert await wait_until(lambda: all_generating(stack, [record]), deadline=60)
    worker.process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(worker.process.wait, 60) == 0
    assert "1 finishing" in worker.output()
    done = await pocketbase.get_record(record.id)
    assert done.status == "done"
    assert len(done.images) == 4
    assert stack.jimeng.sandbox.calls(record.prompt) == 1


@pytest.mark.timeout(180)
async def test_a_worker_frozen_past_its_lease_pays_nothing_and_deletes_nothing(
    stack: Stack, records: RecordFactory, pocketbase, start_worker, redis_client, settings
):
    record = await records.create("a frozen clock tower")
    assert run_cli(stack, "pause", "--reason", "hold it").returncode == 0
    assert run_cli(stack, "add", record.id).returncode == 0
    frozen = start_worker(WORKER_LEASE="4")
    lease = RedisKeys(settings.queue_name).lease(record.id)

    async def holds_the_lease():
        return await redis_client.exists(lease) and status(stack)[1]["jobs"]["waiting"] == 1

    assert await wait_until(holds_the_lease, deadline=60)
    frozen.signal(signal.SIGSTOP)
    try:
        assert await wait_until(lambda: _gone(redis_client, lease), deadline=30)
        stack.jimeng.sandbox.script(record.prompt, ["slow:4"])
        assert run_cli(stack, "resume").returncode == 0
        other = start_worker(WORKER_LEASE="4")
        assert await wait_until(lambda: all_generating(stack, [record]), deadline=60)
    finally:
        frozen.signal(signal.SIGCONT)
    assert await wait_until(lambda: _logged(frozen, "this one writes nothing"), deadline=30)

    finished = await wait_for_records(pocketbase, [record.id], deadline=60)
    assert finished[0].status == "done"
    assert stack.jimeng.sandbox.calls(record.prompt) == 1
    stored = await bucket_keys(settings)
    assert sorted(stored) == sorted(u.split(f"/{settings.tos_bucket}/", 1)[1] for u in finished[0].images)
    assert len(stored) == 4
    assert "job done" in other.output()
    assert "job done" not in frozen.output()


@pytest.mark.parametrize("command", ["add", "add-pending"])
async def test_a_job_left_marked_running_by_a_worker_that_died_as_it_started_runs_again(
    stack: Stack, records: RecordFactory, pocketbase, start_worker, redis_client, command
):
    record = await records.create("a job caught at its very start")
    # `add` marks the record queued; `add-pending` leaves it pending, and the sweep finds the job all the same.
    assert run_cli(stack, *([command, record.id] if command == "add" else [command])).returncode == 0
    # What arq writes as a worker picks a job up (marked running for QUEUE_JOB_TIMEOUT + 10 s), left behind by
    # a worker killed before the job could take its lease.
    await redis_client.psetex(in_progress_key_prefix + record.id, 3_610_000, b"1")
    worker = start_worker(RECONCILE_INTERVAL="1", WORKER_LEASE="2")
    finished = await wait_for_records(pocketbase, [record.id], deadline=60)
    assert finished[0].status == "done"
    assert "freed 1 jobs a worker died holding" in worker.output()
    assert stack.jimeng.sandbox.generations(record.prompt) == 1


async def test_a_forced_rerun_whose_job_was_flushed_is_finished_by_the_sweep(
    stack: Stack, records: RecordFactory, pocketbase, start_worker, redis_client, settings
):
    record = await records.create("a portrait painted twice")
    await enqueue(settings, record.id)
    await run_queue(settings)
    first = await pocketbase.get_record(record.id)
    assert run_cli(stack, "add", "--force", record.id).returncode == 0
    await redis_client.flushall()
    # The record says queued and still shows the first run's images; no job is left behind it.
    assert (await pocketbase.get_record(record.id)).status == "queued"

    worker = start_worker(RECONCILE_INTERVAL="1", WORKER_LEASE="2")
    finished = await wait_for_records(pocketbase, [record.id], deadline=60)
    assert finished[0].status == "done"
    assert first.status == "done"
    assert stack.jimeng.sandbox.generations(record.prompt) == 2
    assert "records left queued/processing without a job" in worker.output()


async def _gone(redis_client, key: str) -> bool:
    return not await redis_client.exists(key)


async def test_one_failure_on_each_image_link_costs_no_attempt(stack: Stack, records: RecordFactory, pocketbase):
    settings = stack.settings()
    record = await records.create("a flaky image host [[jimeng:img-500-once]]")
    await enqueue(settings, record.id)
    await run_queue(settings)
    done = await pocketbase.get_record(record.id)
    assert done.status == "done"
    assert len(done.images) == 4
    assert stack.jimeng.sandbox.generations(record.prompt) == 1
    assert stack.jimeng.sandbox.stats()["downloads"][record.prompt] == 8
    async with open_control(settings) as control:
        assert (await control.inspect(record.id)).tries == 1


@pytest.mark.timeout(240)
async def test_redis_flushed_mid_run_recovers_marked_records_alone_the_rest_by_add_pending_and_pays_once(
    stack: Stack, records: RecordFactory, pocketbase, start_worker, slow_images, redis_client
):
    bulk = await records.many(6, prefix="a flush")
    # Each worker holds at most three jobs (one calling, one ready, one storing): at the flush, most of the
    # sixteen are only queued, the last ten queued (by `add`) above all.
    quick = {"QUEUE_CONCURRENCY": "1", "STORE_BACKLOG": "1", "RECONCILE_INTERVAL": "1", "WORKER_LEASE": "4"}
    first, second = start_worker(**quick), start_worker(**quick)
    assert run_cli(stack, "add-pending").returncode == 0
    # Queued after the bulk ones, so they still wait when Redis is flushed: `add` marks them `queued`.
    by_id = await records.many(10, prefix="a flush, added by id")
    assert run_cli(stack, "add", *[r.id for r in by_id]).returncode == 0
    created = bulk + by_id
    assert await wait_until(lambda: _some_done(pocketbase, created), deadline=60)
    await redis_client.flushall()

    # Marked by `add` or a worker: back with no command. Queued in bulk and never taken, a record is queued in
    # Redis alone (PocketBase still says pending), so the README's `add-pending` after a flush brings it back.
    finished = await wait_for_records(pocketbase, [r.id for r in by_id], deadline=120)
    assert [r.status for r in finished] == ["done"] * 10
    assert run_cli(stack, "add-pending").returncode == 0
    finished = await wait_for_records(pocketbase, [r.id for r in created], deadline=120)
    assert [r.status for r in finished] == ["done"] * 16
    assert_one_generation_each(stack, created)
    reconciled = first.output() + second.output()
    assert "records left queued/processing without a job" in reconciled
    assert "job done" in first.output()
    assert "job done" in second.output()


async def _some_done(pocketbase, created) -> bool:
    statuses = [(await pocketbase.get_record(r.id)).status for r in created]
    return statuses.count("done") >= 2
