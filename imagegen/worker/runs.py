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
from imagegen.queue.beats import LiveJob
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
    """One execution of one job. Its state changes only through the methods below, each named for the event
    that changes it; the other modules read it through the properties."""

    job_id: str
    prompt_id: str
    lease: PromptLease
    task: asyncio.Task[Any]
    deadline: float  # event-loop time of the job's own deadline
    registry: Runs
    started: float = field(default_factory=time.time)
    clock: StageClock = field(default_factory=lambda: StageClock(time.time()))
    _phase: Phase = Phase.PREPARING
    _attempt: int = 0  # 0 until the run has begun an attempt
    _outage: str | None = None  # the service this run is waiting for
    _generation_saved: bool = False  # its paid generation is remembered in Redis
    _committed: bool = False  # the record is marked done: nothing may mark it otherwise
    _holds_call_slot: bool = False  # one of the worker's generation slots
    _handed_back: bool = False  # its paid call returned and its arq job slot went to the next prompt
    _interrupted: bool = False

    @property
    def phase(self) -> Phase:
        return self._phase

    @property
    def attempt(self) -> int:
        return self._attempt

    @property
    def outage(self) -> str | None:
        return self._outage

    @property
    def generation_saved(self) -> bool:
        return self._generation_saved

    @property
    def committed(self) -> bool:
        return self._committed

    @property
    def holds_call_slot(self) -> bool:
        return self._holds_call_slot

    @property
    def handed_back(self) -> bool:
        return self._handed_back

    @property
    def interrupted(self) -> bool:
        return self._interrupted

    def began_attempt(self, attempt: int) -> None:
        """The attempt this run counts as (`QueueState.begin_attempt`)."""
        self._attempt = attempt

    def gave_back_attempt(self) -> None:
        """Its attempt was handed back: the run used none."""
        self._attempt = 0

    def waits_for(self, service: str) -> None:
        self._outage = service

    def service_back(self) -> str | None:
        """The service it waited for answers again; returns which (None: it waited for none)."""
        service, self._outage = self._outage, None
        return service

    def generation_remembered(self, saved: bool = True) -> None:
        """Its paid generation is remembered in Redis (False: forgotten, to pay again for expired links)."""
        self._generation_saved = saved

    def commit(self) -> None:
        """The record is marked done: from now on nothing may mark it otherwise."""
        self._committed = True

    def took_call_slot(self) -> None:
        self._holds_call_slot = True

    def freed_call_slot(self) -> bool:
        """Lets go of its generation slot; True when it held one."""
        held, self._holds_call_slot = self._holds_call_slot, False
        return held

    def lent_job_slot(self) -> None:
        self._handed_back = True

    def job_slot_returned(self) -> bool:
        """Its lent arq job slot is taken back; True when it had lent one."""
        lent, self._handed_back = self._handed_back, False
        return lent

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
        if (phase is Phase.WAITING) != (self._phase is Phase.WAITING):
            self.registry.changed.set()  # it moves between waiting and running in the heartbeat's counts
        self._phase = phase
        stage = _STAGE_OF.get(phase)
        if stage is not None:
            self.clock.enter(stage)

    def check_stop(self) -> None:
        """Raise JobInterrupted when the worker is stopping and this run can go back to the queue."""
        if self.registry.stopping and self.interruptible:
            raise JobInterrupted("the worker is stopping; queued again")

    def interrupt(self) -> None:
        self._interrupted = True
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
            stages=view.timings,
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
