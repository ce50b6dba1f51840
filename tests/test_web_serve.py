"""`imagegen serve` as an operator runs it: a real subprocess, its bind rules, and a property-based run of
schemathesis against the OpenAPI document it serves."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from imagegen.dev.localstack import free_port

from .conftest import BIN, SECRETS, RecordFactory, Stack, run_cli
from .test_cli import assert_one_clean_line

TOKEN = "test-serve-token-5c1a9f"
EXAMPLES_PER_OPERATION = 25


@dataclass
class Served:
    url: str
    process: subprocess.Popen[str]
    log: Path

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start_serving(stack: Stack, log: Path, wait_for: str = "/healthz", **env: str) -> Served:
    """`imagegen serve` on a free loopback port; returns once `wait_for` answers 200."""
    port = free_port()
    with log.open("w") as out:
        process = subprocess.Popen(
            [str(BIN / "imagegen"), "serve", "--port", str(port)],
            cwd=stack.workdir,
            env=stack.process_env(**env),
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
    served = Served(f"http://127.0.0.1:{port}", process, log)
    end = time.monotonic() + 30
    while time.monotonic() < end and process.poll() is None:
        try:
            if requests.get(f"{served.url}{wait_for}", timeout=2).status_code == 200:
                return served
        except requests.ConnectionError:
            pass
        time.sleep(0.1)
    served.stop()
    raise AssertionError(f"imagegen serve did not come up: {log.read_text()}")


@pytest.fixture
def served(stack: Stack, tmp_path: Path) -> Iterator[Served]:
    server = start_serving(stack, tmp_path / "serve.log", API_TOKEN=TOKEN)
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize("how", ["flag", "setting"])
def test_serve_refuses_a_non_loopback_address_without_a_token(stack: Stack, how: str):
    args, env = (["--host", "0.0.0.0"], {}) if how == "flag" else ([], {"WEB_HOST": "0.0.0.0"})
    result = run_cli(stack, "serve", *args, timeout=30, **env)
    assert result.returncode == 2
    assert_one_clean_line(result.stderr)
    assert "refusing to listen on '0.0.0.0' without API_TOKEN" in result.stderr


def test_serve_says_when_its_port_is_taken(stack: Stack, served: Served):
    port = served.url.rsplit(":", 1)[1]
    result = run_cli(stack, "serve", "--port", port, timeout=30, API_TOKEN=TOKEN)
    assert result.returncode == 2
    assert_one_clean_line(result.stderr)
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr


def test_serve_answers_and_stops_on_sigterm(served: Served):
    assert requests.get(f"{served.url}/healthz", timeout=5).json() == {"ok": True, "status": "ok"}
    assert requests.get(f"{served.url}/api/queue", timeout=5).status_code == 401
    queue = requests.get(f"{served.url}/api/queue", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5)
    assert queue.status_code == 200
    assert served.stop() == 0
    log = served.log.read_text()
    assert f"serving the API and dashboard on {served.url}/ (token required)" in log
    for secret in (*SECRETS, TOKEN):
        assert secret not in log


async def test_schemathesis_finds_no_server_error(served: Served, records: RecordFactory, stack: Stack):
    # Some queued records, so that generated calls meet real data as well as ids that don't exist.
    created = await records.many(3, prefix="a property-based prompt")
    assert run_cli(stack, "add", *(r.id for r in created)).returncode == 0
    run_schemathesis(served.url)


def refs_in(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from refs_in(value)
    elif isinstance(node, list):
        for value in node:
            yield from refs_in(value)


def resolve(document: dict[str, Any], pointer: str) -> Any:
    assert pointer.startswith("#/"), pointer
    node: Any = document
    for part in pointer[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def run_schemathesis(base_url: str) -> None:
    raw = requests.get(f"{base_url}/api/openapi.json", timeout=10).json()
    # What a client generator trips on first: a $ref to nothing, an id parameter without its pattern.
    for pointer in set(refs_in(raw)):
        assert resolve(raw, pointer) is not None, pointer
    for path, item in raw["paths"].items():
        for parameter in (p for op in item.values() for p in op.get("parameters", []) if p["in"] == "path"):
            assert parameter["schema"].get("pattern"), path
    schema = schemathesis.openapi.from_url(f"{base_url}/api/openapi.json", timeout=10)
    schema.validate()  # against the OpenAPI 3.1 meta-schema
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    operations = [result.ok() for result in schema.get_all_operations()]  # type: ignore[union-attr]
    assert len(operations) >= 10  # every route (schemathesis may leave out the document itself)
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=EXAMPLES_PER_OPERATION,
                deadline=None,
                database=None,
                phases=[Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            def check(case: schemathesis.Case[Any]) -> None:
                response = case.call(base_url=base_url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=20)
                assert response.status_code < 500, (case.method, case.formatted_path, response.text)
                case.validate_response(response, checks=checks)

            try:
                check()
            except Unsatisfiable:
                # Nothing to get wrong: the route takes no parameters and no body.
                assert mode is GenerationMode.NEGATIVE
