"""Every Redis key imagegen writes besides arq's own, derived from the queue name.

Deployments that share one Redis keep apart by QUEUE_NAME: the pause, the failure streak, the live-worker
list, attempts, leases, verdicts and remembered generations all live under a prefix of their queue. The
default queue keeps the plain `imagegen:` prefix. arq's own job keys (`arq:job:<id>` and the like) are global
to the Redis database, so deployments that also share a PocketBase collection need different REDIS_DB.

A prompt's keys are a prefix followed by the prompt id, nothing after it: the enqueue scripts (enqueue.py)
build them in Redis from the prefix.
"""

from __future__ import annotations

DEFAULT_QUEUE = "imagegen:queue"


class RedisKeys:
    """The keys of one deployment (one queue)."""

    def __init__(self, queue_name: str) -> None:
        self.prefix = "imagegen:" if queue_name == DEFAULT_QUEUE else f"imagegen:{queue_name}:"
        self.pause = f"{self.prefix}pause"
        self.consecutive_failures = f"{self.prefix}consecutive-failures"
        self.reconcile_lock = f"{self.prefix}reconcile:lock"
        # Records seen without a live job, with the time first seen: re-queued only when seen so twice.
        self.reconcile_suspects = f"{self.prefix}reconcile:suspects"
        # Permits of jimeng calls in flight across every worker (JIMENG_MAX_INFLIGHT), scored by expiry.
        self.inflight_calls = f"{self.prefix}jimeng:inflight"
        # Start times of the jimeng calls of the last minute (JIMENG_RATE_LIMIT).
        self.call_window = f"{self.prefix}jimeng:calls"
        # Jobs that ended done or failed since the queue began, by outcome (a hash; Prometheus counters).
        self.outcome_totals = f"{self.prefix}outcomes:total"
        # Pub/sub channel: a message on it wakes idle workers when jobs were queued.
        self.wake = f"{self.prefix}wake"
        # The owner token of the one worker holding the PocketBase subscription (POCKETBASE_WATCH).
        self.watch_lease = f"{self.prefix}watch:lease"
        # When a worker of this queue last beat (never expires): `status` warns about a queue none ever used.
        self.worker_seen = f"{self.prefix}worker-seen"
        # The live workers' ids, scored by when their heartbeat expires: read instead of scanning for them.
        self.worker_index = f"{self.prefix}workers"
        # The records' counts by status, shared by every viewer for RECORD_COUNTS_MAX_AGE seconds, and the
        # lock of the one viewer counting them meanwhile (`record_counts`).
        self.record_counts = f"{self.prefix}records:counts"
        self.record_counts_lock = f"{self.prefix}records:counts:lock"
        # A collection with no status field: each record's `queued`/`processing`/`failed` and its error (hashes
        # by prompt id; `marks`).
        self.record_status = f"{self.prefix}records:status"
        self.record_error = f"{self.prefix}records:error"

    def generation(self, prompt_id: str) -> str:
        """The remembered result of a paid generation for one prompt (links + what already landed)."""
        return f"{self.prefix}generation:{prompt_id}"

    def attempts(self, prompt_id: str) -> str:
        """How many real attempts (not waits while paused) a prompt's current run has made."""
        return f"{self.prefix}attempts:{prompt_id}"

    def priority(self, prompt_id: str) -> str:
        """The priority of a prompt's queued job (absent: 0), kept as long as arq keeps the job; a retry that
        comes due goes back to the band of this priority (see `priority`)."""
        return f"{self.prefix}priority:{prompt_id}"

    def lease(self, prompt_id: str) -> str:
        """The owner token of the run working on a prompt; expires unless its owner renews it."""
        return f"{self.prefix}lease:{prompt_id}"

    def verdict(self, prompt_id: str) -> str:
        """A final outcome decided but not yet written to the record (the record store was down)."""
        return f"{self.prefix}verdict:{prompt_id}"

    def stages(self, prompt_id: str) -> str:
        """A prompt's current stage and the seconds its job spent in each stage (`stages`)."""
        return f"{self.prefix}stages:{prompt_id}"

    def outcomes(self, minute: int) -> str:
        """Counts of jobs that ended done or failed in one minute (minutes since the epoch), for throughput."""
        return f"{self.prefix}outcomes:{minute}"

    def spend(self, day: str, provider: str) -> str:
        """The paid calls of one provider's day (YYYY-MM-DD in JIMENG_DAILY_LIMIT_TZ), by outcome and account (a
        hash; `spend`); its reserved calls are the set at this name plus `:reserved`. jimeng's keep the name they
        had before there were other providers."""
        return f"{self.prefix}spend:{day}" if provider == "jimeng" else f"{self.prefix}spend:{day}:{provider}"

    def worker(self, worker_id: str) -> str:
        """A live worker's heartbeat, expiring when it stops beating."""
        return f"{self.prefix}worker:{worker_id}"
