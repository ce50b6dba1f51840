"""`python -m bench.stall`: a client that pings Redis in a loop and writes down every slow answer.

Run as a process of its own (its pings wait for nobody's event loop or GIL but Redis's), it appends one line
per ping slower than --over ms to --out, `<start epoch seconds> <seconds>`, until killed. A figure reads the
pings that overlap a call it made: the longest one is how long Redis was stalled, for every other client,
while that call ran.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import redis


def ping_forever(port: int, out: Path, over: float) -> None:
    client = redis.Redis(host="127.0.0.1", port=port)
    client.ping()
    with out.open("a", buffering=1) as log:
        log.write(f"{time.time():.6f} 0\n")  # ready
        while True:
            started, clock = time.time(), time.perf_counter()
            client.ping()
            took = time.perf_counter() - clock
            if took > over:
                log.write(f"{started:.6f} {took:.6f}\n")


def slowest_ping(out: Path, start: float, end: float) -> float:
    """The longest ping (seconds) that overlapped [start, end]; 0 when none was slow."""
    longest = 0.0
    for line in out.read_text().splitlines():
        began, took = (float(part) for part in line.split())
        if began <= end and began + took >= start:
            longest = max(longest, took)
    return longest


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.stall")
    parser.add_argument("--redis-port", type=int, required=True)
    parser.add_argument("--out", required=True, help="the file the slow pings are appended to")
    parser.add_argument("--over", type=float, default=0.5, help="milliseconds: faster pings are not written")
    args = parser.parse_args()
    ping_forever(args.redis_port, Path(args.out), args.over / 1000)


if __name__ == "__main__":
    main()
