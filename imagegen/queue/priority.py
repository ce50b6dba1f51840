"""Job priorities: higher runs first, first in first out within one priority, on every worker.

arq keeps its queue in a sorted set scored in milliseconds: a job is due when its score is at most the
current time, and every worker takes due jobs lowest score first (our pick script, `intake`, does the
same). So the priority goes into the score, and no worker needs to know more than the order of the set:

    score = time due (ms) - (priority - PRIORITY_MIN + 1) * BAND

BAND (4e12 ms, about 127 years) is more than the Unix time in ms until 2096, so every job we queue has a
negative score (due: always at most now), one band per priority, higher priorities further down. Two jobs
differ by at least a whole band across priorities and by their times within one, so the set sorts by
priority first and then by time: first in first out. Ties (one bulk script queues a page at one instant)
fall back to the id, the order the page was read in. Scores stay below 2**53 (2001 bands), so Redis and Lua
hold them exactly.

Deferred jobs keep arq's own scores: a retry after a backoff is re-scored by arq to `now + defer`, a plain
time in the future, so it stays not due until then and `status`, `inspect` and the web listing read its
time as they always did. When such a score comes due (0 <= score <= now, which no job of ours has) the pick
script moves it back into the band of its priority, read from the prompt's priority key (written with the
job, kept as long as arq keeps the job), before it picks anything: a retried job keeps its priority, and
waits behind the jobs of that priority that were due before it. Jobs queued by arq's own `enqueue_job`
(an older imagegen, a benchmark baseline) carry plain times too and join priority 0 the same way.
"""

from __future__ import annotations

import re

PRIORITY_MIN = -1000
PRIORITY_MAX = 1000
BAND = 4_000_000_000_000
PRIORITY_RULE = f"must be a whole number from {PRIORITY_MIN} to {PRIORITY_MAX} (higher runs first)"

# The score of a job due at `ms` with priority `p`, in Lua for the scripts (`enqueue`, `intake`).
LUA_SHIFTED = f"""
local function shifted(ms, p)
  return ms - (p - ({PRIORITY_MIN}) + 1) * {BAND}
end
"""

_INTEGER = re.compile(r"[+-]?\d+")


def check_priority(value: object) -> int:
    """A priority as an int, from an int, a whole float (PocketBase number fields) or a numeric string;
    ValueError saying what a priority may be otherwise. None and an empty string mean 0."""
    if value is None or value == "":
        return 0
    if isinstance(value, bool):
        raise ValueError(PRIORITY_RULE)
    number: int
    if isinstance(value, int):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, str) and _INTEGER.fullmatch(value.strip()):
        number = int(value.strip())
    else:
        raise ValueError(PRIORITY_RULE)
    if not PRIORITY_MIN <= number <= PRIORITY_MAX:
        raise ValueError(PRIORITY_RULE)
    return number


def queue_score(due_ms: int, priority: int) -> int:
    """The queue score of a job due at `due_ms` (Unix ms) with this priority."""
    return due_ms - (priority - PRIORITY_MIN + 1) * BAND


def is_shifted(score: float) -> bool:
    """Whether a queue score carries a priority (negative), rather than arq's plain time."""
    return score < 0


def due_ms(score: float) -> int:
    """When a job with this score became (or becomes) due, in Unix ms."""
    return int(score % BAND) if is_shifted(score) else int(score)


def priority_of(score: float) -> int | None:
    """The priority a shifted score carries; None for arq's plain time (a deferred job: see its key)."""
    if not is_shifted(score):
        return None
    return int(-(score // BAND)) + PRIORITY_MIN - 1
