"""Which Redis, queue and collection a command reads: the first thing every CLI command says.

A command run without the right env file reads whatever Redis answers on the default address; naming the
target (never a password) makes that visible at once. `--json` output carries it as a `target` field.
"""

from __future__ import annotations

from dataclasses import dataclass

from imagegen.settings import Settings


@dataclass(frozen=True)
class Target:
    redis: str  # host:port/db
    queue: str
    pocketbase: str | None = None  # the PocketBase URL, for commands that read records
    collection: str | None = None

    @classmethod
    def of(cls, settings: Settings, *, records: bool = True) -> Target:
        if not records:
            return cls(settings.redis_address(), settings.queue_name)
        return cls(
            settings.redis_address(), settings.queue_name, settings.pocketbase_url, settings.pocketbase_collection
        )

    def describe(self) -> str:
        """One line: `Redis 127.0.0.1:6379/0, queue imagegen:queue; PocketBase http://..., collection prompts`."""
        line = f"Redis {self.redis}, queue {self.queue}"
        if self.pocketbase is not None:
            line += f"; PocketBase {self.pocketbase}, collection {self.collection}"
        return line

    def to_json(self) -> dict[str, str]:
        found = {"redis": self.redis, "queue": self.queue}
        if self.pocketbase is not None and self.collection is not None:
            found |= {"pocketbase": self.pocketbase, "collection": self.collection}
        return found
