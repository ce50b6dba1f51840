"""What a fake API saw, per prompt, shared by the jimeng and Ark sandboxes: what tests and the demo count."""

from __future__ import annotations

from collections import Counter, deque
from typing import Any


class PromptTally:
    """Calls per prompt, what they made (paid generations, or images), downloads of their images, the images of
    each prompt's latest delivery, and the latest request bodies (at most `kept`). Guarded by its fake's lock."""

    def __init__(self, kept: int) -> None:
        self.calls: Counter[str] = Counter()
        self.made: Counter[str] = Counter()
        self.downloads: Counter[str] = Counter()
        self.served: dict[str, list[bytes]] = {}
        self.received: deque[Any] = deque(maxlen=kept)

    def clear(self) -> None:
        for counter in (self.calls, self.made, self.downloads):
            counter.clear()
        self.served.clear()
        self.received.clear()

    def bodies(self, prompt: str | None) -> list[Any]:
        """The request bodies received for `prompt` (or all), oldest first, refused ones too."""
        return [
            body
            for body in self.received
            if prompt is None or (isinstance(body, dict) and body.get("prompt") == prompt)
        ]
