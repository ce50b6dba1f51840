"""Record states kept in Redis, for a collection with no status field (the old system's `prompt` + `imageUrl`).

There the collection can only say done (an image URL) or not, so what the status field would say otherwise
(`queued`, `processing`, `failed` and the error; the error alone for a collection with no error field) lives in
two Redis hashes of the queue, read onto each record
as it is read (see `PocketBaseClient`): add-pending leaves a failed record alone, retry-failed and the reconcile
sweep find theirs, and status, inspect, the dashboard and metrics show them. A record done is dropped from
them. Like the queue itself, they go with a Redis flush: every record without an image URL reads pending then.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import redis.asyncio as aioredis

from imagegen.models import RecordStatus

from .keys import RedisKeys


class RecordMarks:
    """The states of one deployment's records, by prompt id."""

    def __init__(self, redis: aioredis.Redis, keys: RedisKeys) -> None:
        self._redis = redis
        self._status = keys.record_status
        self._error = keys.record_error

    async def set(self, prompt_id: str, status: RecordStatus, error: str = "") -> None:
        """Remember a record's status and error; `done` (or pending) forgets them."""
        async with self._redis.pipeline(transaction=True) as pipe:
            if status in (RecordStatus.DONE, RecordStatus.PENDING):
                pipe.hdel(self._status, prompt_id)
            else:
                pipe.hset(self._status, prompt_id, status.value)
            if error and status not in (RecordStatus.DONE, RecordStatus.PENDING):
                pipe.hset(self._error, prompt_id, error)
            else:
                pipe.hdel(self._error, prompt_id)
            await pipe.execute()

    async def set_error(self, prompt_id: str, error: str) -> None:
        """Remember a record's error alone (a collection with a status field but no error field)."""
        if error:
            await self._redis.hset(self._error, prompt_id, error)  # type: ignore[misc]
        else:
            await self._redis.hdel(self._error, prompt_id)  # type: ignore[misc]

    async def forget(self, prompt_ids: list[str]) -> None:
        """Drop whatever is kept for these records (deleted from the collection)."""
        if prompt_ids:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hdel(self._status, *prompt_ids)
                pipe.hdel(self._error, *prompt_ids)
                await pipe.execute()

    async def read(self, prompt_ids: list[str]) -> dict[str, tuple[str, str]]:
        """The remembered (status, error) of each of these records that has either (an empty status: none)."""
        if not prompt_ids:
            return {}
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hmget(self._status, prompt_ids)
            pipe.hmget(self._error, prompt_ids)
            statuses, errors = await pipe.execute()
        return {
            prompt_id: ((status or b"").decode(), (error or b"").decode())
            for prompt_id, status, error in zip(prompt_ids, statuses, errors, strict=True)
            if status is not None or error is not None
        }

    async def ids(self, statuses: Iterable[RecordStatus]) -> list[str]:
        """The records in these statuses, in id order."""
        wanted = {s.value for s in statuses}
        found: dict[bytes, bytes] = await self._redis.hgetall(self._status)  # type: ignore[misc]
        return sorted(k.decode() for k, v in found.items() if v.decode() in wanted)

    async def counts(self) -> Counter[str]:
        """How many records are in each remembered status."""
        values: list[bytes] = await self._redis.hvals(self._status)  # type: ignore[misc]
        return Counter(v.decode() for v in values)
