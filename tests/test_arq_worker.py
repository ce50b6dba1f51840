"""The worker's one seam with arq: its contract with the installed arq, `imagegen worker` and its `--check`, and
`arq imagegen.WorkerSettings` taken over by the same worker."""

from __future__ import annotations

import asyncio
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest
from arq.constants import in_progress_key_prefix
from arq.worker import Worker

import imagegen
from imagegen.dev.localstack import free_port
from imagegen.errors import ConfigError
from imagegen.ops.control import open_control
from imagegen.queue.enqueue import JobQueue
from imagegen.queue.keys import RedisKeys
from imagegen.worker.arqworker import OVERRIDDEN, START_LINE, ImagegenWorker, check_arq
from imagegen.worker.intake import Intake

from .conftest import (
    ARQ_WORKER,
    BIN,
    IMAGEGEN_WORKER,
    SECRETS,
    SETTING_PREFIXES,
    RecordFactory,
    Stack,
    run_cli,
    wait_for_records,
)
from .test_pipeline import wait_until

PACKAGE = Path(imagegen.__file__).parent
SEAM = PACKAGE / "worker" / "arqworker.py"
COMMANDS = {"imagegen worker": IMAGEGEN_WORKER, "arq imagegen.WorkerSettings": ARQ_WORKER}


def run(command: tuple[str, ...], *args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    # The timeout only guards the suite against a hang: either command answers in a few seconds.
    return subprocess.run(
        [str(BIN / command[0]), *command[1:], *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def only_redis(stack: Stack, **redis: str) -> dict[str, str]:
    """A process environment with the Redis settings alone (no PocketBase, bucket or jimeng)."""
    others = tuple(prefix for prefix in SETTING_PREFIXES if prefix not in ("REDIS_", "QUEUE_"))
    env = {key: value for key, value in stack.process_env().items() if not key.startswith(others)}
    env.update(redis)
    return env


# --- the contract with the installed arq --------------------------------------------------------------------


def test_installed_arq_is_shaped_as_the_worker_expects():
    check_arq()
    overridden = {
        name
        for name, value in vars(ImagegenWorker).items()
        if callable(value) and not name.startswith("__") and hasattr(Worker, name)
    }
    assert overridden == set(OVERRIDDEN)
    for name, parameters in OVERRIDDEN.items():
        assert tuple(inspect.signature(getattr(ImagegenWorker, name)).parameters) == parameters
    # The job start line that the priority filter corrects is arq's own.
    assert START_LINE in inspect.getsource(Worker.run_job)


def test_a_changed_arq_is_named_with_its_version(monkeypatch):
    async def start_jobs(self: Worker, job_ids: list[bytes], limit: int) -> None: ...

    monkeypatch.setattr(Worker, "start_jobs", start_jobs)
    with pytest.raises(ConfigError, match=r"^arq 0\.28\.0 is not the arq .*start_jobs.*pyproject"):
        check_arq()


def test_an_arq_whose_run_job_changed_is_named_too(monkeypatch):
    async def run_job(self: Worker, job_id: str) -> None: ...

    monkeypatch.setattr(Worker, "run_job", run_job)
    with pytest.raises(ConfigError, match=r"^arq 0\.28\.0 is not the arq .*run_job.*pyproject"):
        check_arq()


async def test_workers_claiming_at_once_share_no_job_and_mark_each_in_progress(settings, redis_client):
    keys = RedisKeys(settings.queue_name)
    ids = [f"claimtest{n:06d}" for n in range(30)]
    async with open_control(settings) as control:
        assert all(await JobQueue(control.redis, settings.queue_name, keys).put(ids))
    first, second = (Intake(redis_client, keys, settings.queue_name, 0.5) for _ in range(2))
    claimed = await asyncio.gather(first.claim(20, 60_000), second.claim(20, 60_000))
    taken = [job_id.decode() for found in claimed for job_id, _ in found]
    assert sorted(taken) == ids  # 20 and 10: every job once
    scores = {job_id.decode(): score for found in claimed for job_id, score in found}
    assert scores == {i: int(await redis_client.zscore(settings.queue_name, i)) for i in ids}
    lives = [await redis_client.pttl(in_progress_key_prefix + i) for i in ids]
    assert all(0 < ms <= 60_000 for ms in lives)
    assert await first.claim(20, 60_000) == []


def test_no_module_but_the_seam_touches_arq_internals():
    private = set(re.findall(r"self\.(_[a-z]\w*)", inspect.getsource(Worker))) | {
        name for name in vars(Worker) if name.startswith("_") and not name.startswith("__")
    }
    assert "_poll_iteration" in private and "_handle_signals" in private
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        if re.search(r"currentframe|f_back|f_locals|_getframe", text):
            offenders.append(f"{path.name}: frame inspection")
        if path == SEAM:
            continue
        # A module's own attribute of the same name (`self._pool = ...`) is not arq's.
        offenders += [
            f"{path.name}: {name}"
            for name in private
            if re.search(rf"\.{name}\b", text) and not re.search(rf"self\.{name}\b[^\n=]*=", text)
        ]
        if re.search(r"setattr\(\s*worker", text):
            offenders.append(f"{path.name}: setattr on a worker")
    assert offenders == []


@pytest.mark.parametrize("label", COMMANDS)
def test_a_changed_arq_stops_the_worker_with_one_line(label: str, stack: Stack, tmp_path: Path):
    patch = tmp_path / "patch"
    patch.mkdir()
    (patch / "sitecustomize.py").write_text(
        "import arq.worker\n"
        "async def start_jobs(self, job_ids, limit):\n"
        "    pass\n"
        "arq.worker.Worker.start_jobs = start_jobs\n"
    )
    env = stack.process_env(PYTHONPATH=str(patch))
    result = run(COMMANDS[label], env=env, cwd=tmp_path)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if "imagegen worker:" in line]
    assert len(lines) == 1, result.stderr
    assert "arq 0.28.0 is not the arq imagegen's worker was built on" in lines[0]
    assert "start_jobs" in lines[0]
    assert "Traceback" not in result.stderr + result.stdout


# --- --check ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("label", COMMANDS)
def test_check_with_redis_down_answers_1_at_once_with_only_redis_settings(label: str, stack: Stack, tmp_path: Path):
    env = only_redis(stack, REDIS_HOST="127.0.0.1", REDIS_PORT=str(free_port()))
    env.pop("REDIS_URL", None)
    result = run(COMMANDS[label], "--check", env=env, cwd=tmp_path)
    assert result.returncode == 1
    output = result.stdout + result.stderr
    assert "cannot reach Redis at 127.0.0.1" in output
    assert "Traceback" not in output
    assert not any(secret in output for secret in SECRETS)


async def test_check_follows_a_live_worker(
    stack: Stack, records: RecordFactory, pocketbase, start_worker, tmp_path: Path
):
    env = only_redis(stack)
    for command in COMMANDS.values():
        result = run(command, "--check", env=env, cwd=tmp_path)
        assert result.returncode == 1, result.stderr
        assert "no live worker" in result.stderr
        assert f"queue {stack.settings().queue_name}" in result.stderr

    worker = start_worker(IMAGEGEN_WORKER)
    record = await records.create("a lighthouse at dusk")
    assert run_cli(stack, "add", record.id).returncode == 0
    done = await wait_for_records(pocketbase, [record.id])
    assert done[0].status == "done" and done[0].image_url

    async def both_alive() -> bool:
        return all(run(command, "--check", env=env, cwd=tmp_path).returncode == 0 for command in COMMANDS.values())

    assert await wait_until(both_alive, deadline=30)
    alive = run(ARQ_WORKER, "--check", env=env, cwd=tmp_path)
    assert "worker alive" in alive.stdout and "j_complete=" in alive.stdout

    assert worker.stop() == 0  # SIGTERM: a clean stop, and arq removes its health key
    assert "worker stopped" in worker.output()
    assert run(IMAGEGEN_WORKER, "--check", env=env, cwd=tmp_path).returncode == 1


# --- the adoption point -------------------------------------------------------------------------------------


def test_worker_settings_read_outside_arqs_command_line_refuse_with_one_line(stack: Stack, tmp_path: Path):
    code = "import imagegen\nfrom arq.worker import create_worker\ncreate_worker(imagegen.WorkerSettings)\n"
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=stack.process_env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "imagegen.WorkerSettings is for arq's command line" in result.stderr
    assert "Traceback" not in result.stderr
