"""Outcomes queued for the next calls of a prompt (or of any prompt), shared by the jimeng and Ark sandboxes."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

ANY_PROMPT = "*"


class OutcomeScripts:
    """A queue of outcomes per prompt; safe to fill from the test's thread while the server takes from it."""

    def __init__(self, is_known: Callable[[str], bool], sandbox: str) -> None:
        self._is_known = is_known
        self._sandbox = sandbox
        self._lock = threading.Lock()
        self._queues: dict[str, deque[str]] = {}

    def add(self, prompt: str, outcomes: list[str]) -> None:
        """Queue outcomes for the next calls with this prompt (ANY_PROMPT: any); ValueError for unknown ones."""
        unknown = [o for o in outcomes if not self._is_known(o)]
        if unknown:
            raise ValueError(f"unknown {self._sandbox} outcomes: {unknown}")
        with self._lock:
            self._queues.setdefault(prompt, deque()).extend(outcomes)

    def take(self, prompt: str) -> str | None:
        """The next outcome queued for this prompt, else for any prompt, else None."""
        with self._lock:
            for key in (prompt, ANY_PROMPT):
                queue = self._queues.get(key)
                if queue:
                    return queue.popleft()
        return None

    def clear(self) -> None:
        with self._lock:
            self._queues.clear()
