"""The local stack every figure runs on, and the processes a figure starts on it.

Real Redis, PocketBase and SeaweedFS on free loopback ports with their data in a temp dir, the jimeng fake in
a thread of this process, and workers as real subprocesses (`arq imagegen.WorkerSettings`, or the arq
baseline worker of `bench.baseline`) whose CPU time and memory are read from /proc.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from arq import create_pool
from arq.connections import ArqRedis, RedisSettings
from arq.jobs import JobResult

from imagegen.dev.jimeng_sandbox import SandboxConfig, SandboxThread
from imagegen.dev.localstack import Credentials, RunningService, local_services
from imagegen.queue.enqueue import JobQueue
from imagegen.queue.keys import RedisKeys
from imagegen.settings import Settings

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent
PB_EMAIL = "bench@imagegen.test"
PB_PASSWORD = "bench-pb-password-4c1d"
S3_ACCESS = "bench-access"
S3_SECRET = "bench-secret-key-9a7e"
JIMENG_KEY = "bench-jimeng-key"
BUCKET = "imagegen-bench"
CREDENTIALS = Credentials(PB_EMAIL, PB_PASSWORD, S3_ACCESS, S3_SECRET, BUCKET, JIMENG_KEY)
BATCH_SIZE = 1000  # records per PocketBase batch request (its maxRequests, set at start)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# Settings that must not leak from the user's environment into a worker or CLI of the bench.
_SETTING_PREFIXES = ("REDIS_", "JIMENG_", "TOS_", "POCKETBASE_", "QUEUE_", "DOWNLOAD_", "UPLOAD_", "WORKER_")
_OTHER_SETTINGS = ("PROMPT_MAX_CHARS", "LOG_LEVEL", "RECONCILE_INTERVAL", "OUTAGE_PAUSE_AFTER")


class BenchError(Exception):
    """A figure could not be measured (a process died, a condition never came)."""


async def wait_for(condition: Callable[[], bool | Awaitable[bool]], timeout: float, what: str) -> None:
    """Poll `condition` every 20 ms until it holds; BenchError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.02)


class Process:
    """A subprocess in its own session with its output in a log file; CPU and memory read from /proc."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], cwd: Path, log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.popen = subprocess.Popen(
            argv, env=env, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.output().splitlines()[-lines:])

    async def wait_for_output(self, text: str, timeout: float = 60) -> None:
        """Wait until the process has written `text` (it must stay alive meanwhile)."""

        def seen() -> bool:
            if text in self.output():
                return True
            if not self.alive():
                raise BenchError(f"{self.name} exited ({self.popen.returncode}) before {text!r}:\n{self.tail()}")
            return False

        await wait_for(seen, timeout, f"{self.name} to print {text!r}")

    def cpu_seconds(self) -> float:
        """User + system CPU time of the process so far (/proc/<pid>/stat utime and stime)."""
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS

    def memory_kib(self, field: str) -> int:
        """A line of /proc/<pid>/status in KiB: VmRSS now, VmHWM the peak so far."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
        raise BenchError(f"no {field} in /proc/{self.pid}/status")

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        self.popen.wait()

    async def wait_exit(self, timeout: float) -> int:
        await wait_for(lambda: not self.alive(), timeout, f"{self.name} to exit")
        return int(self.popen.returncode)

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM (a graceful stop), SIGKILL after `timeout` seconds."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()


@dataclass(frozen=True)
class Measured:
    """A command run to its end: exit code, wall seconds, its peak RSS and its output."""

    returncode: int
    seconds: float
    peak_rss_kib: int
    output: str


def _high_water_kib(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    found = [line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")]
    return int(found[0]) if found else 0


def run_measured(argv: list[str], env: dict[str, str], cwd: Path, timeout: float) -> Measured:
    """Run a command to its end, reading its peak RSS (VmHWM) every 10 ms while it runs.

    Not ru_maxrss: Linux carries the peak of the memory a child was forked with (this harness's) across exec."""
    log_path = cwd / f"measured-{time.monotonic_ns()}.log"
    peak = 0
    with log_path.open("wb") as log:
        started = time.perf_counter()
        popen = subprocess.Popen(argv, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
        while popen.poll() is None:
            peak = max(peak, _high_water_kib(popen.pid))
            if time.perf_counter() - started > timeout:
                popen.kill()
            time.sleep(0.01)
        seconds = time.perf_counter() - started
    return Measured(popen.returncode, seconds, peak, log_path.read_text(errors="replace"))


@dataclass
class Stack:
    """The running services, the settings that reach them, and where processes keep their files."""

    root: Path
    services: list[RunningService]
    jimeng: SandboxThread
    env: dict[str, str]
    base_config: SandboxConfig
    redis_port: int

    @property
    def redis_settings(self) -> RedisSettings:
        return RedisSettings(host="127.0.0.1", port=self.redis_port)

    @property
    def queue_name(self) -> str:
        return self.env["QUEUE_NAME"]

    def settings(self, **overrides: str) -> Settings:
        values: dict[str, object] = {name.lower(): value for name, value in {**self.env, **overrides}.items()}
        return Settings(_env_file=None, **values)  # type: ignore[arg-type]

    def process_env(self, **overrides: str) -> dict[str, str]:
        """A subprocess's environment: ours without any imagegen setting, then the stack's and `overrides`."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(_SETTING_PREFIXES) and k not in _OTHER_SETTINGS}
        env.update(self.env)
        env.update(overrides)
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
        env["PYTHONPATH"] = str(REPO)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def jimeng_config(self, **changes: Any) -> SandboxConfig:
        """Give the fake its start-up config with `changes`, no scripts and zeroed counters."""
        self.jimeng.sandbox.config = dataclasses.replace(self.base_config, **changes)
        self.jimeng.sandbox.reset()
        return self.jimeng.sandbox.config

    def _start(self, name: str, argv: list[str], env: dict[str, str]) -> Process:
        index = len(list(self.root.glob(f"{name}-*.log")))
        return Process(name, argv, env, self.root / "work", self.root / f"{name}-{index}.log")

    def worker(self, *, profile_to: Path | None = None, **env: str) -> Process:
        """`arq imagegen.WorkerSettings` with the stack's settings and `env`; profiled into `profile_to` if given."""
        argv = [str(BIN / "arq"), "imagegen.WorkerSettings"]
        if profile_to is not None:
            argv = [sys.executable, "-m", "bench.hotspots", str(profile_to)]
        return self._start("worker", argv, self.process_env(**env))

    def baseline_worker(self, *args: str) -> Process:
        """The plain arq worker of `bench.baseline` on the stack's Redis."""
        argv = [sys.executable, "-m", "bench.baseline", "worker", "--redis-port", str(self.redis_port), *args]
        return self._start("baseline", argv, self.process_env())

    def measure(self, argv: list[str], timeout: float = 1800, **env: str) -> Measured:
        return run_measured(argv, self.process_env(**env), self.root / "work", timeout)


async def worker_ready(process: Process, timeout: float = 60) -> None:
    await process.wait_for_output("worker ready", timeout)


@contextlib.asynccontextmanager
async def arq_pool(stack: Stack) -> AsyncIterator[ArqRedis]:
    pool = await create_pool(stack.redis_settings)
    try:
        yield pool
    finally:
        await pool.aclose()


def _no_args(_: str) -> tuple[Any, ...]:
    return ()


async def enqueue_all(
    pool: ArqRedis, function: str, queue: str, ids: Iterable[str], args: Callable[[str], tuple[Any, ...]] = _no_args
) -> None:
    """One arq job per id (job id = id, arguments `args(id)`), 50 enqueue calls in flight at a time."""
    pending = list(ids)
    for start in range(0, len(pending), 50):
        chunk = pending[start : start + 50]
        await asyncio.gather(*(pool.enqueue_job(function, *args(i), _job_id=i, _queue_name=queue) for i in chunk))


async def enqueue_prompts(stack: Stack, pool: ArqRedis, ids: Iterable[str]) -> None:
    """Queue imagegen jobs for these records as `imagegen add-pending` does, without reading PocketBase."""
    await JobQueue(pool, stack.queue_name, RedisKeys(stack.queue_name)).put(list(ids))


async def queue_drained(pool: ArqRedis, queue: str, timeout: float) -> None:
    """Wait until the queue holds no job: arq removes a job from its queue only when it is finished."""

    async def empty() -> bool:
        return int(await pool.zcard(queue)) == 0

    await wait_for(empty, timeout, f"queue {queue} to drain")


async def job_results(pool: ArqRedis) -> list[JobResult]:
    return await pool.all_job_results()


def results_span(results: list[JobResult]) -> float:
    """Seconds from the first job's start to the last job's finish."""
    first = min(r.start_time for r in results)
    last = max(r.finish_time for r in results)
    return (last - first).total_seconds()


class PocketBase:
    """The bench's superuser session on the stack's PocketBase: batch creation of records, truncation."""

    def __init__(self, http: aiohttp.ClientSession, url: str, collection: str) -> None:
        self._http = http
        self._url = url
        self._collection = collection
        self._token = ""

    async def login(self) -> None:
        body = {"identity": PB_EMAIL, "password": PB_PASSWORD}
        async with self._http.post(f"{self._url}/api/collections/_superusers/auth-with-password", json=body) as r:
            r.raise_for_status()
            self._token = str((await r.json())["token"])

    def _headers(self) -> dict[str, str]:
        return {"Authorization": self._token}

    async def enable_batch(self) -> None:
        """Turn on the batch API (off by default) with room for BATCH_SIZE requests each."""
        body = {"batch": {"enabled": True, "maxRequests": BATCH_SIZE, "timeout": 60, "maxBodySize": 0}}
        async with self._http.patch(f"{self._url}/api/settings", json=body, headers=self._headers()) as r:
            r.raise_for_status()

    async def truncate(self) -> None:
        url = f"{self._url}/api/collections/{self._collection}/truncate"
        async with self._http.delete(url, headers=self._headers()) as r:
            r.raise_for_status()

    async def _create_batch(self, prompts: list[str]) -> list[str]:
        path = f"/api/collections/{self._collection}/records"
        body = {"requests": [{"method": "POST", "url": path, "body": {"prompt": p}} for p in prompts]}
        timeout = aiohttp.ClientTimeout(total=120)
        async with self._http.post(f"{self._url}/api/batch", json=body, headers=self._headers(), timeout=timeout) as r:
            if r.status != 200:
                raise BenchError(f"PocketBase batch create: HTTP {r.status} {(await r.text())[:300]}")
            return [str(item["body"]["id"]) for item in await r.json()]

    async def create(self, prompts: list[str]) -> list[str]:
        """Create pending records with these prompts through the batch API, two batches at a time; their ids."""
        batches = [prompts[i : i + BATCH_SIZE] for i in range(0, len(prompts), BATCH_SIZE)]
        ids: list[str] = []
        for start in range(0, len(batches), 2):
            for created in await asyncio.gather(*(self._create_batch(b) for b in batches[start : start + 2])):
                ids.extend(created)
        return ids


@contextlib.asynccontextmanager
async def pocketbase(stack: Stack) -> AsyncIterator[PocketBase]:
    async with aiohttp.ClientSession() as http:
        client = PocketBase(http, stack.env["POCKETBASE_URL"], stack.env["POCKETBASE_COLLECTION"])
        await client.login()
        yield client


async def create_records(stack: Stack, prompts: list[str]) -> list[str]:
    async with pocketbase(stack) as pb:
        return await pb.create(prompts)


async def clean(stack: Stack) -> None:
    """An empty Redis and collection before each figure (the bucket keeps its objects: keys are per record)."""
    async with arq_pool(stack) as pool:
        await pool.flushall()
    async with pocketbase(stack) as pb:
        await pb.truncate()
    stack.jimeng_config()


@contextlib.contextmanager
def running_stack(root: Path) -> Iterator[Stack]:
    """Start Redis, PocketBase (batch API on), SeaweedFS with a bucket, and the fake; stop them all at the end."""
    (root / "work").mkdir(exist_ok=True)
    config = SandboxConfig(api_key=JIMENG_KEY, retry_after=0)
    with local_services(root, CREDENTIALS) as local, SandboxThread(config) as jimeng:
        env = local.env(jimeng.base_url) | {"POCKETBASE_COLLECTION": "prompts", "QUEUE_NAME": "imagegen:queue"}
        stack = Stack(root, local.all, jimeng, env, dataclasses.replace(config), local.redis_port)
        asyncio.run(_enable_batch(stack))
        yield stack


async def _enable_batch(stack: Stack) -> None:
    async with pocketbase(stack) as pb:
        await pb.enable_batch()


@dataclass(frozen=True)
class WorkerRun:
    """One worker process over a batch of jobs: their results, its CPU time and memory for the batch."""

    results: list[JobResult]
    cpu_seconds: float  # from ready to the queue drained
    rest_rss_kib: int  # once ready, before any job
    peak_rss_kib: int  # the process's high-water mark at the end

    @property
    def failed(self) -> int:
        return sum(1 for r in self.results if not r.success)


async def run_worker_over(
    stack: Stack, ids: list[str], timeout: float, profile_to: Path | None = None, **env: str
) -> WorkerRun:
    """Start an imagegen worker, queue a job per record once it is ready, and wait for the queue to drain."""
    worker = stack.worker(profile_to=profile_to, **env)
    try:
        await worker_ready(worker)
        rest, cpu = worker.memory_kib("VmRSS"), worker.cpu_seconds()
        async with arq_pool(stack) as pool:
            await enqueue_prompts(stack, pool, ids)
            await queue_drained(pool, stack.queue_name, timeout)
            cpu = worker.cpu_seconds() - cpu
            peak = worker.memory_kib("VmHWM")
            wanted = set(ids)
            results = [r for r in await job_results(pool) if r.job_id in wanted]
    finally:
        worker.stop()
    if profile_to is not None and not profile_to.is_file():
        raise BenchError(f"the profiled worker wrote no profile:\n{worker.tail()}")
    return WorkerRun(results, cpu, rest, peak)


@dataclass(frozen=True)
class BaselineRun:
    results: list[JobResult]
    cpu_seconds: float  # between the worker's start-up and shutdown hooks


async def run_baseline_burst(
    stack: Stack, function: str, count: int, max_jobs: int, timeout: float, args: tuple[Any, ...] = ()
) -> BaselineRun:
    """Queue `count` jobs of a baseline function, then run a plain arq worker in burst mode over them."""
    queue = "bench:baseline"
    run = time.monotonic_ns()  # job ids unique to this run: arq refuses an id whose result is still kept
    ids = [f"{function}-{run}-{i}" for i in range(count)]
    report = stack.root / "work" / f"baseline-{run}.json"
    async with arq_pool(stack) as pool:
        await enqueue_all(pool, function, queue, ids, lambda _: args)
        worker = stack.baseline_worker(
            "--queue", queue, "--max-jobs", str(max_jobs), "--burst", "--report", str(report)
        )
        try:
            code = await worker.wait_exit(timeout)
        finally:
            worker.stop()
        if code != 0 or not report.is_file():
            raise BenchError(f"baseline worker failed ({code}):\n{worker.tail()}")
        wanted = set(ids)
        results = [r for r in await job_results(pool) if r.job_id in wanted]
    cpu = float(json.loads(report.read_text())["cpu_seconds"])
    return BaselineRun(results, cpu)
