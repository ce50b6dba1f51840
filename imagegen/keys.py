"""Every Redis key imagegen writes besides arq's own, in one place."""

from __future__ import annotations

PREFIX = "imagegen:"


def generation(prompt_id: str) -> str:
    """The remembered result of a paid generation for one prompt (links + what already landed)."""
    return f"{PREFIX}generation:{prompt_id}"
