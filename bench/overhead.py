"""Figure 1, overhead: the full pipeline at zero API latency, next to arq running no-op jobs.

Jobs/s of one worker process (QUEUE_CONCURRENCY=20) over a batch of 4-image jobs, and the worker's CPU
time per job (/proc utime + stime from ready to the queue drained, so start-up is left out). The baseline is
a plain arq worker (max_jobs 20, burst) over as many no-op jobs on the same Redis.
"""

from __future__ import annotations

from .hotspots import summarize
from .report import Figure, Row, Target
from .stack import Stack, create_records, results_span, run_baseline_burst, run_worker_over

CPU_TARGET_MS = 12.0


async def measure(stack: Stack, quick: bool, profile: bool) -> Figure:
    jobs = 200 if quick else 2000
    stack.jimeng_config(image_size=64, distinct_images=False)
    ids = await create_records(stack, [f"overhead: a small lighthouse #{i}" for i in range(jobs)])
    run = await run_worker_over(stack, ids, timeout=jobs, QUEUE_CONCURRENCY="20")
    baseline = await run_baseline_burst(stack, "noop", jobs, max_jobs=20, timeout=300)
    rows = [
        Row("overhead: jobs/s, one worker process", "jobs/s", jobs / results_span(run.results),
            len(baseline.results) / results_span(baseline.results)),
        Row("overhead: worker CPU per job", "ms", run.cpu_seconds * 1000 / jobs, baseline.cpu_seconds * 1000 / jobs,
            Target("<=", CPU_TARGET_MS)),
    ]  # fmt: skip
    notes = [
        f"{jobs:,} jobs of 4 images (64 px) at zero API latency, QUEUE_CONCURRENCY=20, one worker process; "
        f"{run.failed} failed.",
        "jobs/s: jobs over the span from the first job's start to the last job's finish (arq's results).",
        "CPU per job: the worker's utime + stime (/proc/<pid>/stat) from `worker ready` to the queue drained, "
        "over the jobs. The fake API, Redis, PocketBase and SeaweedFS share the same cores.",
        f"Baseline: a plain arq worker (max_jobs 20, burst) over {jobs:,} no-op jobs queued beforehand on the same "
        "Redis; its CPU is taken between its start-up and shutdown hooks.",
    ]
    details = ""
    if profile:
        profiled = min(jobs, 500)
        path = stack.root / "work" / "worker.prof"
        ids = await create_records(stack, [f"overhead, profiled: a small lighthouse #{i}" for i in range(profiled)])
        await run_worker_over(stack, ids, timeout=profiled * 2, profile_to=path, QUEUE_CONCURRENCY="20")
        details = summarize(path, profiled)
    return Figure("overhead", rows, notes, details)
