"""A worker process's capacity: paid calls, image transfers, and the arq jobs it holds.

The API's concurrency is what the account pays for and is limited by, so it never waits on our own work:

- QUEUE_CONCURRENCY *generation slots*: a run holds one from its last checks before the paid call until the
  call returns, and not a moment longer; a call that failed keeps its slot until the job's outcome is decided,
  because that decision may pause the queue (an account error, the QUEUE_MAX_FAILED-th failure in a row)
  and the next prompt must not pay before it;
- STORE_CONCURRENCY *transfer slots*: each image download -> upload holds one; they bound the memory of
  storing (one upload part per transfer) and are shared by every job of the process;
- arq runs up to 2 x QUEUE_CONCURRENCY jobs: as many in their call as there are slots, and as many read and
  ready to call the moment a slot frees. A job whose call returned *hands back* its arq job slot, so arq takes
  the next prompt at once while that job stores its images (or waits for a transfer slot), up to
  STORE_BACKLOG such jobs per process; past that, a finished generation keeps its job slot and new calls wait
  for storing to catch up, so a slow bucket can't pile up links that expire.

Handing back goes through the worker's `JobRoom` (`arqworker.ImagegenWorker` raises arq's job limit by one per
job storing and lowers it when that job ends); slots know nothing else of arq.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Protocol

from .runs import JobRun


class JobRoom(Protocol):
    """The worker's count of jobs it may hold at once, which a job storing its images lends back."""

    def lend_job_slot(self) -> None:
        """One more job may start now (and the worker looks for one at once)."""

    def return_job_slot(self) -> None:
        """A job that had lent its slot ended: the worker's limit goes back down by one."""


class Slots:
    """The generation and transfer slots of one worker process, and its arq job slots when attached."""

    def __init__(self, generations: int, transfers: int, backlog: int) -> None:
        self._backlog = backlog
        self._calls = asyncio.Semaphore(generations)
        self._transfers = asyncio.Semaphore(transfers)
        self._room: JobRoom | None = None
        self.storing = 0  # jobs that handed back their arq slot and are storing

    @staticmethod
    def arq_jobs(generations: int) -> int:
        """arq's `max_jobs` for a worker: the jobs in their call and as many ready to take a freed slot."""
        return 2 * generations

    def attach(self, room: JobRoom) -> None:
        """Let finished generations hand back their job slots to this worker."""
        self._room = room

    async def take_call_slot(self, run: JobRun) -> None:
        """Wait for a generation slot; the run holds it until `free_call_slot` or the end of its job."""
        await self._calls.acquire()
        run.holds_call_slot = True

    def free_call_slot(self, run: JobRun) -> None:
        if run.holds_call_slot:
            run.holds_call_slot = False
            self._calls.release()

    @asynccontextmanager
    async def transfer(self) -> AsyncIterator[None]:
        """Hold a transfer slot for one image download -> upload."""
        async with self._transfers:
            yield

    def hand_back(self, run: JobRun) -> None:
        """The run's paid call returned: let arq take another job now, unless storing is already at its limit."""
        if self._room is None or run.handed_back or self.storing >= self._backlog:
            return
        run.handed_back = True
        self.storing += 1
        self._room.lend_job_slot()

    def job_ended(self, run: JobRun) -> None:
        """The run's job is over, its outcome decided: free whatever it still holds."""
        self.free_call_slot(run)
        if self._room is None or not run.handed_back:
            return
        run.handed_back = False
        self.storing -= 1
        self._room.return_job_slot()
