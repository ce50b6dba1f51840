"""The jobs a worker process is running right now, each with the phase it is in.

The phase decides what a stop does to a run: runs that have not reached their paid call (also those ready
and waiting for a generation slot) go back to the queue at once; a run inside its paid call is waited for; a
run storing images finishes (unless it only waits for an outage and its generation is already remembered,
then it too goes back at once). `imagegen status` shows the phases, so jobs that only wait for a resume are
reported as waiting, not in progress.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from imagegen.errors import JobInterrupted
from imagegen.queue.beats import LiveJob, TimingSeen
from imagegen.queue.lease import PromptLease
from imagegen.queue.stages import Stage, StageClock


class Phase(StrEnum):
    WAITING = "waiting"  # for a resume of the paused queue
    PREPARING = "preparing"  # reading the record, before the paid call
    READY = "ready"  # read and checked, waiting for a generation slot of the worker
    GENERATING = "generating"  # inside the paid call
    STORING = "storing"  # moving images into the bucket
    FINISHING = "finishing"  # writing the outcome


# The stage (`stages`) a phase is part of; storing is split into downloading and uploading by the transfer.
_STAGE_OF = {
    Phase.WAITING: Stage.QUEUED,
    Phase.PREPARING: Stage.QUEUED,
    Phase.READY: Stage.QUEUED,
    Phase.GENERATING: Stage.GENERATING,
    Phase.FINISHING: Stage.SAVING,
}


@dataclass(eq=False)
class JobRun:
    """One execution of one job."""

    job_id: str
    prompt_id: str
    lease: PromptLease
    task: asyncio.Task[Any]
    deadline: float  # event-loop time of the job's own deadline
    registry: Runs
    phase: Phase = Phase.PREPARING
    attempt: int = 0  # 0 until the run has begun an attempt
    outage: str | None = None  # the service this run is waiting for
    generation_saved: bool = False  # its paid generation is remembered in Redis
    committed: bool = False  # the record is marked done: nothing may mark it otherwise
    holds_call_slot: bool = False  # one of the worker's generation slots
    handed_back: bool = False  # its paid call returned and its arq job slot went to the next prompt
    interrupted: bool = False
    started: float = field(default_factory=time.time)
    clock: StageClock = field(default_factory=lambda: StageClock(time.time()))

    @property
    def interruptible(self) -> bool:
        """True when stopping now wastes nothing: no paid call in flight, no unremembered generation."""
        if self.phase in (Phase.WAITING, Phase.PREPARING, Phase.READY):
            return True
        return self.phase is Phase.STORING and self.outage is not None and self.generation_saved

    def remaining(self) -> float:
        """Seconds left before the job's own deadline."""
        return self.deadline - asyncio.get_running_loop().time()

    def enter(self, phase: Phase) -> None:
        self.set_phase(phase)
        self.check_stop()

    def set_phase(self, phase: Phase) -> None:
        if (phase is Phase.WAITING) != (self.phase is Phase.WAITING):
            self.registry.changed.set()  # it moves between waiting and running in the heartbeat's counts
        self.phase = phase
        stage = _STAGE_OF.get(phase)
        if stage is not None:
            self.clock.enter(stage)

    def check_stop(self) -> None:
        """Raise JobInterrupted when the worker is stopping and this run can go back to the queue."""
        if self.registry.stopping and self.interruptible:
            raise JobInterrupted("the worker is stopping; queued again")

    def interrupt(self) -> None:
        self.interrupted = True
        self.task.cancel()

    def describe(self) -> LiveJob:
        """The run as the worker's heartbeat shows it."""
        view = self.clock.view()
        return LiveJob(
            job=self.job_id,
            phase=self.phase.value,
            since=self.started,
            outage=self.outage,
            stage=view.stage,
            stage_since=view.since,
            stages=[TimingSeen(stage=t.stage, seconds=t.seconds, started=t.started) for t in view.timings],
        )


class Runs:
    """The runs of one worker process."""

    def __init__(self) -> None:
        self._runs: dict[str, JobRun] = {}
        self.stopping = False
        self.jobs_done = 0
        # Set when a run opens, closes or starts or stops waiting for a resume: the heartbeat then says so soon.
        self.changed = asyncio.Event()

    def open(
        self, job_id: str, prompt_id: str, lease: PromptLease, budget: float, queued_since: float | None = None
    ) -> JobRun:
        """A run of a job, timed from `queued_since` (epoch; by default now)."""
        task = asyncio.current_task()
        assert task is not None
        run = JobRun(job_id, prompt_id, lease, task, asyncio.get_running_loop().time() + budget, self)
        if queued_since is not None:
            run.clock = StageClock(queued_since)
        self._runs[job_id] = run
        self.changed.set()
        return run

    def close(self, run: JobRun) -> None:
        if self._runs.get(run.job_id) is run:
            del self._runs[run.job_id]
            self.changed.set()

    def __iter__(self) -> Iterator[JobRun]:
        return iter(list(self._runs.values()))

    def __len__(self) -> int:
        return len(self._runs)

    def stop(self) -> tuple[int, int]:
        """Begin a stop: interrupt every run that can go back to the queue; returns (sent back, still running)."""
        self.stopping = True
        sent_back = 0
        for run in self:
            if run.interruptible and not run.interrupted:
                run.interrupt()
                sent_back += 1
        return sent_back, len(self._runs) - sent_back
