"""Figure 2, API-slot occupancy: how much of the paid concurrency is spent in generation calls.

QUEUE_CONCURRENCY=50 and a fixed API latency (1 s, then 4 s). Occupancy is the fake API's summed call time over
50 x the span from the first call's start to the last call's end; throughput is jobs over the span from the
first job's start to the last job's finish, as a share of the ideal 50 per latency. The baseline is a plain
arq worker (max_jobs 50) whose jobs only sleep the latency, measured the same way from their own start and end.

`batch-occupancy` (named with --only) measures short batches the same way: 100 and 400 prompts of 4 s calls,
where how fast the first wave fills the 50 slots decides most of the figure; each size runs REPEATS times,
imagegen and baseline alternately, and the table shows the medians.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from .report import Figure, Row, Target
from .stack import Stack, create_records, results_span, run_baseline_burst, run_worker_over

SLOTS = 50
OCCUPANCY_TARGET = 0.98
# Short batches: the prompts of a batch and the occupancy it must reach (issue: the first wave within a second).
BATCHES = {100: 0.95, 400: 0.98}
BATCH_LATENCY = 4.0
REPEATS = 3


def occupancy(spans: list[tuple[float, float]]) -> float:
    busy = sum(end - start for start, end in spans)
    span = max(end for _, end in spans) - min(start for start, _ in spans)
    return busy / (SLOTS * span)


@dataclass(frozen=True)
class Batch:
    """One batch of prompts through an imagegen worker and the same number of sleeping jobs through plain arq."""

    occupancy: float
    throughput: float
    baseline: float
    baseline_throughput: float
    note: str


def waves(spans: list[tuple[float, float]]) -> str:
    """Where a batch loses occupancy: how long the first wave took to fill the slots, the median gap between a
    call's end and the start of the call that takes its slot, and how spread the last wave's ends are."""
    starts = sorted(start for start, _ in spans)
    ends = sorted(end for _, end in spans)
    if len(spans) <= SLOTS:
        return ""
    fill = starts[SLOTS - 1] - starts[0]
    handover = statistics.median(starts[k + SLOTS] - ends[k] for k in range(len(spans) - SLOTS))
    tail = ends[-1] - ends[-SLOTS]
    return (
        f"first wave filled in {fill:.2f} s, median hand-over {handover * 1000:.0f} ms, "
        f"last wave ends over {tail:.2f} s"
    )


async def run_batch(stack: Stack, prompts: int, latency: float, label: str) -> Batch:
    stack.jimeng_config(latency=latency, jitter=0.0, distinct_images=False)
    ids = await create_records(stack, [f"{label} {latency:g}s: a harbour at dawn #{i}" for i in range(prompts)])
    timeout = prompts * latency / SLOTS * 4 + 120
    run = await run_worker_over(stack, ids, timeout, QUEUE_CONCURRENCY=str(SLOTS))
    spans = stack.jimeng.sandbox.call_spans()
    baseline = await run_baseline_burst(stack, "sleep_job", prompts, SLOTS, timeout, (latency,))
    baseline_spans = [(float(r.result[0]), float(r.result[1])) for r in baseline.results]
    ideal = SLOTS / latency
    return Batch(
        occupancy(spans),
        prompts / results_span(run.results) / ideal,
        occupancy(baseline_spans),
        len(baseline.results) / results_span(baseline.results) / ideal,
        f"{latency:g} s calls: {prompts:,} prompts, {len(spans):,} generation calls, {run.failed} jobs failed "
        f"({waves(spans)}); baseline {len(baseline.results):,} sleeping jobs ({waves(baseline_spans)}).",
    )


async def measure(stack: Stack, quick: bool, profile: bool) -> Figure:
    prompts = 100 if quick else 1000
    rows, notes = [], []
    for latency in (1.0, 4.0):
        batch = await run_batch(stack, prompts, latency, "occupancy")
        rows += [
            Row(f"occupancy at {latency:g} s calls", "", batch.occupancy, batch.baseline,
                Target(">=", OCCUPANCY_TARGET), digits=3),
            Row(f"throughput / (50 per {latency:g} s)", "", batch.throughput, batch.baseline_throughput, digits=3),
        ]  # fmt: skip
        notes.append(batch.note)
    notes += [
        "QUEUE_CONCURRENCY=50, one worker process, images of 256 px drawn once and served for every call (the "
        "fake then costs next to no CPU), no jitter.",
        "Occupancy: the fake API's summed call durations / (50 x (last call end - first call start)).",
        "Throughput: jobs / (last job finish - first job start), over the ideal 50 jobs per latency.",
        "Baseline: a plain arq worker with max_jobs=50 over as many jobs that sleep the latency (queued "
        "beforehand); each job's own start and end count as its call.",
    ]
    return Figure("occupancy", rows, notes)


async def measure_batches(stack: Stack, quick: bool, profile: bool) -> Figure:
    """Short batches of 4 s calls: the medians of REPEATS runs each."""
    repeats = 1 if quick else REPEATS
    rows, notes = [], []
    for prompts, target in BATCHES.items():
        runs = []
        for n in range(repeats):
            runs.append(await run_batch(stack, prompts, BATCH_LATENCY, f"batch {n}"))
            print(
                f"   occupancy {runs[-1].occupancy:.3f}, baseline {runs[-1].baseline:.3f}: {runs[-1].note}", flush=True
            )
        rows.append(
            Row(f"occupancy, batch of {prompts} prompts", "", statistics.median(b.occupancy for b in runs),
                statistics.median(b.baseline for b in runs), Target(">=", target), digits=3)
        )  # fmt: skip
        every = ", ".join(f"{b.occupancy:.3f}" for b in runs)
        baselines = ", ".join(f"{b.baseline:.3f}" for b in runs)
        notes.append(f"{runs[0].note} Each of {repeats} runs: imagegen {every}; baseline {baselines}.")
    notes += [
        f"QUEUE_CONCURRENCY={SLOTS}, {BATCH_LATENCY:g} s calls without jitter, one worker process already running "
        "when the batch is queued (one bulk enqueue); occupancy as above, the median of the runs.",
        "Baseline: a plain arq worker with max_jobs=50 in burst mode over as many queued jobs that sleep 4 s.",
    ]
    return Figure("batch-occupancy", rows, notes)
