"""Figure 2, API-slot occupancy: how much of the paid concurrency is spent in generation calls.

QUEUE_CONCURRENCY=50 and a fixed API latency (1 s, then 4 s). Occupancy is the fake API's summed call time over
50 x the span from the first call's start to the last call's end; throughput is jobs over the span from the
first job's start to the last job's finish, as a share of the ideal 50 per latency. The baseline is a plain
arq worker (max_jobs 50) whose jobs only sleep the latency, measured the same way from their own start and end.
"""

from __future__ import annotations

from .report import Figure, Row, Target
from .stack import Stack, create_records, results_span, run_baseline_burst, run_worker_over

SLOTS = 50
OCCUPANCY_TARGET = 0.98


def occupancy(spans: list[tuple[float, float]]) -> float:
    busy = sum(end - start for start, end in spans)
    span = max(end for _, end in spans) - min(start for start, _ in spans)
    return busy / (SLOTS * span)


async def measure(stack: Stack, quick: bool, profile: bool) -> Figure:
    prompts = 100 if quick else 1000
    rows, notes = [], []
    for latency in (1.0, 4.0):
        stack.jimeng_config(latency=latency, jitter=0.0, distinct_images=False)
        ids = await create_records(stack, [f"occupancy {latency:g}s: a harbour at dawn #{i}" for i in range(prompts)])
        timeout = prompts * latency / SLOTS * 4 + 120
        run = await run_worker_over(stack, ids, timeout, QUEUE_CONCURRENCY=str(SLOTS))
        spans = stack.jimeng.sandbox.call_spans()
        baseline = await run_baseline_burst(stack, "sleep_job", prompts, SLOTS, timeout, (latency,))
        baseline_spans = [(float(r.result[0]), float(r.result[1])) for r in baseline.results]
        ideal = SLOTS / latency
        rows += [
            Row(f"occupancy at {latency:g} s calls", "", occupancy(spans), occupancy(baseline_spans),
                Target(">=", OCCUPANCY_TARGET), digits=3),
            Row(f"throughput / (50 per {latency:g} s)", "", prompts / results_span(run.results) / ideal,
                len(baseline.results) / results_span(baseline.results) / ideal, digits=3),
        ]  # fmt: skip
        notes.append(
            f"{latency:g} s calls: {prompts:,} prompts, {len(spans):,} generation calls, {run.failed} jobs failed; "
            f"baseline {len(baseline.results):,} sleeping jobs."
        )
    notes += [
        "QUEUE_CONCURRENCY=50, one worker process, images of 256 px drawn once and served for every call (the "
        "fake then costs next to no CPU), no jitter.",
        "Occupancy: the fake API's summed call durations / (50 x (last call end - first call start)).",
        "Throughput: jobs / (last job finish - first job start), over the ideal 50 jobs per latency.",
        "Baseline: a plain arq worker with max_jobs=50 over as many jobs that sleep the latency (queued "
        "beforehand); each job's own start and end count as its call.",
    ]
    return Figure("occupancy", rows, notes)
