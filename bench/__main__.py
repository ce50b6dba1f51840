"""`python -m bench [--mib N] [--runs K]`: streamed vs buffered upload of one large generated image.

Starts a real SeaweedFS S3 server and the jimeng sandbox serving an N MiB image, then runs each mode K times
in fresh processes, alternating, and prints the median time and peak memory of each side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

from imagegen.jimeng_sandbox import SandboxConfig, SandboxThread
from imagegen.localstack import RunningService, ensure_bucket, free_port, seaweed_spec

MIB = 1024 * 1024
KEYS = {"access_key": "bench-access", "secret_key": "bench-secret-key"}


def image_url(sandbox: SandboxThread) -> str:
    request = urllib.request.Request(
        f"{sandbox.base_url}/images/generations",
        data=json.dumps({"prompt": "bench [[jimeng:img-huge]]"}).encode(),
        headers={"Authorization": "Bearer bench", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return str(json.load(response)["data"][0]["url"])


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--mib", type=int, default=100, help="image size")
    parser.add_argument("--runs", type=int, default=3, help="runs of each mode")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port(also_free_offset=10000, below=55535)
        with (
            RunningService(seaweed_spec(Path(tmp) / "s3", port, **KEYS)),
            SandboxThread(SandboxConfig(api_key="bench", huge_bytes=args.mib * MIB)) as sandbox,
        ):
            endpoint = f"http://127.0.0.1:{port}"
            asyncio.run(ensure_bucket(endpoint, KEYS["access_key"], KEYS["secret_key"], "bench"))
            url = image_url(sandbox)
            results: dict[str, list[dict[str, float]]] = {"stream": [], "buffered": []}
            for _ in range(args.runs):
                for mode in results:
                    out = subprocess.run(
                        [
                            sys.executable,
                            "-m",
                            "bench.upload",
                            mode,
                            "--url",
                            url,
                            "--endpoint",
                            endpoint,
                            "--bucket",
                            "bench",
                            "--access-key",
                            KEYS["access_key"],
                            "--secret-key",
                            KEYS["secret_key"],
                        ],
                        capture_output=True,
                        text=True,
                        check=True,
                    )
                    results[mode].append(json.loads(out.stdout))
    print(f"one {args.mib} MiB image, download -> S3 upload, median of {args.runs} runs each")
    print(f"{'mode':<10} {'seconds':>8} {'peak RSS MiB':>13}")
    for mode, runs in results.items():
        seconds = statistics.median(r["seconds"] for r in runs)
        peak = statistics.median(r["peak_rss_mib"] for r in runs)
        print(f"{mode:<10} {seconds:>8.2f} {peak:>13.1f}")


if __name__ == "__main__":
    main()
