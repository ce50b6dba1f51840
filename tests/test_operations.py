"""The README's table for operators coming from the BullMQ system, run line by line as a new user would: in a
project directory with its virtualenv active, in bash and in zsh, against the real services."""

from __future__ import annotations

import os
import random
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import BIN, RecordFactory, Stack, wait_for_records
from .test_pipeline import wait_until

ROOT = Path(__file__).resolve().parent.parent


def migration_table() -> dict[str, str]:
    """BullMQ command (with its note) -> imagegen command, from the README."""
    readme = (ROOT / "README.md").read_text()
    table = readme.split("| BullMQ system | imagegen |", 1)[1].split("\n\n", 1)[0]
    rows = {}
    for line in table.splitlines()[2:]:
        old, new = (cell.strip() for cell in line.strip("|").split("|"))
        commands = re.findall(r"`([^`]+)`", new)
        assert len(commands) == 1, line
        rows[old.replace("`", "")] = commands[0]
    return rows


SEQUENCE = [
    ("bun run worker:start", 0),
    ("bun run worker:status", 0),
    ("bun run queue:single <id>", 0),
    ("bun run queue:pending", 0),
    ("bun run queue:status <id>", 0),
    ("bun run worker:status, the queue", 0),
    ("bun run worker:logs", 124),  # follows the logs until `timeout` ends it
    ("bun run worker:stop", 0),
    ("bun run worker:start, after a stop", 0),
    ("bun run worker:restart", 0),
    ("stop supervisord itself", 0),
]


def test_the_table_covers_every_old_script():
    assert sorted(migration_table()) == sorted(name for name, _ in SEQUENCE)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("shell", ["bash", "zsh"])
async def test_every_row_of_the_migration_table_works_as_written(
    stack: Stack, records: RecordFactory, pocketbase, tmp_path, shell
):
    if shutil.which(shell) is None:
        pytest.skip(f"{shell} is not installed here")
    project = tmp_path / "project"
    (project / "logs").mkdir(parents=True)
    # Two worker processes, as the README suggests for more throughput: each must get its own log files.
    conf = (ROOT / "supervisord.conf").read_text()
    assert "numprocs=1\n" in conf
    (project / "supervisord.conf").write_text(conf.replace("numprocs=1\n", "numprocs=2\n"))
    os.symlink(Path(sys.prefix), project / ".venv")
    # "with its virtualenv active": what `source .venv/bin/activate` does to PATH. Metrics on: each process
    # serves them on a port of its own.
    metrics = fixed_ports(2)
    env = stack.process_env(VIRTUAL_ENV=str(project / ".venv"), WORKER_METRICS_PORT=str(metrics))
    env["PATH"] = f"{project / '.venv' / 'bin'}{os.pathsep}{env['PATH']}"
    table = migration_table()
    first, second = await records.create("a row by row check"), await records.create("a pending one")

    def run(name: str) -> subprocess.CompletedProcess[str]:
        command = table[name].replace("<id>", first.id)
        if name == "bun run worker:logs":
            command = f"timeout 2 {command}"
        return subprocess.run(
            [shell, "-c", command], cwd=project, env=env, capture_output=True, text=True, timeout=120, check=False
        )

    try:
        for name, expected in SEQUENCE:
            done = run(name)
            assert done.returncode == expected, (name, done.stdout, done.stderr, _error_logs(project))
            if name == "bun run worker:start":
                assert await _worker_running(run)
            if name == "bun run queue:pending":
                assert (await wait_for_records(pocketbase, [first.id, second.id]))[1].status == "done"
                assert await wait_until(lambda: _jobs_done(metrics, metrics + 1), deadline=20) == 2
            if name == "bun run queue:status <id>":
                assert "state:     done" in done.stdout
            if name == "bun run worker:logs":
                assert "job done: 4 images" in done.stdout
                for n in (0, 1):
                    assert f"==> logs/worker-{n}-out.log <==" in done.stdout
                    assert f"==> logs/worker-{n}-error.log <==" in done.stdout
            if name == "bun run worker:stop":
                assert "stopped" in done.stdout
            if name in ("bun run worker:start, after a stop", "bun run worker:restart"):
                assert "started" in done.stdout
    finally:
        subprocess.run(
            [str(BIN / "supervisorctl"), "-c", str(project / "supervisord.conf"), "shutdown"],
            capture_output=True,
            timeout=120,
            env=env,
        )


def fixed_ports(count: int) -> int:
    """The first of `count` free loopback ports in a row, below the kernel's ephemeral range: a worker that
    is stopped and started again binds the same port, which an ephemeral port handed to another process
    meanwhile could otherwise have taken."""
    rng = random.Random()
    for _ in range(200):
        first = rng.randrange(20000, 32000)
        if all(_bindable(port) for port in range(first, first + count)):
            return first
    raise AssertionError("no free ports in 20000-32000")


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _error_logs(project: Path) -> str:
    return "\n".join(f"{log.name}: {log.read_text()[-2000:]}" for log in sorted((project / "logs").glob("*-error.log")))


async def _jobs_done(*ports: int) -> int:
    """Jobs done by the worker processes behind these metrics ports (every one must answer)."""
    done = 0
    async with aiohttp.ClientSession() as http:
        for port in ports:
            async with http.get(f"http://127.0.0.1:{port}/metrics") as response:
                assert response.status == 200
                for family in text_string_to_metric_families(await response.text()):
                    done += sum(
                        int(s.value)
                        for s in family.samples
                        if s.name == "imagegen_jobs_total" and s.labels == {"outcome": "done"}
                    )
    return done


async def _worker_running(run) -> bool:
    async def running() -> bool:
        return "RUNNING" in run("bun run worker:status").stdout

    return bool(await wait_until(running, deadline=30))
