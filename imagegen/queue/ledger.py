"""What a paid generation produced, remembered in Redis until the record is done.

A retry after a download, upload or PocketBase failure reads this instead of paying for a new generation:
it reuses the image links and skips every image that already landed in the bucket.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

from redis.asyncio import Redis

from imagegen.models import StoredImage

from .keys import RedisKeys


@dataclass
class GenerationRecord:
    """The links of one paid generation and the images of it already stored, by position.

    `created` is the API's own time stamp; `received` is when this worker got the links, on its own clock,
    which is what the links' age (and so their expiry) is judged by.
    """

    created: float
    urls: list[str]  # a link each, or an image sent inline (`download.inline_source`)
    received: float = field(default_factory=time.time)
    stored: dict[int, StoredImage] = field(default_factory=dict)
    provider: str = "jimeng"
    lifetime: float | None = None  # seconds the links live; None: JIMENG_LINK_LIFETIME
    blocked: list[str] = field(default_factory=list)  # images the call refused (moderation), in words

    def age(self) -> float:
        """Seconds since the links were handed out."""
        return max(0.0, time.time() - self.received)

    def to_json(self) -> str:
        return json.dumps(
            {
                "created": self.created,
                "received": self.received,
                "urls": self.urls,
                "stored": {str(i): asdict(s) for i, s in self.stored.items()},
                "provider": self.provider,
                "lifetime": self.lifetime,
                "blocked": self.blocked,
            }
        )

    @classmethod
    def from_json(cls, raw: str | bytes) -> GenerationRecord:
        data = json.loads(raw)
        stored = {int(i): StoredImage(**s) for i, s in data.get("stored", {}).items()}
        created = float(data["created"])
        received = float(data.get("received", created))
        return cls(
            created=created,
            urls=[str(u) for u in data["urls"]],
            received=received,
            stored=stored,
            provider=str(data.get("provider", "jimeng")),
            lifetime=data.get("lifetime"),
            blocked=[str(b) for b in data.get("blocked", [])],
        )


class GenerationLedger:
    """Per-prompt generation memory; entries expire after `ttl` seconds."""

    def __init__(self, redis: Redis, ttl: int, keys: RedisKeys) -> None:
        self._redis = redis
        self._keys = keys
        self._ttl = ttl

    async def load(self, prompt_id: str) -> GenerationRecord | None:
        raw = await self._redis.get(self._keys.generation(prompt_id))
        return GenerationRecord.from_json(raw) if raw else None

    async def save(self, prompt_id: str, record: GenerationRecord) -> None:
        await self._redis.set(self._keys.generation(prompt_id), record.to_json(), ex=self._ttl)

    async def forget(self, prompt_id: str) -> None:
        await self._redis.delete(self._keys.generation(prompt_id))
