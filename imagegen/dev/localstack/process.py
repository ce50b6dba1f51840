"""Process specs for local services and a small runner that starts and stops one.

A `ServiceSpec` says everything needed to run a service (argv, environment, directory, log file and a
readiness probe), so the same description serves the pytest fixtures (through `RunningService`) and the
demo stack (written out as a supervisord program).
"""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

# Ports handed out lately: binding port 0 twice in a row can give the same port back, and callers usually
# ask for several ports before starting anything.
_recent_ports: deque[int] = deque(maxlen=256)

# Environment variables worth passing on to a service; everything else (credentials above all) stays out.
_INHERITED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "SYSTEMROOT")

_POLL_INTERVAL = 0.05


class LocalStackError(Exception):
    """A local service could not be found, prepared, started or stopped."""


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(*, also_free_offset: int | None = None, below: int | None = None, preferred: int | None = None) -> int:
    """A loopback TCP port nobody listens on now (nor handed out lately by this process).

    `also_free_offset` requires `port + offset` to be free as well (SeaweedFS puts gRPC at port + 10000) and
    `below` caps the port (SeaweedFS needs ports < 55535 so that port + 10000 stays valid); `preferred` is the
    answer whenever it is free (a well-known port, easier to remember than a random one).
    """
    if preferred is not None and preferred not in _recent_ports and _port_is_free(preferred):
        _recent_ports.append(preferred)
        return preferred
    for _ in range(500):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port in _recent_ports or (below is not None and port >= below):
            continue
        if also_free_offset is not None:
            partner = port + also_free_offset
            if partner in _recent_ports or partner > 65535 or not _port_is_free(partner):
                continue
            _recent_ports.append(partner)
        _recent_ports.append(port)
        return port
    raise LocalStackError(f"no free loopback port found (below={below}, also_free_offset={also_free_offset})")


def find_binary(name: str, install_hint: str) -> str:
    """The path of executable `name`: next to the running Python (the venv), on PATH, or in a system dir."""
    candidates = [Path(sys.executable).parent / name]
    on_path = shutil.which(name)
    if on_path:
        candidates.append(Path(on_path))
    candidates += [Path("/usr/sbin") / name, Path("/usr/local/bin") / name]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise LocalStackError(
        f"{name} not found (looked in the virtualenv, on PATH, /usr/sbin, /usr/local/bin): {install_hint}"
    )


def child_env(**extra: str) -> dict[str, str]:
    """A small, complete environment for a service: PATH, HOME and locale from ours, plus `extra`."""
    env = {name: os.environ[name] for name in _INHERITED_ENV if name in os.environ}
    env.setdefault("PATH", os.defpath)
    env.update(extra)
    return env


def http_ok(port: int, path: str, *, host: str = "127.0.0.1", timeout: float = 1.0) -> bool:
    """True when `GET http://host:port/path` answers 200 (no proxy, no redirects): a readiness probe."""
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        response.read()
        return response.status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        connection.close()


@dataclass(frozen=True)
class ServiceSpec:
    """How to run one local service and how to tell it is ready."""

    name: str
    argv: list[str]
    env: dict[str, str]  # the complete environment of the child
    cwd: Path
    log_path: Path
    probe: Callable[[], bool]  # True once the service answers
    start_timeout: float
    stop_timeout: float
    url: str  # how clients reach it
    # Unix sockets the service leaves outside its data dir (some even on a clean stop); removed once it exits.
    stale_sockets: tuple[Path, ...] = ()


class RunningService:
    """Runs a `ServiceSpec` as a child process in its own session, its output appended to the log file."""

    def __init__(self, spec: ServiceSpec) -> None:
        self.spec = spec
        self.returncode: int | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    @property
    def is_running(self) -> bool:
        """True while the child process is alive."""
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        """The child's process id while it runs."""
        return self._process.pid if self.is_running and self._process else None

    @property
    def url(self) -> str:
        return self.spec.url

    def start(self) -> None:
        """Start the service and wait until its probe succeeds; no-op when it already runs."""
        if self.is_running:
            return
        spec = self.spec
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_offset = spec.log_path.stat().st_size if spec.log_path.exists() else 0
        try:
            with spec.log_path.open("ab") as log:  # the child keeps its own copy of the descriptor
                self._process = subprocess.Popen(
                    spec.argv,
                    env=spec.env,
                    cwd=spec.cwd,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
        except OSError as exc:
            raise LocalStackError(f"{spec.name} could not be started ({spec.argv[0]}): {exc}") from exc
        self.returncode = None
        try:
            self._wait_ready()
        except BaseException:  # a timeout, or Ctrl-C while waiting: don't leave the child running
            self.stop()
            raise

    def _wait_ready(self) -> None:
        spec, process = self.spec, self._process
        assert process is not None
        deadline = time.monotonic() + spec.start_timeout
        while True:
            code = process.poll()
            if code is not None:
                self._exited(process)
                raise LocalStackError(f"{spec.name} exited with code {code} before it was ready{self._log_excerpt()}")
            if self._probe():
                return
            if time.monotonic() > deadline:
                raise LocalStackError(f"{spec.name} not ready after {spec.start_timeout:g} s{self._log_excerpt()}")
            time.sleep(_POLL_INTERVAL)

    def _probe(self) -> bool:
        try:
            return self.spec.probe()
        except OSError:
            return False

    def stop(self) -> None:
        """SIGTERM the service's process group, SIGKILL it after `stop_timeout`; safe to call twice."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            self._signal(process, signal.SIGTERM)
            self._signal(process, signal.SIGCONT)  # a frozen service handles its SIGTERM only once running
            try:
                process.wait(self.spec.stop_timeout)
            except subprocess.TimeoutExpired:
                self._signal(process, signal.SIGKILL)
                process.wait()
        self._exited(process)

    def kill(self) -> None:
        """SIGKILL the service's process group at once, as a crash would."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            self._signal(process, signal.SIGKILL)
            process.wait()
        self._exited(process)

    def freeze(self) -> None:
        """SIGSTOP the service: it keeps its sockets but answers nothing, like a hung host."""
        if self._process is not None:
            self._signal(self._process, signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT a frozen service; it answers what waited meanwhile."""
        if self._process is not None:
            self._signal(self._process, signal.SIGCONT)

    def _exited(self, process: subprocess.Popen[bytes]) -> None:
        self._process, self.returncode = None, process.returncode
        for path in self.spec.stale_sockets:
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(path.lstat().st_mode):
                    path.unlink()

    def restart(self) -> None:
        """Stop the service, then start it again on the same data."""
        self.stop()
        self.start()

    @staticmethod
    def _signal(process: subprocess.Popen[bytes], signum: signal.Signals) -> None:
        # The child leads its own session, so its process group id is its pid; signalling the group also
        # reaches any helper it forked. The pid can't be reused before we reap it with wait().
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signum)

    def tail_log(self, lines: int = 20) -> str:
        """The last `lines` lines this run wrote to the log."""
        try:
            with self.spec.log_path.open("rb") as log:
                log.seek(self._log_offset)
                text = log.read().decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _log_excerpt(self) -> str:
        tail = self.tail_log()
        return f"; last log lines ({self.spec.log_path}):\n{tail}" if tail else f"; log: {self.spec.log_path}"

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.is_running else "stopped"
        return f"<RunningService {self.spec.name} {self.spec.url} {state}>"
