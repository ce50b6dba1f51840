"""Where a worker's CPU time goes: run it under cProfile timed by CPU, then sum the profile by library.

`python -m bench.hotspots PROFILE` runs `arq imagegen.WorkerSettings` under `cProfile.Profile(time.process_time)`
(the `python -m cProfile` command line can't change the timer, and its default wall clock would count the
time spent waiting in epoll) and writes the profile when the worker stops (SIGTERM, like any stop).
"""

from __future__ import annotations

import cProfile
import pstats
import runpy
import sys
import sysconfig
import time
from pathlib import Path
from typing import cast

# Which library a function belongs to, by the first of these its file path contains.
LIBRARIES = (
    ("imagegen/", "imagegen (our code)"),
    ("/aiohttp/", "aiohttp"),
    ("/yarl/", "aiohttp"),
    ("/multidict/", "aiohttp"),
    ("/aioboto3/", "aioboto3/botocore"),
    ("/aiobotocore/", "aioboto3/botocore"),
    ("/botocore/", "aioboto3/botocore"),
    ("/boto3/", "aioboto3/botocore"),
    ("/redis/", "redis"),
    ("/hiredis/", "redis"),
    ("/arq/", "arq"),
    ("/loguru/", "loguru"),
    ("/pydantic", "pydantic"),
    ("/asyncio/", "asyncio"),
)
TOP = 25
# A pstats key (file, line, function) and entry: primitive calls, all calls, own time, cumulative time, callers.
Key = tuple[str, int, str]
Entry = tuple[int, int, float, float, object]
SMALL = 0.01  # libraries under this share of the CPU are summed into one line


def own_time(entry: Entry) -> float:
    return entry[2]


def cumulative_time(entry: Entry) -> float:
    return entry[3]


def library(filename: str) -> str:
    for marker, name in LIBRARIES:
        if marker in filename:
            return name
    if filename == "~":
        return "C built-ins"
    stdlib = sysconfig.get_paths()["stdlib"] + "/"
    if filename.startswith(stdlib):
        return "stdlib " + filename.removeprefix(stdlib).split("/")[0].removesuffix(".py")
    return "other (outside the stdlib and these libraries)"


def by_library(raw: dict[Key, Entry]) -> dict[str, float]:
    """Own CPU time per library; a C built-in's time goes to the library of the caller that ran it."""
    totals: dict[str, float] = {}
    for (filename, _, _), entry in raw.items():
        callers = cast(dict[Key, tuple[int, int, float, float]], entry[4])
        if filename == "~" and callers:
            for caller, (_, _, own, _) in callers.items():
                name = library(caller[0])
                totals[name] = totals.get(name, 0.0) + own
        else:
            totals[library(filename)] = totals.get(library(filename), 0.0) + entry[2]
    return totals


def short_path(filename: str) -> str:
    """The path from its package on, so no machine's directory layout shows."""
    for prefix in ("site-packages/", sysconfig.get_paths()["stdlib"] + "/"):
        if prefix in filename:
            return filename.split(prefix, 1)[1]
    if "/imagegen/" in filename:
        return "imagegen/" + filename.split("/imagegen/", 1)[1]
    return Path(filename).name


def _label(key: Key) -> str:
    filename, line, function = key
    return function if filename == "~" else f"{short_path(filename)}:{line}({function})"


def summarize(profile_path: Path, jobs: int) -> str:
    """A markdown section: CPU by library, then the top functions by own time and by cumulative time."""
    stats = pstats.Stats(str(profile_path))
    raw: dict[Key, Entry] = stats.stats  # type: ignore[attr-defined]
    total = sum(entry[2] for entry in raw.values()) or 1.0
    libraries = by_library(raw)
    small = sum(seconds for seconds in libraries.values() if seconds < SMALL * total)
    lines = [
        "## Where the time goes",
        "",
        f"The worker of the overhead figure under cProfile timed by CPU ({jobs:,} jobs; the profiler itself slows",
        f"it down, so read shares, not absolute times). Total CPU in the profile: {total:.1f} s,",
        f"{total * 1000 / max(jobs, 1):.1f} ms per job. By library, the time of C built-ins (socket I/O, epoll, str",
        "and dict methods...) counted in the library whose code called them:",
        "",
        "| library | own CPU s | share |",
        "| --- | --- | --- |",
    ]
    for name, seconds in sorted(libraries.items(), key=lambda item: -item[1]):
        if seconds >= SMALL * total:
            lines.append(f"| {name} | {seconds:.2f} | {seconds / total:.0%} |")
    lines.append(f"| the rest (under {SMALL:.0%} each) | {small:.2f} | {small / total:.0%} |")
    for title, column in (("own time (tottime)", own_time), ("cumulative time", cumulative_time)):
        ranked = sorted(raw.items(), key=lambda item: -column(item[1]))[:TOP]
        lines += ["", f"Top {TOP} by {title}:", "", "| function | library | calls | tottime s | cumtime s |"]
        lines.append("| --- | --- | --- | --- | --- |")
        for key, (_, calls, own, cumulative, _) in ranked:
            lines.append(f"| `{_label(key)}` | {library(key[0])} | {calls:,} | {own:.3f} | {cumulative:.3f} |")
    return "\n".join(lines)


def main() -> None:
    profile_path = sys.argv[1]
    sys.argv = ["arq", "imagegen.WorkerSettings"]
    profiler = cProfile.Profile(time.process_time)
    profiler.enable()
    try:
        runpy.run_module("arq", run_name="__main__", alter_sys=True)
    except SystemExit:
        pass
    finally:
        profiler.disable()
        profiler.dump_stats(profile_path)


if __name__ == "__main__":
    main()
