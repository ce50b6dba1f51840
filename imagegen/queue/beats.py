"""What a worker's heartbeat says: one typed model, written by the worker (`heartbeat`) and read by every front
end (`status`, the API, the dashboard's lists, `inspect`'s live stage, the metrics).

A heartbeat is the only place that knows which jobs run right now: each worker lists its own, so the queue's
running and waiting counts are sums over a handful of heartbeats, never a look at every queued job. It is
parsed once where it is read (`QueueState.workers`); an entry that does not parse is left out with a line in
the debug log, as a worker that stopped beating would be.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from .stages import Stage, StageTiming, StageView


class LiveJob(BaseModel):
    """One job a worker runs, as its heartbeat describes it."""

    model_config = ConfigDict(extra="ignore")

    job: str
    phase: str  # a `runs.Phase` value
    since: float  # epoch the run began
    outage: str | None = None  # the service the run waits for
    stage: Stage
    stage_since: float
    stages: list[StageTiming] = Field(default_factory=list)  # the seconds in each stage so far

    def stage_view(self, seen: float) -> StageView:
        """The job's stage and timings as of the heartbeat written at `seen`."""
        return StageView(self.stage, self.stage_since, list(self.stages), as_of=seen)


class OutageSeen(BaseModel):
    """A service a worker waits for, since when, and the error that says so."""

    since: float
    error: str = ""


class WorkerBeat(BaseModel):
    """A live worker process: its jobs by phase, the outages it sees, and when it last beat."""

    model_config = ConfigDict(extra="ignore")

    id: str
    queue: str
    started: float
    running: list[str] = Field(default_factory=list)  # job ids, past waiting for a resume
    waiting: list[str] = Field(default_factory=list)  # job ids waiting for the paused queue to resume
    jobs: list[LiveJob] = Field(default_factory=list)
    outages: dict[str, OutageSeen] = Field(default_factory=dict)
    stopping: bool = False
    jobs_done: int = 0
    seen: float  # epoch of this heartbeat


__all__ = ["LiveJob", "OutageSeen", "WorkerBeat"]
