"""Every Redis key imagegen writes besides arq's own, in one place."""

from __future__ import annotations

PREFIX = "imagegen:"
PAUSE = f"{PREFIX}pause"
CONSECUTIVE_FAILURES = f"{PREFIX}consecutive-failures"
WORKER_PREFIX = f"{PREFIX}worker:"
RECONCILE_LOCK = f"{PREFIX}reconcile:lock"
# Records seen without a live job, with the time first seen: re-queued only when seen so twice.
RECONCILE_SUSPECTS = f"{PREFIX}reconcile:suspects"


def generation(prompt_id: str) -> str:
    """The remembered result of a paid generation for one prompt (links + what already landed)."""
    return f"{PREFIX}generation:{prompt_id}"


def attempts(prompt_id: str) -> str:
    """How many real attempts (not waits while paused) a prompt's current run has made."""
    return f"{PREFIX}attempts:{prompt_id}"


def lease(prompt_id: str) -> str:
    """The owner token of the run working on a prompt; expires unless its owner renews it."""
    return f"{PREFIX}lease:{prompt_id}"


def verdict(prompt_id: str) -> str:
    """A final outcome decided but not yet written to the record (the record store was down)."""
    return f"{PREFIX}verdict:{prompt_id}"


def worker(worker_id: str) -> str:
    """A live worker's heartbeat, expiring when it stops beating."""
    return f"{WORKER_PREFIX}{worker_id}"
