"""A worker process's pulse: its heartbeat key and the leases on the jobs it runs.

arq marks a running job with an in-progress key that lives `job_timeout + 10 s`, so a job of a killed
worker would wait that long before another worker may take it. Each job here shortens that key to a
short lease at start and this loop renews it while the process lives: a killed worker's jobs are picked
up within about LEASE_SECONDS.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from contextlib import suppress

from arq.constants import in_progress_key_prefix
from loguru import logger
from redis.asyncio import Redis
from redis.exceptions import RedisError

from .state import QueueState

LEASE_SECONDS = 20.0
BEAT_SECONDS = 5.0


class Heartbeat:
    """Renews job leases and the worker's heartbeat every BEAT_SECONDS."""

    def __init__(self, redis: Redis, state: QueueState, queue_name: str) -> None:
        self._redis = redis
        self._state = state
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}"
        self._queue_name = queue_name
        self._started = time.time()
        self.running: set[str] = set()
        self.jobs_done = 0
        self._task: asyncio.Task[None] | None = None
        self._redis_down = False

    async def take_lease(self, job_id: str) -> None:
        self.running.add(job_id)
        await self._redis.pexpire(in_progress_key_prefix + job_id, int(LEASE_SECONDS * 1000))

    def release(self, job_id: str) -> None:
        self.running.discard(job_id)

    async def beat(self) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            for job_id in self.running:
                pipe.pexpire(in_progress_key_prefix + job_id, int(LEASE_SECONDS * 1000))
            await pipe.execute()
        info = {
            "id": self.worker_id,
            "queue": self._queue_name,
            "started": self._started,
            "running": sorted(self.running),
            "jobs_done": self.jobs_done,
            "seen": time.time(),
        }
        await self._state.heartbeat(self.worker_id, info, ttl=BEAT_SECONDS * 3)

    async def _loop(self) -> None:
        while True:
            try:
                await self.beat()
                if self._redis_down:
                    logger.info("Redis is reachable again; carrying on")
                    self._redis_down = False
            except (RedisError, OSError) as exc:
                if not self._redis_down:
                    logger.warning("Redis unreachable ({}); retrying", type(exc).__name__)
                    self._redis_down = True
            await asyncio.sleep(BEAT_SECONDS)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="imagegen-heartbeat")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with suppress(RedisError, OSError):
            await self._state.stop_heartbeat(self.worker_id)
