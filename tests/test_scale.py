"""Several worker processes on one Redis share one cap on concurrent jimeng calls (JIMENG_MAX_INFLIGHT), and a
killed worker leaks none of it."""

from __future__ import annotations

import signal

import pytest

from imagegen.models import RecordStatus

from .conftest import RecordFactory, Stack, run_cli, wait_for_records
from .test_pipeline import wait_until

PROMPTS = 30
CAP = 4


@pytest.mark.timeout(300)
async def test_three_workers_never_exceed_the_call_cap_even_after_one_is_killed(
    stack: Stack, records: RecordFactory, pocketbase, start_worker, sandbox_config
):
    created = await records.many(PROMPTS, prefix="a capped call")
    sandbox_config.latency = 1.5
    env = {
        "QUEUE_CONCURRENCY": "3",
        "JIMENG_MAX_INFLIGHT": str(CAP),
        "WORKER_LEASE": "4",
        "RECONCILE_INTERVAL": "1",
    }
    workers = [start_worker(**env) for _ in range(3)]
    assert run_cli(stack, "add-pending").returncode == 0
    sandbox = stack.jimeng.sandbox

    async def done_at_least(count: int):
        return await pocketbase.count(pocketbase.status_filter(RecordStatus.DONE)) >= count

    assert await wait_until(lambda: done_at_least(8), deadline=120)
    # Nine job slots in all, four calls at a time: the cap is what limits, and it is used to the full.
    assert sandbox.stats()["peak_inflight"] == CAP

    victim = workers[0]
    victim.process.send_signal(signal.SIGKILL)
    victim.process.wait()
    sandbox.reset_peak()
    finished = await wait_for_records(pocketbase, [r.id for r in created], deadline=180)
    assert [r.status for r in finished] == ["done"] * PROMPTS
    # The killed worker's permits expired: the two left still reached the whole cap, and never more.
    assert sandbox.stats()["peak_inflight"] == CAP
    for worker in workers[1:]:
        assert worker.process.poll() is None
        assert "job done" in worker.output()


@pytest.mark.timeout(240)
async def test_the_rate_limit_holds_across_workers_and_the_next_call_starts_when_the_minute_allows(
    stack: Stack, records: RecordFactory, pocketbase, start_worker
):
    created = await records.many(3, prefix="a rate limited call")
    env = {"QUEUE_CONCURRENCY": "2", "JIMENG_RATE_LIMIT": "2"}
    workers = [start_worker(**env), start_worker(**env)]
    assert run_cli(stack, "add-pending").returncode == 0
    sandbox = stack.jimeng.sandbox

    async def two_done():
        return [(await pocketbase.get_record(r.id)).status for r in created].count("done") == 2

    assert await wait_until(two_done, deadline=60)
    assert sandbox.stats()["total_calls"] == 2

    async def one_waits():
        return any("JIMENG_RATE_LIMIT=2 calls a minute reached" in w.output() for w in workers)

    assert await wait_until(one_waits, deadline=30)

    finished = await wait_for_records(pocketbase, [r.id for r in created], deadline=120)
    assert [r.status for r in finished] == ["done"] * 3
    starts = sorted(t for r in created for t in sandbox.call_starts(r.prompt))
    assert len(starts) == 3
    # The third call started only once the first was a minute old.
    assert starts[2] - starts[0] >= 60 - 0.5


@pytest.mark.timeout(120)
async def test_a_queued_job_starts_when_announced_not_when_the_worker_next_polls(
    stack: Stack, records: RecordFactory, pocketbase, start_worker
):
    # Polling every ten minutes: only the message `imagegen add` publishes can start the job in time.
    worker = start_worker(QUEUE_POLL_INTERVAL="600")

    async def ready():
        return "worker ready" in worker.output()

    assert await wait_until(ready, deadline=30)
    for prompt in ("an announced lighthouse", "an announced harbour"):
        record = await records.create(prompt)
        assert run_cli(stack, "add", record.id).returncode == 0
        [finished] = await wait_for_records(pocketbase, [record.id], deadline=60)
        assert finished.status == "done"


@pytest.mark.timeout(120)
async def test_the_next_paid_call_starts_while_the_previous_prompt_still_stores_its_images(
    stack: Stack, records: RecordFactory, pocketbase, start_worker, sandbox_config
):
    first, second = await records.many(2, prefix="a slot handed on")
    sandbox_config.latency = 0.3
    sandbox_config.image_latency = 2.0  # four images: the first prompt stores for about eight seconds
    worker = start_worker(QUEUE_CONCURRENCY="1", WORKER_LEASE="4")
    assert run_cli(stack, "add", first.id).returncode == 0
    sandbox = stack.jimeng.sandbox

    async def first_called():
        return sandbox.stats()["total_generations"] == 1

    assert await wait_until(first_called, deadline=30)

    async def status_shows_it_storing():
        return "(1 storing)" in run_cli(stack, "status").stdout

    assert await wait_until(status_shows_it_storing, deadline=10)
    assert run_cli(stack, "add", second.id).returncode == 0
    finished = await wait_for_records(pocketbase, [first.id, second.id], deadline=60)
    assert [r.status for r in finished] == ["done", "done"]

    def line_of(prompt_id: str, text: str) -> int:
        lines = worker.output().splitlines()
        return next(i for i, line in enumerate(lines) if prompt_id in line and text in line)

    # One generation slot, never two calls at once, and yet the second prompt was generated while the first
    # was still moving its images into the bucket.
    assert sandbox.stats()["peak_inflight"] == 1
    assert line_of(second.id, "generated 4 images") < line_of(first.id, "job done")
