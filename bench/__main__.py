"""`python -m bench`: start the local stack, measure each figure next to its baseline, print the table and
write docs/benchmarks.md.

Figures: overhead, occupancy, memory, backlog, pickup, recovery, queue-cost (status, the API and /metrics
as the backlog grows to 1M jobs), batch-occupancy (short batches of 100 and 400 prompts) (all by default) and
upload (only when named: one large image, streamed vs buffered). docs/benchmarks.md is written by a full
run: every default figure, not --quick, not --no-write.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path

from . import backlog, memory, occupancy, overhead, pickup, queuecost, recovery, upload
from .report import Figure, console_table, machine, write_docs
from .stack import Stack, clean, running_stack

Measure = Callable[[Stack, bool, bool], Awaitable[Figure]]
FIGURES: dict[str, Measure] = {
    "overhead": overhead.measure,
    "occupancy": occupancy.measure,
    "memory": memory.measure,
    "backlog": backlog.measure,
    "pickup": pickup.measure,
    "recovery": recovery.measure,
    "queue-cost": queuecost.measure,
    "batch-occupancy": occupancy.measure_batches,
    "upload": upload.measure,
}
DEFAULT = ("overhead", "occupancy", "memory", "backlog", "pickup", "recovery", "queue-cost", "batch-occupancy")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--only", default="", help=f"comma-separated figures to run, of: {', '.join(FIGURES)}")
    parser.add_argument("--quick", action="store_true", help="smaller sizes: a smoke run of a few minutes")
    parser.add_argument("--profile", action="store_true", help="also profile the overhead figure's worker")
    parser.add_argument("--no-write", action="store_true", help="leave docs/benchmarks.md alone")
    args = parser.parse_args()
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(DEFAULT)
    unknown = [n for n in names if n not in FIGURES]
    if unknown:
        parser.error(f"unknown figure {', '.join(unknown)}; choose from {', '.join(FIGURES)}")
    args.names = names
    return args


async def run_figures(stack: Stack, names: list[str], quick: bool, profile: bool) -> tuple[list[Figure], list[str]]:
    figures, failed = [], []
    for name in names:
        started = time.monotonic()
        print(f"\n== {name} ...", flush=True)
        try:
            await clean(stack)
            figure = await FIGURES[name](stack, quick, profile)
        except Exception:  # a figure that can't be measured is reported and the others still run
            traceback.print_exc()
            failed.append(name)
            continue
        figures.append(figure)
        print(console_table([figure]), flush=True)
        print(f"({time.monotonic() - started:.0f} s)", flush=True)
    return figures, failed


def main() -> None:
    args = parse_args()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="imagegen-bench-") as tmp, running_stack(Path(tmp)) as stack:
        figures, failed = asyncio.run(run_figures(stack, args.names, args.quick, args.profile))
        machine_info = machine(stack.redis_port)
    print(f"\n{console_table(figures)}\n")
    print("; ".join(f"{key}: {value}" for key, value in machine_info.items()))
    for figure in figures:
        if figure.details:
            print(f"\n{figure.details}")
    full = set(DEFAULT) <= {f.name for f in figures} and not args.quick
    if full and not args.no_write:
        print(f"\nwrote {write_docs(figures, machine_info)}")
    elif not args.no_write:
        print("\ndocs/benchmarks.md left alone (written by a full run only: every figure, not --quick)")
    print(f"total {time.monotonic() - started:.0f} s")
    if failed:
        sys.exit(f"figures that could not be measured: {', '.join(failed)}")


if __name__ == "__main__":
    main()
