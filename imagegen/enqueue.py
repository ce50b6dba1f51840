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
  queue scored by its enqueue time. A job key left without a queue entry makes arq refuse the id, and the
  script says `already queued` then, as `enqueue_job` would.

arq's `enqueue_job` costs a WATCH/MULTI round trip or two per job; this costs one script call per batch,
which is what lets `add-pending` queue tens of thousands of records a second. A batch of BATCH prompts holds
Redis for a few milliseconds.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix, job_key_prefix, result_key_prefix
from arq.jobs import serialize_job
from arq.utils import timestamp_ms

from .keys import RedisKeys
from .models import JOB_NAME

# Prompts per script call: large enough that round trips don't count, small enough not to hold Redis long.
BATCH = 1000

# KEYS: the queue, then per prompt: job, in-progress, lease, result, attempts, verdict.
# ARGV: enqueue time ms (the score), job expiry ms, "1" to drop verdicts (force), then per prompt: id, job.
# Returns per prompt 1 (queued) or 0 (it has a live job, or a job key arq would refuse to overwrite).
_ENQUEUE = """
local queue = KEYS[1]
local score, expires, force = ARGV[1], ARGV[2], ARGV[3] == '1'
local outcomes = {}
for i = 1, (#ARGV - 3) / 2 do
  local id, job = ARGV[2 + 2 * i], ARGV[3 + 2 * i]
  local k = 1 + 6 * (i - 1)
  local job_key = KEYS[k + 1]
  local queued = redis.call('zscore', queue, id) and redis.call('exists', job_key) == 1
  if queued or redis.call('exists', KEYS[k + 2]) == 1 or redis.call('exists', KEYS[k + 3]) == 1 then
    outcomes[i] = 0
  else
    redis.call('del', KEYS[k + 4], KEYS[k + 5])
    if force then redis.call('del', KEYS[k + 6]) end
    if redis.call('exists', job_key) == 1 then
      outcomes[i] = 0
    else
      redis.call('psetex', job_key, expires, job)
      redis.call('zadd', queue, score, id)
      outcomes[i] = 1
    end
  end
end
return outcomes
"""


class EnqueueOutcome(StrEnum):
    QUEUED = "queued"
    WOULD_QUEUE = "would queue"
    ALREADY_QUEUED = "already queued"
    ALREADY_DONE = "already done"
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

    def summary(self) -> str:
        return ", ".join(f"{n} {name}" for name, n in self.counts.items()) or "nothing to queue"


class JobQueue:
    """The jobs of one deployment's queue, as `add` and `add-pending` see them: live or not, and new ones."""

    def __init__(self, redis: ArqRedis, queue_name: str, keys: RedisKeys) -> None:
        self._redis = redis
        self._queue_name = queue_name
        self._keys = keys
        self._enqueue = redis.register_script(_ENQUEUE)

    async def live(self, prompt_ids: Sequence[str]) -> set[str]:
        """The prompts that have a live job: queued or deferred in arq, running there, or leased by a run.

        Read-only, one pipelined round trip."""
        if not prompt_ids:
            return set()
        async with self._redis.pipeline(transaction=False) as pipe:
            for prompt_id in prompt_ids:
                pipe.zscore(self._queue_name, prompt_id)
                pipe.exists(job_key_prefix + prompt_id)
                pipe.exists(in_progress_key_prefix + prompt_id)
                pipe.exists(self._keys.lease(prompt_id))
            flags = await pipe.execute()
        live = set()
        for index, prompt_id in enumerate(prompt_ids):
            score, has_job, running, leased = flags[4 * index : 4 * index + 4]
            if (score is not None and has_job) or running or leased:
                live.add(prompt_id)
        return live

    async def put(self, prompt_ids: Sequence[str], *, force: bool = False) -> list[bool]:
        """Queue a new run of each prompt without a live job; says per prompt whether it was queued."""
        queued: list[bool] = []
        for start in range(0, len(prompt_ids), BATCH):
            queued += await self._put_batch(prompt_ids[start : start + BATCH], force)
        return queued

    async def _put_batch(self, prompt_ids: Sequence[str], force: bool) -> list[bool]:
        if not prompt_ids:
            return []
        enqueue_time_ms = timestamp_ms()
        keys: list[str] = [self._queue_name]
        args: list[str | bytes | int] = [enqueue_time_ms, self._redis.expires_extra_ms, int(force)]
        serializer = self._redis.job_serializer
        for prompt_id in prompt_ids:
            keys += (
                job_key_prefix + prompt_id,
                in_progress_key_prefix + prompt_id,
                self._keys.lease(prompt_id),
                result_key_prefix + prompt_id,
                self._keys.attempts(prompt_id),
                self._keys.verdict(prompt_id),
            )
            job = serialize_job(JOB_NAME, (prompt_id, force), {}, None, enqueue_time_ms, serializer=serializer)
            args += (prompt_id, job)
        outcomes = await self._enqueue(keys=keys, args=args)
        return [bool(outcome) for outcome in outcomes]
