"""Real services for the whole session: Redis, PocketBase, SeaweedFS (S3) and the jimeng fake.

Each runs on a free loopback port with its data in a temp dir and is stopped at the end. Every test gets a
clean state: Redis flushed, the prompts collection truncated, the bucket emptied, the fake's counters reset.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis

from imagegen.clients.pocketbase import PocketBaseClient
from imagegen.clients.storage import open_s3_client
from imagegen.dev.jimeng_sandbox import SandboxConfig, SandboxThread
from imagegen.dev.localstack import Credentials, RunningService, free_port, local_services
from imagegen.models import PromptRecord
from imagegen.queue.keys import RedisKeys
from imagegen.queue.state import QueueState
from imagegen.settings import Settings

BIN = Path(sys.executable).parent
REDIS_PASSWORD = "test-redis-pw-3f9c"
PB_EMAIL = "admin@imagegen.test"
PB_PASSWORD = "test-pb-password-51ab"
S3_ACCESS = "test-access-key"
S3_SECRET = "test-secret-key-8d2e"
JIMENG_KEY = "test-jimeng-key-77c1"
BUCKET = "imagegen-test"
SECRETS = (REDIS_PASSWORD, PB_PASSWORD, S3_SECRET, JIMENG_KEY)
CREDENTIALS = Credentials(PB_EMAIL, PB_PASSWORD, S3_ACCESS, S3_SECRET, BUCKET, JIMENG_KEY, REDIS_PASSWORD)


@dataclass
class Stack:
    redis: RunningService
    pocketbase: RunningService
    seaweed: RunningService
    jimeng: SandboxThread
    workdir: Path
    env: dict[str, str] = field(default_factory=dict)
    jimeng_config: SandboxConfig | None = None  # the fake's session-wide config, restored around every test

    def settings(self, **overrides: object) -> Settings:
        values: dict[str, object] = {name.lower(): value for name, value in self.env.items()}
        values.update(overrides)
        return Settings(_env_file=None, **values)  # type: ignore[arg-type]

    def process_env(self, **overrides: str) -> dict[str, str]:
        """The environment of a CLI or worker subprocess: the stack's settings and nothing of the user's."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(SETTING_PREFIXES)}
        env.update(self.env)
        env.update(overrides)
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
        return env


SETTING_PREFIXES = (
    "REDIS_",
    "JIMENG_",
    "TOS_",
    "POCKETBASE_",
    "QUEUE_",
    "DOWNLOAD_",
    "UPLOAD_",
    "WORKER_",
    "PROMPT_",
    "LOG_",
    "AWS_",
    "API_",
    "WEB_",
)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("stack")
    # Retry-After: 0 keeps retried 429s fast; honouring the header is covered by test_retry_policy.
    with (
        local_services(root, CREDENTIALS) as local,
        SandboxThread(SandboxConfig(api_key=JIMENG_KEY, retry_after=0)) as jimeng,
    ):
        workdir = root / "work"
        workdir.mkdir()
        env = local.env(jimeng.base_url) | {
            "REDIS_DB": "0",
            "JIMENG_TIMEOUT": "20000",
            "QUEUE_BACKOFF": "0.2",
            "QUEUE_CONCURRENCY": "5",
            "DOWNLOAD_TIMEOUT": "20",
            "WORKER_SHUTDOWN_GRACE": "20",
            # `imagegen serve` (and supervisord.conf's imagegen-web) never on a fixed port in tests
            "WEB_PORT": str(free_port()),
        }
        yield Stack(
            local.redis,
            local.pocketbase,
            local.seaweed,
            jimeng,
            workdir,
            env,
            dataclasses.replace(jimeng.sandbox.config),
        )


def queue_state(settings: Settings, redis: aioredis.Redis) -> QueueState:
    """The queue's shared state as the worker and the CLI see it."""
    return QueueState(redis, settings.queue_max_failed, RedisKeys(settings.queue_name))


@pytest.fixture
def settings(stack: Stack) -> Settings:
    return stack.settings()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def pocketbase(stack: Stack, settings: Settings, http: aiohttp.ClientSession) -> PocketBaseClient:
    return PocketBaseClient(http, settings)


@pytest.fixture
async def redis_client(settings: Settings) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis(host=settings.redis_host, port=settings.redis_port, password=REDIS_PASSWORD)
    try:
        yield client
    finally:
        await client.aclose()


async def _empty_bucket(settings: Settings) -> None:
    async with open_s3_client(settings) as s3:
        paginator = s3.get_paginator("list_objects_v2")
        async for page in paginator.paginate(Bucket=settings.tos_bucket):
            for item in page.get("Contents", []):
                await s3.delete_object(Bucket=settings.tos_bucket, Key=item["Key"])


@pytest.fixture(autouse=True)
async def clean_state(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """Give each test that uses the stack an empty queue, collection and bucket and fresh fake counters."""
    if "stack" not in request.fixturenames:
        yield
        return
    stack: Stack = request.getfixturevalue("stack")
    settings = stack.settings()
    client = aioredis.Redis(host="127.0.0.1", port=settings.redis_port, password=REDIS_PASSWORD)
    try:
        await client.flushall()
    finally:
        await client.aclose()
    async with aiohttp.ClientSession() as session:
        pb = PocketBaseClient(session, settings)
        async with session.delete(
            f"{settings.pocketbase_url}/api/collections/{settings.pocketbase_collection}/truncate",
            headers={"Authorization": await pb.authorization()},
        ) as response:
            assert response.status == 204, await response.text()
    await _empty_bucket(settings)
    restore_sandbox(stack)
    try:
        yield
    finally:
        restore_sandbox(stack)


def restore_sandbox(stack: Stack) -> None:
    """The fake with its session config, no scripts, no hooks and zeroed counters."""
    assert stack.jimeng_config is not None
    stack.jimeng.sandbox.config = dataclasses.replace(stack.jimeng_config)
    stack.jimeng.sandbox.reset()


@pytest.fixture
def sandbox_config(stack: Stack) -> SandboxConfig:
    """The fake's config for this test to change; every change is undone when the test ends."""
    return stack.jimeng.sandbox.config


class RecordFactory:
    """Creates prompt records and remembers them."""

    def __init__(self, client: PocketBaseClient) -> None:
        self.client = client
        self.created: list[PromptRecord] = []

    async def create(self, prompt: str, negative_prompt: str = "") -> PromptRecord:
        record = await self.client.create_record(prompt, negative_prompt)
        self.created.append(record)
        return record

    async def many(self, count: int, prefix: str = "a watercolour lighthouse") -> list[PromptRecord]:
        return [await self.create(f"{prefix} #{i}") for i in range(count)]


@pytest.fixture
def slow_images(sandbox_config: SandboxConfig) -> None:
    """Image downloads take a while, so jobs are caught in flight after their paid generation."""
    sandbox_config.image_latency = 0.5


@pytest.fixture
async def records(pocketbase: PocketBaseClient) -> RecordFactory:
    return RecordFactory(pocketbase)


def run_cli(stack: Stack, *args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    """`imagegen ...` as a real subprocess, in a directory with no .env, with the stack's settings."""
    return subprocess.run(
        [str(BIN / "imagegen"), *args],
        cwd=stack.workdir,
        env=stack.process_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# The two ways to run a worker: arq's command line with imagegen's settings, and imagegen's own command.
ARQ_WORKER = ("arq", "imagegen.WorkerSettings")
IMAGEGEN_WORKER = ("imagegen", "worker")


def after_target(stack: Stack, result: subprocess.CompletedProcess[str]) -> str:
    """A command's text output after its first line, which must name the stack's Redis and queue (and, for a
    command that reads records, its PocketBase and collection)."""
    first, _, rest = result.stdout.partition("\n")
    settings = stack.settings()
    assert first.startswith(f"target: Redis {settings.redis_address()}, queue {settings.queue_name}"), first
    return rest


class WorkerProcess:
    """A worker as a real subprocess (`arq imagegen.WorkerSettings` unless told), its output in a log file."""

    def __init__(self, stack: Stack, log_path: Path, command: tuple[str, ...] = ARQ_WORKER, **env: str) -> None:
        self.log_path = log_path
        self._log = log_path.open("w")
        self.process = subprocess.Popen(
            [str(BIN / command[0]), *command[1:]],
            cwd=stack.workdir,
            env=stack.process_env(**env),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, signum: signal.Signals) -> None:
        """Signal the worker's process group (SIGSTOP freezes it like a long GC or swap pause)."""
        os.killpg(self.process.pid, signum)

    def stop(self, timeout: float = 40) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.send_signal(signal.SIGCONT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


@pytest.fixture
def start_worker(stack: Stack, tmp_path: Path) -> Iterator[object]:
    workers: list[WorkerProcess] = []

    def start(command: tuple[str, ...] = ARQ_WORKER, **env: str) -> WorkerProcess:
        worker = WorkerProcess(stack, tmp_path / f"worker-{len(workers)}.log", command, **env)
        workers.append(worker)
        return worker

    try:
        yield start
    finally:
        for worker in workers:
            worker.stop()


async def wait_for_records(
    client: PocketBaseClient, ids: list[str], statuses: tuple[str, ...] = ("done",), deadline: float = 90
) -> list[PromptRecord]:
    """Poll PocketBase until every record reaches one of `statuses` (or the deadline passes)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline
    while True:
        found = [await client.get_record(i) for i in ids]
        if all(r.status in statuses for r in found) or loop.time() > end:
            return found
        await asyncio.sleep(0.2)
