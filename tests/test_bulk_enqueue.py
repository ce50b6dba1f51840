"""`add-pending` and `retry-failed` queue in bulk: one job per prompt however runs and workers race, nothing
written to PocketBase, read-only dry runs, and jobs a real arq worker runs to the end."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import subprocess

import pytest
from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix, job_key_prefix, result_key_prefix
from arq.jobs import Job, deserialize_job_raw, serialize_job

from imagegen.models import JOB_NAME, PromptRecord, RecordStatus
from imagegen.ops.control import open_control
from imagegen.ops.record_states import count_by_status
from imagegen.queue.keys import RedisKeys
from imagegen.queue.priority import queue_score

from .conftest import BIN, RecordFactory, Stack, after_target, run_cli, wait_for_records
from .test_pipeline import run_queue


async def create_many(records: RecordFactory, count: int, prefix: str) -> list[PromptRecord]:
    """`count` pending records, created a few at a time."""
    gate = asyncio.Semaphore(16)

    async def one(n: int) -> PromptRecord:
        async with gate:
            return await records.create(f"{prefix} #{n}")

    return list(await asyncio.gather(*(one(n) for n in range(count))))


async def queue_entries(redis_client, settings) -> dict[str, float]:
    members = await redis_client.zrange(settings.queue_name, 0, -1, withscores=True)
    return {member.decode(): score for member, score in members}


async def job_keys(redis_client, ids) -> int:
    return int(await redis_client.exists(*(job_key_prefix + i for i in ids)))


async def test_add_pending_queues_each_record_once_and_leaves_pocketbase_alone(
    stack: Stack, records: RecordFactory, pocketbase, redis_client, settings
):
    created = await create_many(records, 300, "a bulk of lighthouses")
    done, running, leased = created[-3:]
    await pocketbase.update_record(done.id, {"status": "done"})
    keys = RedisKeys(settings.queue_name)
    await redis_client.set(in_progress_key_prefix + running.id, b"1")
    await redis_client.set(keys.lease(leased.id), "another run")
    # What an earlier run left: arq would refuse the id with its result; the new run gets all its attempts.
    stale = created[0]
    await redis_client.set(result_key_prefix + stale.id, b"an old result")
    await redis_client.set(keys.attempts(stale.id), 3)

    result = run_cli(stack, "add-pending", "--json")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no progress line when stderr is not a terminal
    report = json.loads(result.stdout)
    # A record marked done is not pending, with or without an image URL: add-pending doesn't even list it.
    assert report["counts"] == {"queued": 297, "already queued": 2}
    outcomes = {r["id"]: r["outcome"] for r in report["results"]}
    assert (outcomes[running.id], outcomes[leased.id]) == ("already queued", "already queued")
    assert done.id not in outcomes
    fresh = [r.id for r in created[:-3]]
    queue = await queue_entries(redis_client, settings)
    assert sorted(queue) == sorted(fresh)
    assert await job_keys(redis_client, fresh) == 297
    assert await redis_client.exists(result_key_prefix + stale.id, keys.attempts(stale.id)) == 0
    # Queued in Redis; PocketBase still says pending until a worker takes the record.
    counts = await count_by_status(pocketbase)
    assert (counts["pending"], counts["queued"], counts["done"]) == (299, 0, 1)

    again = run_cli(stack, "add-pending")
    assert after_target(stack, again).strip() == "299 already queued"
    assert await queue_entries(redis_client, settings) == queue


async def test_a_dry_run_only_reads(stack: Stack, records: RecordFactory, redis_client, settings, pocketbase):
    created = await create_many(records, 200, "a dry bulk")
    run_cli(stack, "add", created[0].id)
    before = {key: await redis_client.dump(key) for key in await redis_client.keys("*")}
    result = run_cli(stack, "add-pending", "--dry-run", "--json")
    # the record `add` marked queued is not pending any more: only the other 199 are listed
    assert json.loads(result.stdout)["counts"] == {"would queue": 199}
    assert {key: await redis_client.dump(key) for key in await redis_client.keys("*")} == before
    assert (await count_by_status(pocketbase))["pending"] == 199


async def test_jobs_queued_in_bulk_are_what_arq_writes_and_a_worker_runs_them(
    stack: Stack, records: RecordFactory, pocketbase, redis_client, settings
):
    created = await records.many(4, prefix="a bulk queued kite")
    witness = "aaaaaaaaaaaaaaa"
    async with open_control(settings) as control:
        pages = [page async for page in control.enqueue_pending()]
        pool: ArqRedis = control.redis
        await pool.enqueue_job(JOB_NAME, witness, False, _job_id=witness, _queue_name=settings.queue_name)
    assert [r.outcome.value for page in pages for r in page] == ["queued"] * 4
    arq_job = deserialize_job_raw(await redis_client.get(job_key_prefix + witness))
    arq_ttl = await redis_client.pttl(job_key_prefix + witness)
    for record in created:
        stored = await redis_client.get(job_key_prefix + record.id)
        function, args, kwargs, job_try, enqueued_ms = deserialize_job_raw(stored)
        assert stored == serialize_job(JOB_NAME, (record.id, False), {}, None, enqueued_ms)
        assert (function, args, kwargs) == (JOB_NAME, (record.id, False), {})
        assert job_try is None  # as arq writes a new job (its type says int)
        # Scored by enqueue time, shifted into the band of priority 0 (see imagegen.queue.priority).
        assert (await queue_entries(redis_client, settings))[record.id] == queue_score(enqueued_ms, 0)
        assert abs(enqueued_ms - arq_job[4]) < 60_000
        assert abs(await redis_client.pttl(job_key_prefix + record.id) - arq_ttl) < 60_000
    await redis_client.zrem(settings.queue_name, witness)

    await run_queue(settings)
    finished = [await pocketbase.get_record(r.id) for r in created]
    assert [r.status for r in finished] == ["done"] * 4
    assert all(len(r.images) == 4 for r in finished)
    assert all(stack.jimeng.sandbox.generations(r.prompt) == 1 for r in created)


async def test_force_queues_done_records_and_drops_what_an_earlier_run_left(
    stack: Stack, records: RecordFactory, pocketbase, redis_client, settings
):
    created = await records.many(3, prefix="a forced rerun")
    keys = RedisKeys(settings.queue_name)
    for record in created:
        await pocketbase.update_record(record.id, {"status": "done", "imageUrl": "http://example.invalid/0.png"})
        await redis_client.set(keys.verdict(record.id), "{}")
    done_filter = pocketbase.status_filter(RecordStatus.DONE)
    async with open_control(settings) as control:
        unforced = [r.outcome.value async for page in control.enqueue_where(done_filter) for r in page]
        assert unforced == ["already done"] * 3
        assert await queue_entries(redis_client, settings) == {}
        forced = [r.outcome.value async for page in control.enqueue_where(done_filter, force=True) for r in page]
    assert forced == ["queued"] * 3
    for record in created:
        info = await Job(record.id, redis_client, _queue_name=settings.queue_name).info()
        assert info is not None
        assert info.args == (record.id, True)
        assert not await redis_client.exists(keys.verdict(record.id))


@pytest.mark.timeout(180)
async def test_add_pending_runs_at_once_queue_each_prompt_once(
    stack: Stack, records: RecordFactory, redis_client, settings
):
    # More than one PocketBase page, so the runs interleave page by page.
    created = await create_many(records, 1500, "a race of bulk runs")
    imagegen = [str(BIN / "imagegen"), "add-pending", "--json"]
    env = stack.process_env()
    runs = [subprocess.Popen(imagegen, cwd=stack.workdir, env=env, stdout=subprocess.PIPE, text=True) for _ in range(3)]
    reports = [json.loads(run.communicate(timeout=120)[0])["counts"] for run in runs]
    assert all(run.returncode == 0 for run in runs)
    assert sum(r.get("queued", 0) for r in reports) == 1500
    assert all(r.get("queued", 0) + r.get("already queued", 0) == 1500 for r in reports)
    assert len(await queue_entries(redis_client, settings)) == 1500
    assert await job_keys(redis_client, [r.id for r in created]) == 1500


@pytest.mark.timeout(240)
async def test_add_pending_racing_a_worker_generates_each_prompt_once(
    stack: Stack, records: RecordFactory, pocketbase, start_worker
):
    created = await records.many(12, prefix="a bulk run beside a worker")
    worker = start_worker(QUEUE_CONCURRENCY="4")
    for _ in range(4):
        assert run_cli(stack, "add-pending").returncode == 0
    finished = await wait_for_records(pocketbase, [r.id for r in created], deadline=120)
    assert [r.status for r in finished] == ["done"] * 12
    assert {r.id: stack.jimeng.sandbox.generations(r.prompt) for r in created} == {r.id: 1 for r in created}
    assert worker.output().count("job done: 4 images") == 12


async def test_retry_failed_queues_every_failed_record_with_all_its_attempts(
    stack: Stack, records: RecordFactory, pocketbase, redis_client, settings
):
    created = await create_many(records, 150, "a bulk of failures")
    keys = RedisKeys(settings.queue_name)
    for record in created:
        await pocketbase.update_record(record.id, {"status": "failed", "error": "earlier"})
        await redis_client.set(keys.attempts(record.id), 3)
    result = run_cli(stack, "retry-failed")
    assert after_target(stack, result).strip() == "150 queued"
    assert len(await queue_entries(redis_client, settings)) == 150
    assert await redis_client.exists(*(keys.attempts(r.id) for r in created)) == 0
    assert after_target(stack, run_cli(stack, "retry-failed")).strip() == "150 already queued"
    assert after_target(stack, run_cli(stack, "add-pending")).strip() == "nothing to queue"


async def test_a_terminal_sees_progress_and_the_counts_stay_on_stdout(stack: Stack, records: RecordFactory):
    await records.many(3, prefix="a watched bulk run")
    controller, terminal = pty.openpty()
    try:
        result = subprocess.run(
            [str(BIN / "imagegen"), "add-pending"],
            cwd=stack.workdir,
            env=stack.process_env(),
            stdout=subprocess.PIPE,
            stderr=terminal,
            text=True,
            timeout=60,
            check=False,
        )
        os.close(terminal)
        shown = b""
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # the terminal's other end is closed: everything was read
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(controller)
    assert after_target(stack, result) == "3 queued\n"
    assert b"3 records, " in shown
    assert shown.endswith(b"\r\x1b[K")  # wiped before the command ended


async def test_pages_follow_ids_without_gaps_or_repeats(stack: Stack, records: RecordFactory, pocketbase):
    created = await create_many(records, 40, "a paged record")
    pages = [page async for page in pocketbase.iter_pages('id != ""', page_size=7)]
    assert [len(page) for page in pages] == [7] * 5 + [5]
    ids = [record.id for page in pages for record in page]
    assert ids == sorted(r.id for r in created)
    assert {record.prompt for page in pages for record in page} == {r.prompt for r in created}
