"""Figure 3, memory: the worker's peak RSS growth with 20 MiB images, next to buffering the same images whole.

QUEUE_CONCURRENCY=10, prompts whose four images the fake serves as 20 MiB each. Growth is the worker's VmHWM
at the end minus its VmRSS once ready. The baseline moves as many images the buffered way (each job's four
images read whole, then PUT) in one process, 10 jobs at once, measured the same way.
"""

from __future__ import annotations

from .report import Figure, Row, Target
from .stack import Stack, create_records, run_worker_over
from .upload import HUGE, MIB, run_transfer

IMAGE_MIB = 20
CONCURRENCY = 10
GROWTH_TARGET_MIB = 100.0


async def measure(stack: Stack, quick: bool, profile: bool) -> Figure:
    jobs = 10 if quick else 40
    stack.jimeng_config(huge_bytes=IMAGE_MIB * MIB)
    ids = await create_records(stack, [f"{HUGE} memory: a mountain lake #{i}" for i in range(jobs)])
    run = await run_worker_over(stack, ids, timeout=600, QUEUE_CONCURRENCY=str(CONCURRENCY))
    growth = (run.peak_rss_kib - run.rest_rss_kib) / 1024
    buffered = run_transfer(stack, "buffered", CONCURRENCY, 4)
    rows = [
        Row(f"memory: RSS growth, {IMAGE_MIB} MiB x 4 images x {CONCURRENCY} jobs", "MiB", growth,
            buffered["growth_mib"], Target("<=", GROWTH_TARGET_MIB), digits=0),
    ]  # fmt: skip
    notes = [
        f"{jobs} jobs of 4 images of {IMAGE_MIB} MiB, QUEUE_CONCURRENCY={CONCURRENCY}; {run.failed} failed. The worker "
        f"rests at {run.rest_rss_kib / 1024:.0f} MiB once ready and peaks at {run.peak_rss_kib / 1024:.0f} MiB "
        "(VmHWM); growth = peak - rest.",
        f"Baseline: {CONCURRENCY} jobs at once in one process, each reading its 4 images whole before PUTting them "
        f"(`python -m bench.upload buffered --jobs {CONCURRENCY} --images 4`); growth measured the same way, from "
        f"{buffered['rest_mib']:.0f} MiB once its clients are set up. Holding them all would be "
        f"{CONCURRENCY * 4 * IMAGE_MIB} MiB.",
    ]
    return Figure("memory", rows, notes)
