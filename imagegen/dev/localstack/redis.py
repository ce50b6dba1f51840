"""A local Redis server: loopback only, no persistence, optionally password-protected."""

from __future__ import annotations

import socket
from pathlib import Path

from .process import ServiceSpec, child_env, find_binary

REDIS_INSTALL_HINT = "install it with: sudo apt-get install redis-server (or your OS package manager)"


def _command(*parts: str) -> bytes:
    """One command in RESP, so a password with spaces or quotes goes through intact."""
    encoded = [part.encode() for part in parts]
    return b"*%d\r\n" % len(encoded) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in encoded)


def redis_ping(port: int, password: str | None = None, *, host: str = "127.0.0.1", timeout: float = 1.0) -> bool:
    """True when Redis at host:port answers PING with PONG (after AUTH when a password is given)."""
    request = (_command("AUTH", password) if password is not None else b"") + _command("PING")
    expected_lines = 2 if password is not None else 1
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(request)
            reply = b""
            while reply.count(b"\r\n") < expected_lines:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                reply += chunk
    except OSError:
        return False
    return reply.endswith(b"+PONG\r\n") and not reply.startswith(b"-")


def redis_spec(data_dir: Path, port: int, password: str | None = None) -> ServiceSpec:
    """`redis-server` on 127.0.0.1:`port`, working in `data_dir`, with RDB snapshots and AOF turned off.

    The password, when given, is passed with `--requirepass` (so it shows in the process list: fine for a
    local test or demo server, not for a shared host).
    """
    binary = find_binary("redis-server", REDIS_INSTALL_HINT)
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = [
        binary,
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--dir", str(data_dir),
        "--save", "",
        "--appendonly", "no",
    ]  # fmt: skip
    if password is not None:
        argv += ["--requirepass", password]
    return ServiceSpec(
        name="redis",
        argv=argv,
        env=child_env(),
        cwd=data_dir,
        log_path=data_dir / "redis.log",
        probe=lambda: redis_ping(port, password),
        start_timeout=10.0,
        stop_timeout=5.0,
        url=f"redis://127.0.0.1:{port}/0",
    )
