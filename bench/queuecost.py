"""Figure `queue-cost`: what reading the queue's counts costs as the backlog grows, next to the full scan.

The queue is filled to 3k, 30k, 300k and 1M jobs, written by one Lua script per FILL_BATCH jobs in exactly the
shape `imagegen add` writes them (arq's pickled job under `arq:job:<id>` with its expiry, the id in the queue
at its priority-0 score), and a live worker's heartbeat lists RUNNING of them as running (their in-progress
keys set, as arq's would be). At each size, each of `Control.status()` (what `imagegen status` runs, in
process), `GET /api/queue` (also what the dashboard polls) and `GET /metrics` of an in-process `imagegen
serve` app is timed REPEATS times (the baseline BASELINE_REPEATS; the median is shown), after one call that is
not timed. Meanwhile a separate process pings Redis in a loop (`bench.stall`): the longest ping overlapping a
call is how long Redis kept every other client waiting (on a loaded machine, its own scheduling adds to it:
the same client's longest ping while nothing runs is shown as the noise floor). Redis's slow log, reset
before each call, gives the longest single command the call ran, on Redis's side and free of that noise.

Baseline: the same calls with the counts read as they were before, `full_scan_counts`: the whole queue
(ZRANGE 0 -1), one EXISTS with every member's in-progress key, and the live workers found by SCANning the
keyspace. Both give the same counts (checked at every size). Memory per queued job: Redis's used_memory at
the largest size less that of the empty Redis, over the jobs.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient, TestServer
from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix, job_key_prefix
from arq.jobs import serialize_job

from imagegen.models import JOB_NAME
from imagegen.ops.control import Control, JobCounts, open_control
from imagegen.queue.beats import WorkerBeat
from imagegen.queue.priority import queue_score
from imagegen.queue.state import QueueState
from imagegen.web.app import create_app
from imagegen.web.context import BACKENDS

from .report import Figure, Row, Target
from .stack import BenchError, Stack, arq_pool
from .stall import slowest_ping

SIZES = (3_000, 30_000, 300_000, 1_000_000)
QUICK_SIZES = (3_000, 30_000)
# Calls timed per size: imagegen's are cheap, so many (a median that the load of a shared machine moves less);
# the full scan takes seconds at 1M.
REPEATS = 25
BASELINE_REPEATS = 3
RUNNING = 50
FILL_BATCH = 10_000
TOKEN = "bench-queue-cost-token"
SLOWER_THAN_3K = 1.2  # target: at the largest size within this factor of the time at 3k
SLOWLOG_OVER_US = 200  # commands slower than this are in Redis's slow log during the figure
STALL_TARGET_MS = 5.0
ID_SHAPE = "q{:014d}"  # 15 characters, as PocketBase ids

# KEYS: the queue; ARGV: job key prefix, the pickled job before and after its prompt id, score, expiry ms,
# first number, how many. Each id is ID_SHAPE of its number.
_FILL = """
local queue, prefix, head, tail = KEYS[1], ARGV[1], ARGV[2], ARGV[3]
local score, expires, first, count = ARGV[4], ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[7])
for n = first, first + count - 1 do
  local id = string.format('q%014d', n)
  redis.call('psetex', prefix .. id, expires, head .. id .. tail)
  redis.call('zadd', queue, score, id)
end
return count
"""


async def fill(pool: ArqRedis, queue: str, start: int, end: int) -> None:
    """Queue jobs number `start` to `end` - 1 as `JobQueue.put` writes them (priority 0, one enqueue time)."""
    now_ms = int(time.time() * 1000)
    placeholder = ID_SHAPE.format(0)
    job = serialize_job(JOB_NAME, (placeholder, False), {}, None, now_ms, serializer=pool.job_serializer)
    head, tail = job.split(placeholder.encode())
    script = pool.register_script(_FILL)
    for first in range(start, end, FILL_BATCH):
        count = min(FILL_BATCH, end - first)
        args: list[bytes | str | int] = [
            job_key_prefix,
            head,
            tail,
            queue_score(now_ms, 0),
            pool.expires_extra_ms,
            first,
            count,
        ]
        await script(keys=[queue], args=args)


async def full_scan_counts(control: Control, workers: list[WorkerBeat]) -> JobCounts:
    """The baseline: the counts as `status` read them before, from the whole queue and its in-progress keys."""
    now_ms = time.time() * 1000
    members = await control.redis.zrange(control.settings.queue_name, 0, -1, withscores=True)
    running = 0
    if members:
        running = int(await control.redis.exists(*(in_progress_key_prefix + m.decode() for m, _ in members)))
    due = sum(1 for _, score in members if score <= now_ms)
    waiting = sum(len(w.waiting) for w in workers)
    return JobCounts(due - running, len(members) - due, max(0, running - waiting), waiting)


async def scanned_workers(state: QueueState) -> list[WorkerBeat]:
    """The baseline's live workers: every heartbeat key found by SCANning the keyspace."""
    found = []
    async for key in state.redis.scan_iter(match=state.keys.worker("*"), count=500):
        raw = await state.redis.get(key)
        if raw:
            found.append(WorkerBeat.model_validate_json(raw))
    return sorted(found, key=lambda beat: beat.id)


def use_full_scan(control: Control) -> None:
    control.count_jobs = partial(full_scan_counts, control)  # type: ignore[method-assign]
    control.state.workers = partial(scanned_workers, control.state)  # type: ignore[method-assign]


@dataclass
class Side:
    """One way of reading the counts (imagegen's or the baseline's), through each front end."""

    control: Control
    api: TestClient[Any, Any]

    def calls(self) -> dict[str, Callable[[], Awaitable[object]]]:
        return {
            "status": self.control.status,
            "GET /api/queue": partial(self._get, "/api/queue"),
            "GET /metrics": partial(self._get, "/metrics"),
        }

    async def _get(self, path: str) -> None:
        response = await self.api.get(path, headers={"Authorization": f"Bearer {TOKEN}"})
        await response.read()
        if response.status != 200:
            raise BenchError(f"{path} answered {response.status}")


@asynccontextmanager
async def side(stack: Stack, full_scan: bool) -> AsyncIterator[Side]:
    # Record counts shared for an hour: counted once (on an empty collection), the same for both sides.
    settings = stack.settings(API_TOKEN=TOKEN, WEB_HOST="127.0.0.1", RECORD_COUNTS_MAX_AGE="3600")
    app = create_app(settings)
    async with open_control(settings) as control, TestClient(TestServer(app, host="127.0.0.1")) as api:
        if full_scan:
            use_full_scan(control)
            use_full_scan(await app[BACKENDS].control())
        yield Side(control, api)


@asynccontextmanager
async def pinging(stack: Stack) -> AsyncIterator[Path]:
    """The `bench.stall` process, pinging Redis until the block ends; yields the file of slow pings."""
    out = stack.root / "work" / f"pings-{time.monotonic_ns()}.txt"
    argv = [sys.executable, "-m", "bench.stall", "--redis-port", str(stack.redis_port), "--out", str(out)]
    process = await asyncio.create_subprocess_exec(*argv, env=stack.process_env())
    try:
        deadline = time.monotonic() + 30
        while not (out.is_file() and out.read_text()):
            if time.monotonic() > deadline or process.returncode is not None:
                raise BenchError("the Redis pinger (bench.stall) did not start")
            await asyncio.sleep(0.05)
        yield out
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


@dataclass(frozen=True)
class Timing:
    seconds: float  # the call, start to end
    ping: float  # the longest ping of the other client that overlapped it
    command: float  # the longest single Redis command it ran (the slow log)


async def timed(call: Callable[[], Awaitable[object]], pings: Path, pool: ArqRedis) -> Timing:
    await pool.slowlog_reset()
    start, clock = time.time(), time.perf_counter()
    await call()
    took, end = time.perf_counter() - clock, time.time()
    await asyncio.sleep(0.05)  # the pinger writes a ping that was held up once it comes back
    logged = await pool.slowlog_get(128)
    command = max((int(entry["duration"]) for entry in logged if not _ours(entry)), default=0) / 1e6
    return Timing(took, slowest_ping(pings, start, end), command)


def _ours(entry: dict[str, Any]) -> bool:
    """A slow-log entry of the measuring itself (the reset, the pinger)."""
    command = entry["command"]
    words = (command.decode() if isinstance(command, bytes) else str(command)).upper().split()
    return not words or words[0] in ("SLOWLOG", "PING", "CONFIG", "INFO")


async def idle_stall(pings: Path) -> float:
    """The longest ping over one second in which this process calls nothing."""
    start = time.time()
    await asyncio.sleep(1.0)  # the measuring window itself
    return slowest_ping(pings, start, time.time())


async def live_worker(control: Control, pool: ArqRedis) -> None:
    """A worker's heartbeat listing RUNNING of the queued jobs as running, with arq's in-progress keys."""
    running = [ID_SHAPE.format(n) for n in range(RUNNING)]
    now = time.time()
    beat = WorkerBeat(id="bench-host:1", queue=control.settings.queue_name, started=now, running=running, seen=now)
    await control.state.heartbeat(beat, ttl=3600)
    async with pool.pipeline(transaction=False) as pipe:
        for job_id in running:
            pipe.psetex(in_progress_key_prefix + job_id, 3_600_000, b"1")
        await pipe.execute()


async def check_counts(ours: Side, baseline: Side, size: int) -> None:
    counted = await ours.control.count_jobs(await ours.control.state.workers())
    scanned = await full_scan_counts(baseline.control, await scanned_workers(baseline.control.state))
    if counted != scanned or counted.queued + counted.in_progress != size:
        raise BenchError(f"at {size:,} jobs the counts differ: {counted} vs the full scan's {scanned}")


def label(size: int) -> str:
    return f"{size // 1000:,}k" if size < 1_000_000 else f"{size // 1_000_000}M"


@dataclass
class Results:
    """The medians of each call, and the worst stalls, by (call, size, baseline or not)."""

    medians: dict[tuple[str, int, bool], float] = field(default_factory=dict)
    pings: dict[tuple[int, bool], float] = field(default_factory=dict)
    commands: dict[tuple[int, bool], float] = field(default_factory=dict)
    idle: float = 0.0

    async def measure(
        self, reader: Side, size: int, full_scan: bool, repeats: int, pings: Path, pool: ArqRedis
    ) -> None:
        for name, call in reader.calls().items():
            await call()  # not timed: connections and the shared record counts are there from now on
            timings = [await timed(call, pings, pool) for _ in range(repeats)]
            self.medians[name, size, full_scan] = statistics.median(t.seconds for t in timings)
            key = (size, full_scan)
            self.pings[key] = max(self.pings.get(key, 0.0), *(t.ping for t in timings))
            self.commands[key] = max(self.commands.get(key, 0.0), *(t.command for t in timings))

    def rows(self, size: int, names: list[str]) -> list[Row]:
        at = label(size)
        rows = [
            Row(f"{name} at {at} queued", "ms", self.medians[name, size, False] * 1000,
                self.medians[name, size, True] * 1000)
            for name in names
        ]  # fmt: skip
        return [
            *rows,
            Row(f"longest ping of another client during them at {at}", "ms", self.pings[size, False] * 1000,
                self.pings[size, True] * 1000),
            Row(f"longest Redis command of them at {at}", "ms", self.commands[size, False] * 1000,
                self.commands[size, True] * 1000, digits=2),
        ]  # fmt: skip

    def growth(self, name: str, small: int, large: int, full_scan: bool) -> float:
        return self.medians[name, large, full_scan] / self.medians[name, small, full_scan]

    def worst(self, found: dict[tuple[int, bool], float], full_scan: bool) -> float:
        return max(value for (_, side), value in found.items() if side is full_scan) * 1000


async def measure(stack: Stack, quick: bool, profile: bool) -> Figure:
    sizes, repeats = (QUICK_SIZES, {False: 3, True: 1}) if quick else (SIZES, {False: REPEATS, True: BASELINE_REPEATS})
    results = Results()
    rows: list[Row] = []
    names: list[str] = []
    async with arq_pool(stack) as pool, pinging(stack) as pings:
        await pool.config_set("slowlog-log-slower-than", SLOWLOG_OVER_US)
        empty = int((await pool.info("memory"))["used_memory"])
        filled, fill_seconds = 0, 0.0
        try:
            async with side(stack, False) as ours, side(stack, True) as baseline:
                names = list(ours.calls())
                await live_worker(ours.control, pool)
                for size in sizes:
                    started = time.monotonic()
                    await fill(pool, stack.queue_name, filled, size)
                    fill_seconds += time.monotonic() - started
                    filled = size
                    used = int((await pool.info("memory"))["used_memory"])
                    await check_counts(ours, baseline, size)
                    results.idle = max(results.idle, await idle_stall(pings))
                    for full_scan, reader in ((False, ours), (True, baseline)):
                        await results.measure(reader, size, full_scan, repeats[full_scan], pings, pool)
                    print(f"   {label(size)} jobs ({fill_seconds:.1f} s filling so far, idle ping up to "
                          f"{results.idle * 1000:.1f} ms)", flush=True)  # fmt: skip
                    rows += results.rows(size, names)
        finally:
            await pool.config_set("slowlog-log-slower-than", 10_000)
    small, large = sizes[0], sizes[-1]
    rows += [
        Row(f"{name}: time at {label(large)} / at {label(small)}", "x", results.growth(name, small, large, False),
            results.growth(name, small, large, True), Target("<=", SLOWER_THAN_3K), digits=2)
        for name in names
    ]  # fmt: skip
    rows += [
        Row("longest ping of another client during them, any size", "ms", results.worst(results.pings, False),
            results.worst(results.pings, True), Target("<=", STALL_TARGET_MS)),
        Row("longest Redis command of them, any size", "ms", results.worst(results.commands, False),
            results.worst(results.commands, True), Target("<=", STALL_TARGET_MS), digits=2),
        Row(f"Redis memory per queued job at {label(large)}", "B", (used - empty) / large, None, digits=0),
    ]  # fmt: skip
    notes = [
        f"Queue filled to {', '.join(f'{s:,}' for s in sizes)} jobs ({fill_seconds:.1f} s in all: one Lua script per "
        f"{FILL_BATCH:,} jobs, in the shape `imagegen add` writes); a live worker's heartbeat lists {RUNNING} of "
        f"them as running. Each call made once untimed, then timed {repeats[False]} times per size (the baseline "
        f"{repeats[True]}): the median shown. "
        "Record counts are counted once and shared (an empty collection, the same for both sides): this figure "
        "is about the queue.",
        "Ping: the longest PING of a separate client process (`bench.stall`, pinging in a loop) that overlapped "
        f"any of the calls at that size; while nothing else ran, its longest was {results.idle * 1000:.1f} ms "
        "(this machine's noise floor: it was shared and loaded). Command: the longest single command of the calls "
        f"in Redis's slow log (threshold {SLOWLOG_OVER_US} us, reset before each call): Redis's own time.",
        "Baseline: the same three calls reading the counts as before (`full_scan_counts`: ZRANGE 0 -1 of the "
        "queue, then one EXISTS with every member's in-progress key, and the live workers by SCAN of the "
        "keyspace); both sides' counts are checked equal at each size.",
        f"Memory: Redis's used_memory with {large:,} jobs queued less that of the empty Redis, per job (job key "
        "with its pickled job and expiry, and the queue's sorted-set entry).",
    ]
    return Figure("queue-cost", rows, notes)
