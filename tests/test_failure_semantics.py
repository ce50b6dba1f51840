"""Pause and resume, crash recovery, graceful stop and lost queue state, against the real services."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from imagegen.models import RecordStatus
from imagegen.ops.control import open_control
from imagegen.queue.state import QueueState

from .conftest import BIN, RecordFactory, Stack, queue_state, run_cli, wait_for_records
from .test_pipeline import enqueue, run_queue, wait_until, worker_running


async def live_workers(settings, redis_client):
    return await queue_state(settings, redis_client).workers()


async def test_no_credits_pauses_at_once_and_resume_finishes_with_attempts_intact(
    stack: Stack, records: RecordFactory, pocketbase, redis_client
):
    settings = stack.settings(queue_concurrency=1)
    created = await records.many(4, prefix="a bicycle")
    stack.jimeng.sandbox.script("*", ["-2009"])
    await enqueue(settings, *[r.id for r in created])
    state = queue_state(settings, redis_client)
    async with worker_running(settings):
        paused = await wait_until(state.paused)
        assert paused is not None
        assert "run out of credits" in paused.reason
        assert "no jimeng account can take a call: key 1 of 1" in paused.reason
        assert paused.source == "accounts"
        # The next job is parked before its paid call: the worker holds it, the API saw one call in all.
        parked = await wait_until(lambda: _parked(state))
        assert parked
        assert stack.jimeng.sandbox.stats()["total_calls"] == 1
        status = json.loads(run_cli(stack, "status", "--json").stdout)
        assert status["paused"]["reason"] == paused.reason
        assert status["records"]["failed"] == 0
        assert len(status["workers"]) == 1

        resumed = run_cli(stack, "resume")
        assert resumed.returncode == 0
        assert "was paused: no jimeng account can take a call" in resumed.stdout
        assert "error -2009" in resumed.stdout
        finished = await wait_for_records(pocketbase, [r.id for r in created])
    assert [r.status for r in finished] == ["done"] * 4
    for record in created:
        report = json.loads(run_cli(stack, "inspect", record.id, "--json").stdout)
        assert report["tries"] == 1
        assert stack.jimeng.sandbox.generations(record.prompt) == 1


async def _parked(state: QueueState):
    """Every worker holds a job that waits for a resume (and none that runs)."""
    workers = await state.workers()
    return workers and all(w.waiting and not w.running for w in workers)


async def test_consecutive_exhausted_jobs_pause_the_queue(
    stack: Stack, records: RecordFactory, pocketbase, redis_client
):
    settings = stack.settings(queue_concurrency=1, queue_attempts=1, queue_max_failed=10)
    created = await records.many(12, prefix="a storm")
    stack.jimeng.sandbox.script("*", ["-2007"] * 10)
    await enqueue(settings, *[r.id for r in created])
    state = queue_state(settings, redis_client)
    async with worker_running(settings):
        paused = await wait_until(state.paused)
        assert paused is not None
        assert paused.reason.startswith("10 jobs in a row failed after all their attempts")
        assert await wait_until(lambda: _parked(state))
        assert stack.jimeng.sandbox.stats()["total_calls"] == 10
        assert await state.consecutive_failures() == 10

        async with open_control(settings) as control:
            await control.resume()
            finished = await wait_for_records(pocketbase, [r.id for r in created], statuses=("done", "failed"))
            assert sorted(r.status for r in finished) == ["done"] * 2 + ["failed"] * 10
            assert await state.consecutive_failures() == 0
            pages = control.enqueue_where(pocketbase.status_filter(RecordStatus.FAILED), force=True)
            reports = [report async for page in pages for report in page]
            assert [r.outcome.value for r in reports] == ["queued"] * 10
            finished = await wait_for_records(pocketbase, [r.id for r in created])
    assert [r.status for r in finished] == ["done"] * 12


async def test_manual_pause_holds_every_worker_process(
    stack: Stack, records: RecordFactory, pocketbase, start_worker, redis_client, settings
):
    assert run_cli(stack, "pause", "--reason", "rotating the API key").returncode == 0
    created = await records.many(4, prefix="a pause")
    assert run_cli(stack, "add-pending").returncode == 0
    first, second = start_worker(QUEUE_CONCURRENCY="1"), start_worker(QUEUE_CONCURRENCY="1")

    async def both_parked():
        workers = await live_workers(settings, redis_client)
        return len(workers) == 2 and all(w.waiting for w in workers)

    assert await wait_until(both_parked)
    assert stack.jimeng.sandbox.stats()["total_calls"] == 0
    status = run_cli(stack, "status")
    assert "paused since" in status.stdout
    assert "rotating the API key" in status.stdout
    assert "workers:   2 live" in status.stdout

    assert run_cli(stack, "resume").returncode == 0
    finished = await wait_for_records(pocketbase, [r.id for r in created])
    assert [r.status for r in finished] == ["done"] * 4
    # Each worker held a parked job, so each finished at least that one.
    assert "job done" in first.output()
    assert "job done" in second.output()


@pytest.mark.timeout(240)
async def test_killed_workers_jobs_finish_elsewhere_without_paying_twice(
    stack: Stack, records: RecordFactory, pocketbase, start_worker, slow_images, redis_client, settings
):
    created = await records.many(6, prefix="a crash")
    victim = start_worker(QUEUE_CONCURRENCY="6")
    assert run_cli(stack, "add-pending").returncode == 0
    assert await wait_until(lambda: _log_count(victim, "generated 4 images", 6), deadline=60)
    victim.process.send_signal(signal.SIGKILL)
    victim.process.wait()
    survivor = start_worker()

    # Leases last 20 s: the survivor must have every job done well inside 30 s of the kill.
    finished = await wait_for_records(pocketbase, [r.id for r in created], deadline=30)
    assert [r.status for r in finished] == ["done"] * 6
    for record in created:
        assert stack.jimeng.sandbox.generations(record.prompt) == 1
    assert "reusing the generation of an earlier attempt" in survivor.output()


async def _log_count(worker, text: str, count: int):
    return worker.output().count(text) >= count


def supervised_project(stack: Stack, tmp_path: Path) -> Path:
    """The repository's own supervisord.conf in a scratch directory whose .venv is this environment."""
    project = tmp_path / "project"
    (project / "logs").mkdir(parents=True)
    shutil.copy(Path(__file__).resolve().parent.parent / "supervisord.conf", project)
    os.symlink(Path(sys.prefix), project / ".venv")
    return project


@pytest.mark.timeout(480)
async def test_sigterm_under_supervisord_finishes_jobs_in_flight(
    stack: Stack, records: RecordFactory, pocketbase, slow_images, tmp_path, redis_client, settings
):
    project = supervised_project(stack, tmp_path)
    env = stack.process_env(QUEUE_CONCURRENCY="3")
    supervisord = subprocess.Popen(
        [str(BIN / "supervisord"), "-n", "-c", str(project / "supervisord.conf")], env=env, cwd=project
    )
    ctl = [str(BIN / "supervisorctl"), "-c", str(project / "supervisord.conf")]
    try:
        created = await records.many(8, prefix="a graceful stop")
        assert run_cli(stack, "add-pending").returncode == 0

        sandbox = stack.jimeng.sandbox

        async def in_flight():
            """Records past their paid call and not done yet (storing their slow images)."""
            paid = [r.id for r in created if sandbox.generations(r.prompt)]
            processing = {i for i in paid if (await pocketbase.get_record(i)).status == "processing"}
            return processing if len(processing) >= 3 else None

        running = await wait_until(in_flight, deadline=60)
        assert running
        stopped = subprocess.run([*ctl, "stop", "imagegen-worker:*"], capture_output=True, text=True, timeout=120)
        assert "stopped" in stopped.stdout

        after = {r.id: r for r in [await pocketbase.get_record(r.id) for r in created]}
        paid = {r.id for r in created if sandbox.generations(r.prompt)}
        # Every generation paid for before the stop was stored and recorded; nothing is left processing.
        assert running <= paid
        assert all(after[i].status == "done" for i in paid)
        assert not [r for r in after.values() if r.status == "processing"]
        out_log = (project / "logs" / "worker-0-out.log").read_text()
        assert "shutdown on SIGTERM" in out_log
        assert (project / "logs" / "worker-0-error.log").exists()

        assert "started" in subprocess.run([*ctl, "start", "imagegen-worker:*"], capture_output=True, text=True).stdout
        finished = await wait_for_records(pocketbase, [r.id for r in created], deadline=90)
        assert [r.status for r in finished] == ["done"] * 8
    finally:
        subprocess.run([*ctl, "shutdown"], capture_output=True, timeout=120)
        supervisord.wait(60)


@pytest.mark.timeout(240)
async def test_worker_rides_out_a_redis_restart(stack: Stack, records: RecordFactory, pocketbase, start_worker):
    worker = start_worker()
    first = await records.create("before the restart")
    assert run_cli(stack, "add", first.id).returncode == 0
    assert (await wait_for_records(pocketbase, [first.id]))[0].status == "done"

    stack.redis.restart()
    second = await records.create("after the restart")
    assert run_cli(stack, "add", second.id).returncode == 0
    assert (await wait_for_records(pocketbase, [second.id], deadline=60))[0].status == "done"
    assert worker.process.poll() is None


async def test_unfinished_job_counts_attempts_only_for_real_tries(stack: Stack, records: RecordFactory, pocketbase):
    settings = stack.settings()
    record = await records.create("two bad answers then a good one")
    stack.jimeng.sandbox.script(record.prompt, ["http-429", "drop"])
    await enqueue(settings, record.id)
    await run_queue(settings)
    report = json.loads(run_cli(stack, "inspect", record.id, "--json").stdout)
    assert report["state"] == "done"
    assert report["tries"] == 3
    assert stack.jimeng.sandbox.calls(record.prompt) == 3
