"""A step a worker repeats in the background for its whole life (the heartbeat, the reconcile sweep)."""

from __future__ import annotations

import asyncio
from contextlib import suppress

from loguru import logger

from imagegen.errors import ImagegenError

from .outages import outage_service


async def cancel_and_wait(task: asyncio.Task[None] | None) -> None:
    """Cancel a background task and wait until it has ended (its cancellation swallowed)."""
    if task is not None:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task


class Periodic:
    """Runs `step()` every `interval` seconds in a task of its own.

    A step failing for an expected reason (a service down) logs one line when it starts failing and one when
    it works again; anything else is a bug and is logged with its traceback. Neither stops the loop.
    """

    name = "periodic step"

    def __init__(self, interval: float, *, first_delay: float = 0.0) -> None:
        self._interval = interval
        self._first_delay = first_delay
        self._task: asyncio.Task[None] | None = None
        self._failing = False
        self.last_success: float | None = None  # event-loop time the step last worked

    async def step(self) -> None:
        raise NotImplementedError

    async def _loop(self) -> None:
        await asyncio.sleep(self._first_delay)
        while True:
            try:
                await self.step()
            except Exception as exc:
                if outage_service(exc) is None and not isinstance(exc, ImagegenError):
                    logger.opt(exception=exc).error("{} failed: {}", self.name, exc)
                elif not self._failing:
                    logger.warning("{} failed ({}: {}); trying again", self.name, type(exc).__name__, exc)
                self._failing = True
            else:
                self.last_success = asyncio.get_running_loop().time()
                if self._failing:
                    logger.info("{} works again", self.name)
                self._failing = False
            await asyncio.sleep(self._interval)

    @property
    def interval(self) -> float:
        return self._interval

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=f"imagegen-{self.name}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)
