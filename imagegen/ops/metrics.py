"""Prometheus metrics: a worker process's own (`WorkerMetrics`) and the queue's (`queue_metrics`, for serve).

Every worker process counts what its jobs did: outcomes, retries and their reasons, the seconds of each
stage (`stages`), the jimeng calls and their error codes, images and bytes stored, and the jobs running by
stage. A worker exposes them on WORKER_METRICS_PORT (`exporter`); `imagegen serve` exposes the queue as every
worker and front end sees it: jobs by state, records by status, the pause, the failure streak, live workers
and jobs finished since the queue began, all read from Redis and PocketBase at scrape time. Each registry is
an object of its own (nothing registers at import), so a process can hold several.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from imagegen.errors import ArkError, JimengError, ProviderError
from imagegen.queue.spend import CallOutcome, call_outcome
from imagegen.queue.stages import TIMED, Stage

# Stages last from milliseconds (a record write) to minutes (a paid call, a slow bucket).
STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 45, 60, 90, 120, 300, 600)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def jimeng_error_code(exc: ProviderError) -> str:
    """The `code` label of a failed call: the provider's code (jimeng's `-2007`, Ark's `ModelNotOpen`),
    `http_<status>`, or `timeout`/`network` for calls that got no answer, `bad_reply` for a 200 that held no
    images."""
    code = exc.code if isinstance(exc, JimengError | ArkError) else None
    if code is not None and code != "":
        return str(code)
    if exc.status is not None and exc.status != 200:
        return f"http_{exc.status}"
    if exc.status == 200:
        return "bad_reply"
    return "timeout" if "_TIMEOUT" in exc.message else "network"


class _LiveJobs(Collector):
    """The jobs a worker runs right now, by stage, read when scraped."""

    def __init__(self, stages: Callable[[], Iterable[Stage]]) -> None:
        self._stages = stages

    def collect(self) -> Iterator[Metric]:
        counts = dict.fromkeys(TIMED, 0)
        for stage in self._stages():
            if stage in counts:
                counts[stage] += 1
        family = GaugeMetricFamily(
            "imagegen_jobs_in_progress", "Jobs this worker runs now, by stage.", labels=["stage"]
        )
        for stage, count in counts.items():
            family.add_metric([stage.value], count)
        yield family


class WorkerMetrics:
    """One worker process's metrics, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.jobs = Counter(
            "imagegen_jobs",
            "Jobs that ended, by outcome: done, failed, skipped (already done), superseded (another run decided).",
            ["outcome"],
            registry=self.registry,
        )
        self.retries = Counter(
            "imagegen_job_retries",
            "Jobs sent back to the queue, by reason: failed_attempt (backoff), paused, outage, interrupted "
            "(worker stopping, too little time left), busy (another run holds the prompt), cancelled (by arq).",
            ["reason"],
            registry=self.registry,
        )
        self.stage_seconds = Histogram(
            "imagegen_stage_duration_seconds",
            "Seconds a job run spent in each stage.",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=self.registry,
        )
        self.calls = Counter(
            "imagegen_jimeng_calls",
            "Paid jimeng calls made, by result as `imagegen spend` counts them: images, moderated, failed.",
            ["result"],
            registry=self.registry,
        )
        self.call_errors = Counter(
            "imagegen_jimeng_errors",
            "Failed jimeng calls by code: the proxy's error code, http_<status>, timeout, network, bad_reply, or "
            "unreached (no connection: no call made).",
            ["code"],
            registry=self.registry,
        )
        self.provider_calls = Counter(
            "imagegen_provider_calls",
            "Paid calls by provider (jimeng, ark), account (a fingerprint of the key called with, never the key) "
            "and result: images, moderated, failed.",
            ["provider", "account", "result"],
            registry=self.registry,
        )
        self.images = Counter("imagegen_images_stored", "Images stored in the bucket.", registry=self.registry)
        self.bytes = Counter("imagegen_uploaded_bytes", "Bytes of images stored in the bucket.", registry=self.registry)
        for outcome in ("done", "failed", "skipped", "superseded"):
            self.jobs.labels(outcome)
        for result in CallOutcome:
            self.calls.labels(result.value)

    def watch(self, stages: Callable[[], Iterable[Stage]]) -> None:
        """Report the jobs in progress by stage, from `stages()` at each scrape."""
        self.registry.register(_LiveJobs(stages))

    def call_ended(self, error: ProviderError | None, provider: str = "jimeng", account: str = "") -> None:
        outcome = call_outcome(error)
        if outcome is not None:
            self.calls.labels(outcome.value).inc()
            self.provider_calls.labels(provider, account, outcome.value).inc()
        if error is not None:
            self.call_errors.labels(jimeng_error_code(error) if error.reached else "unreached").inc()

    def stored(self, size: int) -> None:
        self.images.inc()
        self.bytes.inc(size)

    def run_ended(self, seconds: Mapping[Stage, float]) -> None:
        for stage, spent in seconds.items():
            self.stage_seconds.labels(stage.value).observe(spent)

    def render(self) -> bytes:
        return generate_latest(self.registry)


@dataclass
class QueueFigures:
    """What `imagegen serve` reports about the queue, gathered before rendering."""

    jobs: Mapping[str, int]  # queued, deferred, in_progress, waiting
    paused: bool
    paused_source: str
    consecutive_failures: int
    max_failed: int
    workers: int
    finished: Mapping[str, int]  # jobs ended done / failed since the queue began
    records: Mapping[str, int] | None = None  # by status; None when PocketBase can't be read
    records_age: float | None = None  # seconds since the record counts were counted (shared between viewers)


class _QueueCollector(Collector):
    def __init__(self, figures: QueueFigures) -> None:
        self._f = figures

    def collect(self) -> Iterator[Metric]:
        f = self._f
        jobs = GaugeMetricFamily(
            "imagegen_queue_jobs",
            "Jobs in the queue by state: queued (due), deferred (retry backoff), in_progress, waiting (for a resume).",
            labels=["state"],
        )
        for state, count in f.jobs.items():
            jobs.add_metric([state], count)
        yield jobs
        yield GaugeMetricFamily(
            "imagegen_queue_paused", "1 while the queue is paused (no new generation starts).", value=int(f.paused)
        )
        source = GaugeMetricFamily(
            "imagegen_queue_pause_source",
            "1 for the source of the current pause (manual, auto, outage, limit).",
            labels=["source"],
        )
        if f.paused:
            source.add_metric([f.paused_source], 1)
        yield source
        yield GaugeMetricFamily(
            "imagegen_queue_consecutive_failures",
            "Jobs in a row that failed after all their attempts (the queue pauses at QUEUE_MAX_FAILED).",
            value=f.consecutive_failures,
        )
        yield GaugeMetricFamily(
            "imagegen_queue_max_failed",
            "QUEUE_MAX_FAILED: the failure streak that pauses the queue.",
            value=f.max_failed,
        )
        yield GaugeMetricFamily("imagegen_workers", "Worker processes with a live heartbeat.", value=f.workers)
        finished = CounterMetricFamily(
            "imagegen_queue_jobs_finished",
            "Jobs of every worker that ended done or failed, since the queue began.",
            labels=["outcome"],
        )
        for outcome, count in f.finished.items():
            finished.add_metric([outcome], count)
        yield finished
        yield GaugeMetricFamily(
            "imagegen_records_up",
            "1 when the record counts of this scrape could be read (from PocketBase or their shared copy).",
            value=int(f.records is not None),
        )
        if f.records is not None:
            records = GaugeMetricFamily("imagegen_records", "Prompt records by status.", labels=["status"])
            for status, count in f.records.items():
                records.add_metric([status], count)
            yield records
        if f.records_age is not None:
            yield GaugeMetricFamily(
                "imagegen_records_age_seconds",
                "Seconds since the record counts were counted (shared by every viewer, RECORD_COUNTS_MAX_AGE).",
                value=f.records_age,
            )


def queue_metrics(figures: QueueFigures) -> bytes:
    """The queue-level metrics in Prometheus' text format."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_QueueCollector(figures))
    return generate_latest(registry)
