"""Generated images moved from the API's links into the bucket in a fresh process: imagegen's streamed way or
the buffered way, with the process's memory growth and time as JSON.

`stream`: imagegen's way (`Storage.upload_image`, one part in memory at a time, images one after another).
`buffered`: the straightforward way (read each of a job's images whole, then PUT them).
`python -m bench.upload MODE --jobs J --images K ...` runs J such jobs at once, each asking the API for one
generation and moving K of its images. As a figure (`--only upload`): one large image, streamed vs buffered.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp

from imagegen.clients.download import open_image
from imagegen.clients.storage import Storage, open_s3_client
from imagegen.settings import Settings

from .report import Figure, Row
from .stack import JIMENG_KEY, BenchError, Stack

if TYPE_CHECKING:
    from types_aiobotocore_s3.client import S3Client

MIB = 1024 * 1024
HUGE = "[[jimeng:img-huge]]"  # the fake serves each image of such a prompt as `huge_bytes` bytes


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return 0


async def image_links(http: aiohttp.ClientSession, api_url: str, api_key: str, prompt: str) -> list[str]:
    headers = {"Authorization": f"Bearer {api_key}"}
    async with http.post(f"{api_url}/images/generations", json={"prompt": prompt}, headers=headers) as response:
        return [str(item["url"]) for item in (await response.json())["data"]]


async def move_job(
    mode: str, http: aiohttp.ClientSession, s3: S3Client, storage: Storage, links: list[str], job: int
) -> int:
    """Move one job's images; returns the bytes moved."""
    moved = 0
    if mode == "stream":
        for index, url in enumerate(links):
            async with open_image(http, url, max_bytes=1 << 34, time_limit=600) as image:
                moved += await storage.upload_image(f"bench/stream/{job}/{index}", image)
        return moved
    bodies = []
    for url in links:
        async with open_image(http, url, max_bytes=1 << 34, time_limit=600) as image:
            bodies.append((await image.read_all(), image.image_type.value))
    for index, (body, content_type) in enumerate(bodies):
        await s3.put_object(
            Bucket=storage.bucket, Key=f"bench/buffered/{job}/{index}", Body=body, ContentType=content_type
        )
        moved += len(body)
    return moved


async def transfer(args: argparse.Namespace, settings: Settings) -> dict[str, float]:
    async with aiohttp.ClientSession() as http, open_s3_client(settings) as s3:
        storage = Storage(s3, settings)
        await storage.check()  # the S3 client fully set up before memory at rest is read
        links = [
            (await image_links(http, args.api_url, args.api_key, f"{HUGE} upload bench #{job}"))[: args.images]
            for job in range(args.jobs)
        ]
        rest = rss_kib("VmRSS")
        started = time.perf_counter()
        moved = await asyncio.gather(*(move_job(args.mode, http, s3, storage, job, n) for n, job in enumerate(links)))
        seconds = time.perf_counter() - started
    return {
        "bytes": sum(moved),
        "seconds": seconds,
        "rest_mib": rest / 1024,
        "peak_mib": rss_kib("VmHWM") / 1024,
        "growth_mib": (rss_kib("VmHWM") - rest) / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.upload")
    parser.add_argument("mode", choices=["stream", "buffered"])
    parser.add_argument("--jobs", type=int, default=1, help="jobs at once")
    parser.add_argument("--images", type=int, default=1, help="images per job")
    parser.add_argument("--api-url", required=True)
    parser.add_argument("--api-key", required=True)
    args = parser.parse_args()
    settings = Settings()  # the bucket from the environment, as a worker's
    print(json.dumps(asyncio.run(transfer(args, settings))))


def run_transfer(stack: Stack, mode: str, jobs: int, images: int) -> dict[str, float]:
    """`python -m bench.upload` in a fresh process on the stack; its JSON report."""
    argv = [sys.executable, "-m", "bench.upload", mode, "--jobs", str(jobs), "--images", str(images)]
    argv += ["--api-url", stack.jimeng.base_url, "--api-key", JIMENG_KEY]
    measured = stack.measure(argv, timeout=600)
    if measured.returncode != 0:
        raise BenchError(f"bench.upload {mode} failed ({measured.returncode}):\n{measured.output[-2000:]}")
    report: dict[str, float] = json.loads(measured.output.strip().splitlines()[-1])
    return report


async def measure(stack: Stack, quick: bool, profile: bool) -> Figure:
    """One large image, streamed vs buffered, each run alternately in fresh processes; medians."""
    mib, runs = (30, 1) if quick else (100, 3)
    stack.jimeng_config(huge_bytes=mib * MIB)
    results: dict[str, list[dict[str, float]]] = {"stream": [], "buffered": []}
    for _ in range(runs):
        for mode, found in results.items():
            found.append(run_transfer(stack, mode, 1, 1))

    def median(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in results[mode])

    rows = [
        Row(f"upload of one {mib} MiB image: RSS growth", "MiB", median("stream", "growth_mib"),
            median("buffered", "growth_mib")),
        Row(f"upload of one {mib} MiB image: time", "s", median("stream", "seconds"), median("buffered", "seconds"),
            digits=2),
    ]  # fmt: skip
    notes = [
        f"One {mib} MiB image from the fake's link into the bucket in a fresh process, median of {runs} runs of each "
        "mode, alternating: imagegen's streamed upload (`Storage.upload_image`) vs reading it whole and one PUT.",
        f"RSS growth: VmHWM minus VmRSS once the clients are set up; peak RSS of the streamed process "
        f"{median('stream', 'peak_mib'):.0f} MiB, of the buffered one {median('buffered', 'peak_mib'):.0f} MiB.",
    ]
    return Figure("upload", rows, notes)


if __name__ == "__main__":
    main()
