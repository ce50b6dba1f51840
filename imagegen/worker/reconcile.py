"""Finding records left `queued` or `processing` with no live job, and queueing them again.

Jobs can vanish under a record: Redis flushed or restarted without persistence, a write lost while Redis
refused it, arq giving up on a job. Every RECONCILE_INTERVAL seconds one worker (a Redis lock decides which)
pages through the records marked `queued` or `processing` (in the collection, or in Redis for a collection
with no status field, see `marks`), by id and 500 at a time, and checks each page's
jobs in one Redis round trip. A record with no live job is queued again once an earlier sweep, at least
WORKER_LEASE seconds before, found it without one too: a run still working on it after a flush takes its
lease back within a quarter of that, so a running prompt is never started twice. No manual command is
needed after a flush, a crash or a lost write; a stranded record waits at most about two intervals.

The same sweep frees jobs that arq marked in progress on a worker that died before the job could take its
lease (a window of milliseconds at job start): arq's mark would otherwise hold them for QUEUE_JOB_TIMEOUT.
A mark with no lease that still outlives a lease period on the next sweep is removed, and arq starts the
job again. These marks are found in Redis, not through the records: a record queued in bulk still reads
`pending` then. SCAN walks the keyspace a thousand keys per call (a hundred quick calls for 100,000 queued
jobs), and a mark whose job is not in this deployment's queue is left alone.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from arq.constants import in_progress_key_prefix
from loguru import logger

from imagegen.models import RecordStatus
from imagegen.ops.control import Control, EnqueueOutcome
from imagegen.ops.record_states import iter_status

from .periodic import Periodic

PAGE = 500
UNCLAIMED = "unclaimed:"

# KEYS: arq in-progress key, lease; ARGV: lease ms. Removes arq's mark of a job nobody holds a lease on.
_FREE_UNCLAIMED = """
if redis.call('exists', KEYS[2]) == 0 and redis.call('pttl', KEYS[1]) > tonumber(ARGV[1]) then
  return redis.call('del', KEYS[1])
end
return 0
"""


class Reconciler(Periodic):
    """The periodic sweep of one worker process."""

    name = "reconcile sweep"

    def __init__(self, control: Control, interval: float, grace: float, worker_id: str) -> None:
        super().__init__(interval, first_delay=interval)
        self._control = control
        self._grace = grace
        self._worker_id = worker_id
        self._free_unclaimed = control.redis.register_script(_FREE_UNCLAIMED)

    async def step(self) -> None:
        await self.sweep()

    async def sweep(self) -> list[str]:
        """One sweep; returns the ids queued again (none when another worker holds this round)."""
        redis = self._control.redis
        lock_ms = max(1, int(self._interval * 900))
        if not await redis.set(self._control.keys.reconcile_lock, self._worker_id, nx=True, px=lock_ms):
            return []
        now = time.time()
        raw: dict[bytes, bytes] = await redis.hgetall(self._control.keys.reconcile_suspects)  # type: ignore[misc]
        seen = {k.decode(): float(v) for k, v in raw.items()}
        suspects = {suspect: seen.get(suspect, now) async for suspect in self._suspects()}
        due = [suspect for suspect, first in suspects.items() if now - first >= self._grace]
        async with redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._control.keys.reconcile_suspects)
            waiting = {k: v for k, v in suspects.items() if k not in due}
            if waiting:
                pipe.hset(self._control.keys.reconcile_suspects, mapping=waiting)
                pipe.expire(self._control.keys.reconcile_suspects, int(self._interval * 10) + int(self._grace) + 60)
            await pipe.execute()
        return await self._act(due)

    async def _suspects(self) -> AsyncIterator[str]:
        """Records with no live job (by id), and jobs claimed by no run (prefixed UNCLAIMED)."""
        pages = iter_status(self._control.pocketbase, RecordStatus.QUEUED, RecordStatus.PROCESSING, page_size=PAGE)
        async for page in pages:
            ids = [record.id for record in page]
            live = await self._control.live_ids(ids)
            for prompt_id in ids:
                if prompt_id not in live:
                    yield prompt_id
        for prompt_id in await self._unclaimed(await self._marked_running()):
            yield UNCLAIMED + prompt_id

    async def _marked_running(self) -> list[str]:
        """The jobs of this queue that arq marks in progress, whatever their records say."""
        redis = self._control.redis
        pattern = in_progress_key_prefix + "*"
        marked = [
            key.decode().removeprefix(in_progress_key_prefix)
            async for key in redis.scan_iter(match=pattern, count=1000)
        ]
        if not marked:
            return []
        async with redis.pipeline(transaction=False) as pipe:
            for prompt_id in marked:
                pipe.zscore(self._control.settings.queue_name, prompt_id)
            scores = await pipe.execute()
        return [prompt_id for prompt_id, score in zip(marked, scores, strict=True) if score is not None]

    async def _act(self, due: list[str]) -> list[str]:
        queued, freed = [], []
        for suspect in due:
            if suspect.startswith(UNCLAIMED):
                prompt_id = suspect.removeprefix(UNCLAIMED)
                job_keys = [in_progress_key_prefix + prompt_id, self._control.keys.lease(prompt_id)]
                if await self._free_unclaimed(keys=job_keys, args=[self._lease_ms]):
                    freed.append(prompt_id)
                continue
            report = await self._control.enqueue(suspect)
            if report.outcome is EnqueueOutcome.QUEUED:
                queued.append(suspect)
        if freed:
            logger.warning("freed {} jobs a worker died holding as they started: {}", len(freed), ", ".join(freed))
        if queued:
            shown = ", ".join(queued[:10]) + (" ..." if len(queued) > 10 else "")
            logger.warning("queued again {} records left queued/processing without a job: {}", len(queued), shown)
        return queued

    @property
    def _lease_ms(self) -> int:
        return int(self._grace * 1000)

    async def _unclaimed(self, prompt_ids: list[str]) -> list[str]:
        """Jobs arq marks in progress for longer than a lease, with no run holding the prompt's lease."""
        if not prompt_ids:
            return []
        redis = self._control.redis
        async with redis.pipeline(transaction=False) as pipe:
            for prompt_id in prompt_ids:
                pipe.pttl(in_progress_key_prefix + prompt_id)
                pipe.exists(self._control.keys.lease(prompt_id))
            flags = await pipe.execute()
        return [
            prompt_id
            for index, prompt_id in enumerate(prompt_ids)
            if flags[2 * index] > self._lease_ms and not flags[2 * index + 1]
        ]
