"""What a figure measured, the table it goes into, the machine it ran on, and docs/benchmarks.md."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, cast

import redis

from imagegen.dev.localstack import find_binary

DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


@dataclass(frozen=True)
class Target:
    """What imagegen's value must be: at most (`<=`), below (`<`) or at least (`>=`) `value`."""

    op: str
    value: float

    def met(self, measured: float) -> bool:
        if self.op == "<":
            return measured < self.value
        return measured <= self.value if self.op == "<=" else measured >= self.value


@dataclass(frozen=True)
class Row:
    """One line of the table: imagegen's value next to its baseline's, measured in the same run."""

    metric: str
    unit: str
    imagegen: float
    baseline: float | None
    target: Target | None = None
    digits: int = 1

    def cell(self, value: float | None) -> str:
        return "-" if value is None else f"{value:,.{self.digits}f} {self.unit}".rstrip()

    @property
    def ratio(self) -> str:
        if self.baseline is None or self.baseline == 0:
            return "-"
        return f"{self.imagegen / self.baseline:.3g}"

    @property
    def target_text(self) -> str:
        return "-" if self.target is None else f"{self.target.op} {self.target.value:g} {self.unit}".rstrip()

    @property
    def met_text(self) -> str:
        if self.target is None:
            return "-"
        return "yes" if self.target.met(self.imagegen) else "no"

    def cells(self) -> list[str]:
        return [self.metric, self.cell(self.imagegen), self.cell(self.baseline), self.ratio, self.target_text]


@dataclass
class Figure:
    """A figure's rows, how it was measured (`notes`) and any longer section for the docs (`details`)."""

    name: str
    rows: list[Row]
    notes: list[str] = field(default_factory=list)
    details: str = ""


HEADER = ["figure", "imagegen", "baseline", "ratio", "target", "met?"]


def _lines(figures: list[Figure]) -> list[list[str]]:
    return [[*row.cells(), row.met_text] for figure in figures for row in figure.rows]


def console_table(figures: list[Figure]) -> str:
    lines = [HEADER, *_lines(figures)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEADER))]
    text = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)) for line in lines]
    text.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(text)


def markdown_table(figures: list[Figure]) -> str:
    lines = [HEADER, ["---"] * len(HEADER), *_lines(figures)]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def _version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False).stdout
    except OSError:
        return "unknown"
    return out.strip().splitlines()[0] if out.strip() else "unknown"


def machine(redis_port: int) -> dict[str, str]:
    """The machine and the versions of everything in the figures."""
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    ram_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            ram_kib = int(line.split()[1])
    client = redis.Redis(host="127.0.0.1", port=redis_port)
    try:
        info = cast(dict[str, Any], client.info("server"))
        redis_version = str(info["redis_version"])
    finally:
        client.close()
    weed = _version([find_binary("weed", ""), "version"])
    return {
        "CPU": f"{cpu}, {os.cpu_count()} cores",
        "RAM": f"{ram_kib / 1024 / 1024:.1f} GiB",
        "OS": f"{platform.system()} {platform.release()} ({platform.machine()})",
        "Python": platform.python_version(),
        "Redis": redis_version,
        "PocketBase": _version([find_binary("pocketbase", ""), "--version"]).removeprefix("pocketbase version "),
        "SeaweedFS": " ".join(word for word in weed.split()[1:3] if not word.endswith("GB")),
        "date": datetime.now().astimezone().isoformat(timespec="minutes"),
    }


def command_line() -> str:
    args = " ".join(sys.argv[1:])
    return f"python -m bench {args}".rstrip()


def write_docs(figures: list[Figure], machine_info: dict[str, str]) -> Path:
    """docs/benchmarks.md: the table, the machine, how each figure is measured, the profile if any."""
    parts = [
        "# Benchmarks",
        "",
        "Every figure is measured by `python -m bench` (`make bench`) in one run, on a local stack it starts itself:",
        "real Redis, PocketBase and SeaweedFS on loopback ports with temp data, the jimeng fake in the harness's",
        "process (fixed latency, no jitter) and workers as real `arq imagegen.WorkerSettings` processes. Each figure",
        "sits next to its baseline measured the same way in the same run; ratio = imagegen / baseline.",
        "",
        f"Reproduce: `{command_line()}`",
        "",
        markdown_table(figures),
        "",
        "## Machine",
        "",
        *(f"- {key}: {value}" for key, value in machine_info.items()),
        "",
        "## How each figure is measured",
        "",
    ]
    for figure in figures:
        parts += [f"### {figure.name}", "", *(f"- {note}" for note in figure.notes), ""]
    for figure in figures:
        if figure.details:
            parts += [figure.details, ""]
    DOCS.parent.mkdir(exist_ok=True)
    DOCS.write_text("\n".join(parts).rstrip() + "\n")
    return DOCS
