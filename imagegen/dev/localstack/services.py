"""Redis, PocketBase and SeaweedFS (with a bucket) started together on free loopback ports, for the test
fixtures and the benchmarks: one context manager, stopped in reverse order however the block ends."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from imagegen.settings import Settings

from .pocketbase import create_collection, pocketbase_spec
from .process import RunningService, free_port
from .redis import redis_spec
from .seaweed import ensure_bucket, seaweed_spec


@dataclass(frozen=True)
class Credentials:
    """What the local services are set up with, and what the worker is given to reach them."""

    pocketbase_email: str
    pocketbase_password: str
    s3_access_key: str
    s3_secret_key: str
    bucket: str
    jimeng_key: str
    redis_password: str | None = None


@dataclass(frozen=True)
class LocalServices:
    redis: RunningService
    pocketbase: RunningService
    seaweed: RunningService
    redis_port: int
    pocketbase_url: str
    s3_url: str
    credentials: Credentials

    @property
    def all(self) -> list[RunningService]:
        return [self.redis, self.pocketbase, self.seaweed]

    def env(self, jimeng_url: str) -> dict[str, str]:
        """The settings (as environment variables) that point imagegen at these services and the fake."""
        c = self.credentials
        env = {
            "REDIS_HOST": "127.0.0.1",
            "REDIS_PORT": str(self.redis_port),
            "JIMENG_API_KEY": c.jimeng_key,
            "JIMENG_API_URL": jimeng_url,
            "TOS_BUCKET": c.bucket,
            "TOS_ACCESS_KEY_ID": c.s3_access_key,
            "TOS_ACCESS_KEY_SECRET": c.s3_secret_key,
            "TOS_REGION": "us-east-1",
            "TOS_ENDPOINT": self.s3_url,
            "TOS_ADDRESSING_STYLE": "path",
            "POCKETBASE_URL": self.pocketbase_url,
            "POCKETBASE_EMAIL": c.pocketbase_email,
            "POCKETBASE_PASSWORD": c.pocketbase_password,
        }
        if c.redis_password is not None:
            env["REDIS_PASSWORD"] = c.redis_password
        return env


def local_settings(pocketbase_url: str, credentials: Credentials) -> Settings:
    """The settings that reach a local PocketBase (the rest at their defaults; no environment or .env read)."""
    values = {
        "pocketbase_url": pocketbase_url,
        "pocketbase_email": credentials.pocketbase_email,
        "pocketbase_password": credentials.pocketbase_password,
        "pocketbase_collection": "prompts",
    }
    return Settings.model_validate(values)


@contextmanager
def local_services(root: Path, credentials: Credentials) -> Iterator[LocalServices]:
    """Start the three services with their data under `root` and create the bucket; stop them at the end."""
    c = credentials
    redis_port, pb_port = free_port(), free_port()
    s3_port = free_port(also_free_offset=10000, below=55535)
    started: list[RunningService] = []
    try:
        for spec in (
            redis_spec(root / "redis", redis_port, password=c.redis_password),
            pocketbase_spec(
                root / "pocketbase", pb_port, admin_email=c.pocketbase_email, admin_password=c.pocketbase_password
            ),
            seaweed_spec(root / "seaweed", s3_port, access_key=c.s3_access_key, secret_key=c.s3_secret_key),
        ):
            service = RunningService(spec)
            service.start()
            started.append(service)
        s3_url = f"http://127.0.0.1:{s3_port}"
        asyncio.run(ensure_bucket(s3_url, c.s3_access_key, c.s3_secret_key, c.bucket))
        pb_url = f"http://127.0.0.1:{pb_port}"
        asyncio.run(create_collection(local_settings(pb_url, c)))
        redis, pocketbase, seaweed = started
        yield LocalServices(redis, pocketbase, seaweed, redis_port, pb_url, s3_url, c)
    finally:
        for service in reversed(started):
            service.stop()
