"""Where a job is, and how long each of its stages took.

Stages, in order: `queued` (waiting for a worker, for a resume of a paused queue or for a generation slot, and
reading the record), `generating` (the paid call), `downloading` (from the image host), `uploading` (into the
bucket; for an image above UPLOAD_MULTIPART_THRESHOLD the reads of later parts count here too), `saving`
(removing leftovers of earlier runs, writing the record), then `done` or `failed`.

A run keeps its clock in memory: a change of stage costs a clock reading, no Redis write. The worker's
heartbeat carries each run's current stage and timings (so `imagegen inspect`, the API and the dashboard show
a running job's stage at most a heartbeat late), and the end of every run adds its timings to one hash per
prompt, in the round trip that also counts the outcome. A retried job adds up the timings of all its runs;
the first run of a new job (a new `add`, a retry of a failed record) starts afresh.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import StrEnum

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from .keys import RedisKeys


class Stage(StrEnum):
    QUEUED = "queued"
    GENERATING = "generating"
    DOWNLOADING = "downloading"
    UPLOADING = "uploading"
    SAVING = "saving"
    DONE = "done"
    FAILED = "failed"


TIMED = (Stage.QUEUED, Stage.GENERATING, Stage.DOWNLOADING, Stage.UPLOADING, Stage.SAVING)
FINAL = (Stage.DONE, Stage.FAILED)


# KEYS: the prompt's stage hash. ARGV: fresh ("1": a new job, forget earlier ones), stage, since, attempt,
# ttl, then (stage, seconds in this run, epoch first entered) for each timed stage of the run.
_RECORD = """
if ARGV[1] == '1' then redis.call('del', KEYS[1]) end
redis.call('hset', KEYS[1], 'stage', ARGV[2], 'since', ARGV[3], 'attempt', ARGV[4])
for i = 6, #ARGV, 3 do
  redis.call('hincrbyfloat', KEYS[1], ARGV[i], ARGV[i + 1])
  redis.call('hsetnx', KEYS[1], ARGV[i] .. ':at', ARGV[i + 2])
end
redis.call('expire', KEYS[1], tonumber(ARGV[5]))
return 1
"""


@dataclass
class StageTiming:
    """Seconds spent in one stage (over all runs of a job) and when the job first entered it."""

    stage: Stage
    seconds: float
    started: float  # epoch


@dataclass
class StageView:
    """A job's current stage and its timings, as `inspect`, the API and the dashboard show them."""

    stage: Stage
    since: float  # epoch the current stage began
    timings: list[StageTiming] = field(default_factory=list)
    as_of: float | None = None  # for a running job: the epoch of the heartbeat it was read from


class StageClock:
    """The stages of one run, timed with the monotonic clock."""

    def __init__(self, queued_since: float) -> None:
        now = time.time()
        self.stage = Stage.QUEUED
        self.since = min(queued_since, now)
        self._entered = time.monotonic() - (now - self.since)
        self._seconds: dict[Stage, float] = {}
        self._first: dict[Stage, float] = {Stage.QUEUED: self.since}

    def enter(self, stage: Stage) -> None:
        if stage is self.stage:
            return
        now = time.monotonic()
        self._close(now)
        self.stage = stage
        self.since = time.time()
        self._entered = now
        self._first.setdefault(stage, self.since)

    def _close(self, now: float) -> None:
        if self.stage in TIMED:
            self._seconds[self.stage] = self._seconds.get(self.stage, 0.0) + now - self._entered

    def finish(self, stage: Stage) -> dict[Stage, float]:
        """End the run in `stage` (done, failed, or queued when the job goes back); returns the seconds per
        timed stage of this run."""
        self.enter(stage)
        if stage is Stage.QUEUED:
            # The run's last stretch in `queued` ends here: the next run counts its own wait.
            now = time.monotonic()
            self._close(now)
            self._entered = now
        return dict(self._seconds)

    def timings(self) -> list[StageTiming]:
        """This run's timings so far, the current stage included."""
        seconds = dict(self._seconds)
        if self.stage in TIMED:
            seconds[self.stage] = seconds.get(self.stage, 0.0) + time.monotonic() - self._entered
        return [StageTiming(stage, seconds[stage], self._first[stage]) for stage in TIMED if stage in seconds]

    def view(self) -> StageView:
        """The current stage and this run's timings (for the heartbeat)."""
        return StageView(self.stage, self.since, self.timings())


class StageLog:
    """The stage hashes in Redis: written once per run by the worker, read by the front ends."""

    def __init__(self, redis: Redis, keys: RedisKeys, ttl: int) -> None:
        self._redis = redis
        self._keys = keys
        self._ttl = ttl

    def add_record(
        self, pipe: Pipeline, prompt_id: str, clock: StageClock, seconds: dict[Stage, float], attempt: int, fresh: bool
    ) -> None:
        """Queue the write of one run's end on `pipe`, executed by the caller with its other writes (one run
        of a prompt at a time writes: the one holding its lease). `fresh`: the first run of a new job, which
        forgets the timings of the prompt's earlier jobs. One command (a script), whatever the stages."""
        first = {timing.stage: timing.started for timing in clock.timings()}
        args = ["1" if fresh else "0", clock.stage.value, str(clock.since), str(attempt), str(self._ttl)]
        for stage, spent in seconds.items():
            args.extend((stage.value, str(round(spent, 6)), str(first.get(stage, clock.since))))
        pipe.eval(_RECORD, 1, self._keys.stages(prompt_id), *args)

    async def read(self, prompt_id: str) -> StageView | None:
        raw: dict[bytes, bytes] = await self._redis.hgetall(self._keys.stages(prompt_id))  # type: ignore[misc]
        return parse_record(raw)


def parse_record(raw: dict[bytes, bytes]) -> StageView | None:
    """A stage hash as StageView; None when there is none (or it is unreadable)."""
    fields = {key.decode(): value.decode() for key, value in raw.items()}
    try:
        view = StageView(Stage(fields["stage"]), float(fields["since"]))
        for stage in TIMED:
            if stage.value in fields:
                started = float(fields.get(f"{stage.value}:at", view.since))
                view.timings.append(StageTiming(stage, float(fields[stage.value]), started))
    except (KeyError, ValueError):
        return None
    return view


def combine(recorded: StageView | None, live: StageView | None) -> StageView | None:
    """Earlier runs' timings plus the running one's: the current stage is the live one when a worker runs it."""
    if live is None:
        return recorded
    if recorded is not None and live.as_of is not None and recorded.since >= live.as_of:
        return recorded  # the run ended after its worker's last heartbeat
    if recorded is None or recorded.stage in FINAL:
        # A finished record belongs to an earlier job of the prompt; the running one started afresh.
        return live
    merged: dict[Stage, StageTiming] = {t.stage: StageTiming(t.stage, t.seconds, t.started) for t in recorded.timings}
    for timing in live.timings:
        if timing.stage in merged:
            merged[timing.stage].seconds += timing.seconds
        else:
            merged[timing.stage] = timing
    return StageView(live.stage, live.since, [merged[s] for s in TIMED if s in merged], as_of=live.as_of)
