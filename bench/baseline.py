"""The baselines: plain arq on the same Redis, with nothing of imagegen in the jobs.

`python -m bench.baseline worker ...` runs an arq worker whose jobs do nothing (`noop`) or sleep (`sleep_job`,
returning when it started and ended); `--report FILE` writes the CPU seconds spent between its start-up and
shutdown hooks. `python -m bench.baseline enqueue ...` queues ids one `enqueue_job` call at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

from arq import create_pool
from arq.connections import RedisSettings
from arq.worker import Worker

from imagegen.models import JOB_NAME

READY = "baseline worker ready"


async def noop(ctx: dict[str, Any]) -> None:
    """A job that does nothing: what arq itself costs per job."""


async def sleep_job(ctx: dict[str, Any], seconds: float) -> tuple[float, float]:
    """A job that holds its slot for `seconds`, as a generation call would; returns its start and end."""
    started = time.time()
    await asyncio.sleep(seconds)
    return started, time.time()


async def run_worker(args: argparse.Namespace) -> None:
    started_cpu = 0.0

    async def on_startup(ctx: dict[str, Any]) -> None:
        nonlocal started_cpu
        started_cpu = time.process_time()
        print(READY, flush=True)

    async def on_shutdown(ctx: dict[str, Any]) -> None:
        if args.report:
            Path(args.report).write_text(json.dumps({"cpu_seconds": time.process_time() - started_cpu}))

    worker = Worker(
        functions=[noop, sleep_job],
        redis_settings=RedisSettings(host="127.0.0.1", port=args.redis_port),
        queue_name=args.queue,
        max_jobs=args.max_jobs,
        burst=args.burst,
        poll_delay=args.poll_delay,
        job_timeout=args.job_timeout,
        on_startup=on_startup,
        on_shutdown=on_shutdown,
    )
    try:
        await worker.async_run()
    finally:
        await worker.close()


async def run_enqueue(args: argparse.Namespace) -> None:
    ids = Path(args.ids).read_text().split()
    pool = await create_pool(RedisSettings(host="127.0.0.1", port=args.redis_port))
    try:
        started = time.perf_counter()
        for prompt_id in ids:
            await pool.enqueue_job(JOB_NAME, prompt_id, False, _job_id=prompt_id, _queue_name=args.queue)
        print(json.dumps({"enqueued": len(ids), "seconds": time.perf_counter() - started}))
    finally:
        await pool.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.baseline")
    commands = parser.add_subparsers(dest="command", required=True)
    worker = commands.add_parser("worker", help="a plain arq worker with no-op and sleeping jobs")
    worker.add_argument("--redis-port", type=int, required=True)
    worker.add_argument("--queue", default="bench:baseline")
    worker.add_argument("--max-jobs", type=int, default=10, help="arq's default is 10")
    worker.add_argument("--burst", action="store_true", help="exit once the queue is empty")
    worker.add_argument("--poll-delay", type=float, default=0.5, help="arq's default is 0.5 s")
    worker.add_argument("--job-timeout", type=float, default=300, help="arq's default is 300 s")
    worker.add_argument("--report", default="", help="write the CPU seconds of the run here, as JSON")
    enqueue = commands.add_parser("enqueue", help="queue imagegen jobs for ids, one enqueue_job call at a time")
    enqueue.add_argument("--redis-port", type=int, required=True)
    enqueue.add_argument("--queue", default="bench:baseline")
    enqueue.add_argument("--ids", required=True, help="a file of ids, one per line")
    args = parser.parse_args()
    asyncio.run(run_worker(args) if args.command == "worker" else run_enqueue(args))


if __name__ == "__main__":
    main()
