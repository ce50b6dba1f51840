"""Putting prompt jobs into arq's queue, a whole batch of prompts in one Redis round trip.

Job id = prompt id, so a prompt has at most one job. One Lua script per batch checks each prompt and writes
its job atomically, so neither a concurrent `add-pending` nor a worker can slip a second job in between:

- a prompt with a live job is left alone (`already queued`): queued or deferred (in arq's queue with its job
  key), running (arq's in-progress key) or held by a run (our lease, which outlives arq's marks);
- otherwise it gets a new run: a finished job's result goes (arq refuses an id that still has one), the
  attempts of an earlier run go (the new run has all of its own), and with `force` a failed outcome still
  waiting to be written goes too;
- then the job is written exactly as arq's `ArqRedis.enqueue_job` writes it: the job pickled by arq's own
  `serialize_job` under `arq:job:<id>`, expiring after the pool's `expires_extra_ms`, and the id in the
  queue scored by its enqueue time, shifted by its priority (see `priority`; a priority other than 0 is
  also kept in the prompt's priority key, for a retry to come back to). A job key left without a queue
  entry makes arq refuse the id, and the script says `already queued` then, as `enqueue_job` would.

arq's `enqueue_job` costs a WATCH/MULTI round trip or two per job; this costs one script call per batch,
which is what lets `add-pending` queue tens of thousands of records a second. A batch of BATCH prompts holds
Redis for about ten milliseconds. A dry run and the reconcile sweep ask the same question, live or not, with
a second script that only reads.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix, job_key_prefix, result_key_prefix
from arq.jobs import serialize_job
from arq.utils import timestamp_ms

from imagegen.models import JOB_NAME

from .keys import RedisKeys
from .priority import LUA_SHIFTED

# Prompts per script call: large enough that round trips don't count, small enough not to hold Redis long.
BATCH = 1000

# Both scripts take the queue as KEYS[1] and the key prefixes as ARGV[1..7] (job, in-progress, lease, result,
# attempts, verdict, priority: each key is its prefix followed by the prompt id) and build each prompt's keys
# from them.
# Declaring six keys per prompt instead made encoding the call cost more than running it; and since the keys
# of one prompt fall in different Redis Cluster slots anyway, declaring them would buy nothing.
_PREFIXES = 7
_LIVE = """
local queue = KEYS[1]
local function live(id)
  return (redis.call('zscore', queue, id) and redis.call('exists', ARGV[1] .. id) == 1)
    or redis.call('exists', ARGV[2] .. id) == 1 or redis.call('exists', ARGV[3] .. id) == 1
end
"""

# Then ARGV: the ids. Returns per prompt 1 (it has a live job) or 0. Reads only.
_READ_LIVE = (
    _LIVE
    + """
local found = {}
for i = 8, #ARGV do found[i - 7] = live(ARGV[i]) and 1 or 0 end
return found
"""
)

# Then ARGV: enqueue time ms, job expiry ms, "1" to drop verdicts (force), then per prompt: id, job, priority.
# Returns per prompt 1 (queued) or 0 (it has a live job, or a job key arq would refuse to overwrite).
_ENQUEUE = (
    _LIVE
    + LUA_SHIFTED
    + """
local now, expires, force = tonumber(ARGV[8]), ARGV[9], ARGV[10] == '1'
local outcomes = {}
for i = 1, (#ARGV - 10) / 3 do
  local id, job, priority = ARGV[8 + 3 * i], ARGV[9 + 3 * i], ARGV[10 + 3 * i]
  local job_key = ARGV[1] .. id
  if live(id) then
    outcomes[i] = 0
  else
    redis.call('del', ARGV[4] .. id, ARGV[5] .. id, ARGV[7] .. id)
    if force then redis.call('del', ARGV[6] .. id) end
    if redis.call('exists', job_key) == 1 then
      outcomes[i] = 0
    else
      redis.call('psetex', job_key, expires, job)
      redis.call('zadd', queue, shifted(now, tonumber(priority)), id)
      if priority ~= '0' then redis.call('psetex', ARGV[7] .. id, expires, priority) end
      outcomes[i] = 1
    end
  end
end
return outcomes
"""
)


async def announce(redis: ArqRedis, keys: RedisKeys) -> None:
    """Tell idle workers of this queue that jobs were queued (`intake` listens)."""
    await redis.publish(keys.wake, b"1")


class EnqueueOutcome(StrEnum):
    QUEUED = "queued"
    WOULD_QUEUE = "would queue"
    ALREADY_QUEUED = "already queued"
    ALREADY_DONE = "already done"
    NOT_PENDING = "not pending"  # the watch: a record no longer pending when read again
    NOT_FOUND = "not found"
    INVALID = "invalid id"
    ERROR = "error"


# Outcomes that mean a prompt could not be queued as asked (the commands exit 1).
BAD_OUTCOMES = frozenset({EnqueueOutcome.NOT_FOUND, EnqueueOutcome.INVALID, EnqueueOutcome.ERROR})


@dataclass(frozen=True)
class EnqueueReport:
    prompt_id: str
    outcome: EnqueueOutcome
    detail: str = ""

    def to_json(self) -> dict[str, str]:
        return {"id": self.prompt_id, "outcome": self.outcome.value, "detail": self.detail}


@dataclass
class EnqueueTally:
    """How many prompts ended in each outcome, counted as reports stream by (in the order first seen)."""

    counts: dict[str, int] = field(default_factory=dict)

    def add(self, reports: Iterable[EnqueueReport]) -> None:
        for report in reports:
            self.counts[report.outcome.value] = self.counts.get(report.outcome.value, 0) + 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def any_bad(self) -> bool:
        return any(self.counts.get(outcome.value) for outcome in BAD_OUTCOMES)

    def to_json(self, reports: Iterable[EnqueueReport] | None = None) -> dict[str, Any]:
        """The counts, and the given reports one by one (what `--json` and the web API print)."""
        data: dict[str, Any] = {"counts": self.counts}
        return data if reports is None else {"results": [r.to_json() for r in reports], **data}

    async def add_pages(self, pages: AsyncIterator[list[EnqueueReport]]) -> EnqueueTally:
        """Count every page of a bulk enqueue; nothing but the counts is kept."""
        async for page in pages:
            self.add(page)
        return self

    def summary(self) -> str:
        return ", ".join(f"{n} {name}" for name, n in self.counts.items()) or "nothing to queue"


class JobQueue:
    """The jobs of one deployment's queue, as `add` and `add-pending` see them: live or not, and new ones."""

    def __init__(self, redis: ArqRedis, queue_name: str, keys: RedisKeys) -> None:
        self._redis = redis
        self._queue_name = queue_name
        self._keys = keys
        prefixes = (
            job_key_prefix,
            in_progress_key_prefix,
            keys.lease(""),
            result_key_prefix,
            keys.attempts(""),
            keys.verdict(""),
            keys.priority(""),
        )
        assert len(prefixes) == _PREFIXES
        self._prefixes: list[str | bytes | int] = list(prefixes)
        self._read_live = redis.register_script(_READ_LIVE)
        self._enqueue = redis.register_script(_ENQUEUE)

    async def live(self, prompt_ids: Sequence[str]) -> set[str]:
        """The prompts that have a live job: queued or deferred in arq, running there, or leased by a run.

        Reads only; one round trip per BATCH prompts."""
        live: set[str] = set()
        for start in range(0, len(prompt_ids), BATCH):
            batch = prompt_ids[start : start + BATCH]
            found = await self._read_live(keys=[self._queue_name], args=[*self._prefixes, *batch])
            live.update(prompt_id for prompt_id, flag in zip(batch, found, strict=True) if flag)
        return live

    async def put(
        self, prompt_ids: Sequence[str], *, force: bool = False, priorities: Mapping[str, int] | None = None
    ) -> list[bool]:
        """Queue a new run of each prompt without a live job; says per prompt whether it was queued.

        `priorities` gives a prompt's priority (checked already, see `priority`; absent: 0). A prompt with a
        live job keeps the priority it was queued with. Idle workers are told at once (one message per batch
        that queued anything)."""
        queued: list[bool] = []
        for start in range(0, len(prompt_ids), BATCH):
            batch = await self._put_batch(prompt_ids[start : start + BATCH], force, priorities or {})
            if any(batch):
                await announce(self._redis, self._keys)
            queued += batch
        return queued

    async def _put_batch(self, prompt_ids: Sequence[str], force: bool, priorities: Mapping[str, int]) -> list[bool]:
        if not prompt_ids:
            return []
        enqueue_time_ms = timestamp_ms()
        args = [*self._prefixes, enqueue_time_ms, self._redis.expires_extra_ms, int(force)]
        serializer = self._redis.job_serializer
        for prompt_id in prompt_ids:
            job = serialize_job(JOB_NAME, (prompt_id, force), {}, None, enqueue_time_ms, serializer=serializer)
            args += (prompt_id, job, priorities.get(prompt_id, 0))
        outcomes = await self._enqueue(keys=[self._queue_name], args=args)
        return [bool(outcome) for outcome in outcomes]
