"""The README's first command: the local stack comes up, its records end with images that serve, it stops."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from imagegen.clients.download import sniff_image_type

from .conftest import SETTING_PREFIXES

CANARY = "IMAGEGEN_TEST_CANARY_8e1f"


def devstack(project: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(SETTING_PREFIXES)}
    env[CANARY] = "must-not-be-written-anywhere"
    return subprocess.run(
        [sys.executable, "-m", "imagegen.dev.devstack", *args],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def printed_command(project: Path, line: str) -> subprocess.CompletedProcess[str]:
    """The command of one of the demo's last lines (`Status:    <command>`), run as printed in a shell from the
    project directory, with none of the tests' settings in the environment."""
    return subprocess.run(
        ["bash", "-c", line.split(":", 1)[1].strip()],
        cwd=project,
        env={k: v for k, v in os.environ.items() if not k.startswith(SETTING_PREFIXES)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.timeout(600)
def test_local_stack_turns_the_sample_prompts_into_hosted_images(tmp_path: Path):
    try:
        up = devstack(tmp_path, "up", "--wait", "120")
        assert up.returncode == 0, up.stdout + up.stderr
        # The six samples and the record created through the REST API: every record listed is counted.
        assert "7 of 7 records done" in up.stdout
        # Then one record created through PocketBase's REST API, queued by the watching worker alone.
        watched = re.search(r"created ([a-z0-9]{15}) with POST /api/collections/prompts/records", up.stdout)
        assert watched is not None, up.stdout
        assert re.search(rf"^{watched.group(1)}  \[done\]", up.stdout, flags=re.MULTILINE), up.stdout
        assert "The record created through the REST API reached done with no command" in up.stdout
        urls = re.findall(r"^    (http://\S+)  \(HTTP 200, image/", up.stdout, flags=re.MULTILINE)
        assert len(urls) == 28
        for url in urls[:4]:
            with urllib.request.urlopen(url, timeout=10) as response:
                assert sniff_image_type(response.read(16)) is not None
        assert (tmp_path / "logs" / "worker-0-out.log").read_text().count("job done: 4 images") == 7

        # Its last lines: the dashboard, which answers while the stack runs, and commands that work as printed.
        last = up.stdout.strip().splitlines()[-4:]
        assert [line.split(":", 1)[0] for line in last] == ["Dashboard", "Status", "Inspect", "Stop"], last
        url = last[0].split(None, 1)[1]
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/", url), last[0]
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.status == 200
            assert "<title>imagegen</title>" in response.read().decode()
        status = printed_command(tmp_path, last[1])
        assert status.returncode == 0, status.stderr
        assert status.stdout.startswith("target: Redis 127.0.0.1:"), status.stdout
        assert "7 done" in status.stdout and "workers:   1 live" in status.stdout
        inspect = printed_command(tmp_path, last[2])
        assert inspect.returncode == 0, inspect.stderr
        assert "state:     done" in inspect.stdout
        assert last[3] == "Stop:      make demo-stop"
        assert "demo-stop:" in (Path(__file__).resolve().parent.parent / "Makefile").read_text()
        # Only what each service needs reaches supervisord's file; the sandbox's key stays off command lines.
        conf = (tmp_path / ".stack" / "supervisord.conf").read_text()
        assert CANARY not in conf
        stack_env = (tmp_path / ".stack" / "imagegen.env").read_text()
        key = re.search(r"^JIMENG_API_KEY=(\S+)$", stack_env, flags=re.MULTILINE)
        assert key is not None
        assert (tmp_path / ".stack" / "supervisord.conf").stat().st_mode & 0o077 == 0  # it holds the worker's
        assert key.group(1) not in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout

        again = devstack(tmp_path, "up", "--wait", "60")
        assert again.returncode == 0, again.stdout + again.stderr
        assert "already running" in again.stdout
        assert f"Dashboard: {url}" in again.stdout
        assert "queued 0 of 0 pending records" in again.stdout
    finally:
        down = devstack(tmp_path, "down")
    assert down.returncode == 0
    assert "local stack stopped" in down.stdout
    assert devstack(tmp_path, "down").stdout.strip() == "the local stack is not running"
