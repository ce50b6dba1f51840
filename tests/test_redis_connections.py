"""Reaching Redis by URL over TLS (`rediss://`, REDIS_URL) and through Redis Sentinel (REDIS_SENTINELS): a real
TLS Redis and a real Sentinel, the worker and the CLI both using them."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from imagegen.dev.localstack import RunningService, ServiceSpec, child_env, find_binary, free_port
from imagegen.dev.localstack.redis import REDIS_INSTALL_HINT, redis_ping

from .conftest import RecordFactory, Stack, run_cli, wait_for_records

PASSWORD = "tls-redis-pw-4b7d"


def _spec(name: str, argv: list[str], workdir: Path, probe) -> ServiceSpec:
    return ServiceSpec(
        name=name,
        argv=argv,
        env=child_env(),
        cwd=workdir,
        log_path=workdir / f"{name}.log",
        probe=probe,
        start_timeout=10,
        stop_timeout=5,
        url="",
    )


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A Redis that speaks only TLS, with a certificate from a throwaway CA; yields its URL and the CA file."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    ca_file, cert_file, key_file = tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    port = free_port()
    argv = [
        find_binary("redis-server", REDIS_INSTALL_HINT),
        *("--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1"),
        *("--tls-cert-file", str(cert_file), "--tls-key-file", str(key_file), "--tls-ca-cert-file", str(ca_file)),
        *("--tls-auth-clients", "no", "--requirepass", PASSWORD, "--save", "", "--appendonly", "no"),
        *("--dir", str(tmp_path)),
    ]
    service = RunningService(_spec("redis-tls", argv, tmp_path, lambda: _tls_ping(port, ca_file)))
    service.start()
    try:
        yield f"rediss://:{PASSWORD}@127.0.0.1:{port}/0", ca_file
    finally:
        service.stop()


def _tls_ping(port: int, ca_file: Path) -> bool:
    import redis

    client = redis.Redis(host="127.0.0.1", port=port, ssl=True, ssl_ca_certs=str(ca_file), password=PASSWORD)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


@pytest.fixture
def sentinel_redis(tmp_path: Path) -> Iterator[str]:
    """A plain Redis and a Sentinel watching it as `mymaster`; yields the Sentinel's host:port."""
    binary = find_binary("redis-server", REDIS_INSTALL_HINT)
    data_port, sentinel_port = free_port(), free_port()
    data = RunningService(
        _spec(
            "redis-data",
            [binary, "--port", str(data_port), "--bind", "127.0.0.1", "--save", "", "--dir", str(tmp_path)],
            tmp_path,
            lambda: redis_ping(data_port),
        )
    )
    conf = tmp_path / "sentinel.conf"
    conf.write_text(
        f"port {sentinel_port}\nbind 127.0.0.1\ndir {tmp_path}\nsentinel monitor mymaster 127.0.0.1 {data_port} 1\n"
    )
    sentinel = RunningService(
        _spec("redis-sentinel", [binary, str(conf), "--sentinel"], tmp_path, lambda: redis_ping(sentinel_port))
    )
    data.start()
    try:
        sentinel.start()
        try:
            yield f"127.0.0.1:{sentinel_port}"
        finally:
            sentinel.stop()
    finally:
        data.stop()


# REDIS_HOST/REDIS_PORT pointing nowhere, so only the URL or Sentinel can work.
NOWHERE = {"REDIS_HOST": "127.0.0.1", "REDIS_PORT": "1", "REDIS_PASSWORD": ""}


@pytest.mark.timeout(180)
async def test_worker_and_cli_reach_redis_over_tls_by_url(
    stack: Stack, records: RecordFactory, pocketbase, tls_redis, start_worker
):
    # tls_redis before start_worker: the worker is stopped (at teardown) while its Redis still runs.
    url, ca_file = tls_redis
    env = {**NOWHERE, "REDIS_URL": url, "REDIS_TLS_CA_FILE": str(ca_file)}
    record = await records.create("a lighthouse behind TLS")
    worker = start_worker(**env)
    added = run_cli(stack, "add", record.id, **env)
    assert added.returncode == 0, added.stderr
    assert (await wait_for_records(pocketbase, [record.id], deadline=60))[0].status == "done"
    check = run_cli(stack, "check", **env)
    target, redis_line = check.stdout.splitlines()[:2]
    assert re.match(r"target: Redis 127\.0\.0\.1:\d+/0 over TLS, queue imagegen:queue; PocketBase ", target), target
    assert redis_line.startswith("redis       ok")
    assert "rediss://127.0.0.1:" in redis_line
    for text in (check.stdout, check.stderr, worker.output()):
        assert PASSWORD not in text


def test_a_tls_redis_without_its_ca_is_refused_clearly(stack: Stack, tls_redis):
    url, _ = tls_redis
    env = {**NOWHERE, "REDIS_URL": url}
    result = run_cli(stack, "status", **env)
    assert result.returncode == 3
    assert len(result.stderr.strip().splitlines()) == 1
    assert "cannot reach rediss://127.0.0.1:" in result.stderr
    assert PASSWORD not in result.stderr


@pytest.mark.timeout(180)
async def test_worker_and_cli_find_redis_through_sentinel(
    stack: Stack, records: RecordFactory, pocketbase, sentinel_redis, start_worker
):
    env = {**NOWHERE, "REDIS_SENTINELS": sentinel_redis, "REDIS_SENTINEL_MASTER": "mymaster"}
    record = await records.create("a lighthouse found by a sentinel")
    start_worker(**env)
    added = run_cli(stack, "add", record.id, **env)
    assert added.returncode == 0, added.stderr
    assert (await wait_for_records(pocketbase, [record.id], deadline=60))[0].status == "done"
    status = run_cli(stack, "status", **env)
    assert "workers:   1 live" in status.stdout
