"""A worker's view of the pause: cached briefly, and read once for a whole wave of runs that ask at once."""

from __future__ import annotations

import asyncio

from imagegen.queue.state import PauseGate, PauseInfo

from .conftest import queue_state


async def test_a_wave_of_runs_reads_the_pause_once_and_sees_a_change_after_invalidate(settings, redis_client):
    state = queue_state(settings, redis_client)
    await state.pause("rotating the API key")
    reads = 0
    read = state.paused

    async def counted() -> PauseInfo | None:
        nonlocal reads
        reads += 1
        return await read()

    state.paused = counted  # type: ignore[method-assign]
    gate = PauseGate(state)
    seen = await asyncio.gather(*(gate.current() for _ in range(50)))
    assert reads == 1
    assert {info.reason if info else None for info in seen} == {"rotating the API key"}

    await state.resume()
    gate.invalidate()
    assert await gate.current() is None
    assert reads == 2
