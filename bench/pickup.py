"""Figure 5, pick-up latency: from the enqueue call to the job's start on an idle worker, and idle CPU.

One job at a time, each queued a random 20-600 ms after the previous one finished, so the worker is idle every
time and each enqueue falls anywhere in a 0.5 s poll period (shorter pauses would lock onto the poll's phase
and skew a polling worker's latency). Latency = the job result's start_time - its enqueue_time (both arq's, in
ms). imagegen's jobs are queued as `imagegen add` queues them (`Control.enqueue`); the baseline is a plain arq
worker with its defaults (0.5 s poll) and no-op jobs. Then both workers sit idle and their CPU use is read.
"""

from __future__ import annotations

import asyncio
import random
import statistics

from arq.jobs import Job, JobResult

from imagegen.ops.control import EnqueueOutcome, open_control

from .baseline import READY
from .report import Figure, Row, Target
from .stack import BenchError, Process, Stack, arq_pool, create_records, wait_for, worker_ready

BASELINE_QUEUE = "bench:baseline"


async def started_after_ms(job: Job) -> float:
    found: list[JobResult] = []

    async def finished() -> bool:
        info = await job.result_info()
        if info is not None:
            found.append(info)
        return info is not None

    await wait_for(finished, 60, f"job {job.job_id} to finish")
    return (found[0].start_time - found[0].enqueue_time).total_seconds() * 1000


def percentile(values: list[float], p: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1]


async def idle_cpu_percent(processes: list[Process], seconds: float) -> list[float]:
    """Each process's CPU use over `seconds` of doing nothing, in % of one core."""
    before = [p.cpu_seconds() for p in processes]
    await asyncio.sleep(seconds)  # the measuring window itself
    return [(p.cpu_seconds() - b) / seconds * 100 for p, b in zip(processes, before, strict=True)]


async def measure(stack: Stack, quick: bool, profile: bool) -> Figure:
    samples, idle_seconds = (30, 5.0) if quick else (200, 20.0)
    rng = random.Random(8)
    stack.jimeng_config(image_size=64, distinct_images=False)
    ids = await create_records(stack, [f"pick-up: a lantern #{i}" for i in range(samples)])
    worker = stack.worker()
    baseline = stack.baseline_worker("--queue", BASELINE_QUEUE)
    try:
        await worker_ready(worker)
        await baseline.wait_for_output(READY)
        ours, theirs = [], []
        async with open_control(stack.settings()) as control:
            for prompt_id in ids:
                await asyncio.sleep(rng.uniform(0.02, 0.6))  # the worker idles between jobs
                report = await control.enqueue(prompt_id)
                if report.outcome is not EnqueueOutcome.QUEUED:
                    raise BenchError(f"imagegen add {prompt_id}: {report.outcome.value} {report.detail}")
                ours.append(await started_after_ms(control.job(prompt_id)))
        async with arq_pool(stack) as pool:
            for _ in range(samples):
                await asyncio.sleep(rng.uniform(0.02, 0.6))
                job = await pool.enqueue_job("noop", _queue_name=BASELINE_QUEUE)
                assert job is not None
                theirs.append(await started_after_ms(job))
        idle, idle_baseline = await idle_cpu_percent([worker, baseline], idle_seconds)
    finally:
        worker.stop()
        baseline.stop()
    rows = [
        Row("pick-up latency p50", "ms", statistics.median(ours), statistics.median(theirs), Target("<=", 3)),
        Row("pick-up latency p99", "ms", percentile(ours, 99), percentile(theirs, 99), Target("<=", 15)),
        Row("idle worker CPU", "% of a core", idle, idle_baseline, Target("<", 1), digits=2),
    ]
    notes = [
        f"{samples} jobs, one at a time, each queued a random 20-600 ms after the previous one finished (so a polling "
        f"worker is met at any phase of its poll); imagegen's max {max(ours):.0f} ms, the baseline's max "
        f"{max(theirs):.0f} ms.",
        "Latency: arq's start_time - enqueue_time of the job's result (millisecond timestamps, one clock). "
        "imagegen's jobs are queued with `Control.enqueue`, what `imagegen add <id>` runs; the worker has its "
        "default settings (QUEUE_CONCURRENCY=5) and the fake answers at once.",
        "Baseline: a plain arq worker with arq's defaults (poll every 0.5 s, max_jobs 10) and no-op jobs.",
        f"Idle CPU: utime + stime from /proc over {idle_seconds:g} s with nothing queued, both workers at once.",
    ]
    return Figure("pickup", rows, notes)
