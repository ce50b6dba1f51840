"""Figure 4, backlog: `imagegen add-pending` over many pending records, next to arq's enqueue_job in a loop.

The records are created beforehand through PocketBase's batch API (not counted). Each side runs as its own
process, timed from start to exit, its peak RSS read from /proc (VmHWM): records/s = records / seconds.
The baseline queues the same ids on an emptied Redis, one `enqueue_job` call at a time.
"""

from __future__ import annotations

import time

from .report import Figure, Row, Target
from .stack import BIN, BenchError, Measured, Stack, arq_pool, create_records

RATE_TARGET = 10_000.0


async def queued(stack: Stack) -> int:
    async with arq_pool(stack) as pool:
        return int(await pool.zcard(stack.queue_name))


async def measure(stack: Stack, quick: bool, profile: bool) -> Figure:
    records = 5_000 if quick else 100_000
    started = time.monotonic()
    ids = await create_records(stack, [f"backlog: a quiet street in the rain #{i}" for i in range(records)])
    created_in = time.monotonic() - started
    print(f"   {records:,} records created in {created_in:.0f} s (not counted)", flush=True)
    add_pending = stack.measure([str(BIN / "imagegen"), "add-pending"])
    check(add_pending, await queued(stack), records, "imagegen add-pending")
    async with arq_pool(stack) as pool:
        await pool.flushall()
    ids_file = stack.root / "work" / "backlog-ids.txt"
    ids_file.write_text("\n".join(ids))
    baseline = stack.measure(
        [str(BIN / "python"), "-m", "bench.baseline", "enqueue", "--redis-port", str(stack.redis_port),
         "--queue", stack.queue_name, "--ids", str(ids_file)]
    )  # fmt: skip
    check(baseline, await queued(stack), records, "the enqueue_job loop")
    rows = [
        Row("backlog: records queued per second", "/s", records / add_pending.seconds, records / baseline.seconds,
            Target(">=", RATE_TARGET), digits=0),
        Row("backlog: peak RSS of the queueing process", "MiB", add_pending.peak_rss_kib / 1024,
            baseline.peak_rss_kib / 1024, digits=0),
    ]  # fmt: skip
    notes = [
        f"{records:,} pending records (created through PocketBase's batch API in {created_in:.0f} s, not counted). "
        f"`imagegen add-pending` took {add_pending.seconds:.1f} s from start to exit.",
        "Peak RSS: the process's VmHWM, read every 10 ms while it runs (not ru_maxrss, which on Linux keeps the "
        "peak of the harness it was forked from).",
        f"Baseline: the same {records:,} ids queued as imagegen jobs on an emptied Redis by a process that calls arq's "
        f"`enqueue_job` once per id, one call at a time ({baseline.seconds:.1f} s from start to exit, reading the ids "
        "from a file: no PocketBase).",
    ]
    return Figure("backlog", rows, notes)


def check(measured: Measured, queued: int, records: int, what: str) -> None:
    if measured.returncode != 0 or queued != records:
        raise BenchError(
            f"{what}: exit {measured.returncode}, {queued} of {records} queued:\n{measured.output[-2000:]}"
        )
