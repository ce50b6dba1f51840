"""A fault-injecting HTTP reverse proxy for chaos tests.

`with FaultProxy("http://127.0.0.1:8090", fault_rate=0.2, seed=1) as proxy:` serves on `proxy.url` from a
background thread and forwards every request to the target untouched: method, raw path and query, headers
(the client's `Host` included, so SigV4 signatures stay valid) and streamed bodies both ways. Before
forwarding, a seeded RNG decides per request whether to inject a fault instead:

- `"503"`: answer 503 with an S3-style XML error (requests that look like S3) or a PocketBase-style JSON error;
- `"drop"`: close the client connection without any response;
- `"reset"`: abort the client connection with a TCP RST;
- `"drop-after"` (opt-in): forward the request, read the upstream response, then close the client connection.

Only `"drop-after"` lets the target see a faulted request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
import struct
import threading
from collections import Counter
from collections.abc import Iterable
from types import TracebackType

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, MultiMapping
from yarl import URL

FAULT_KINDS = frozenset({"503", "drop", "reset", "drop-after"})
DEFAULT_FAULTS = ("503", "drop", "reset")
HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "te", "upgrade"})
# The proxy answers `Expect: 100-continue` itself, so the header is not passed on (SigV4 never signs it).
NOT_FORWARDED = frozenset({"expect"})
# Headers aiohttp's client would add on its own; the proxy sends only what the client sent.
SKIP_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")
UPSTREAM_TIMEOUT = aiohttp.ClientTimeout(total=None, connect=None, sock_connect=300, sock_read=300)
START_TIMEOUT = STOP_TIMEOUT = 10.0
S3_ERROR = b'<?xml version="1.0"?>\n<Error><Code>ServiceUnavailable</Code><Message>injected</Message></Error>'
JSON_ERROR = json.dumps({"message": "injected fault", "status": 503}).encode()


def strip_hop_by_hop(headers: MultiMapping[str], extra: Iterable[str] = ()) -> CIMultiDict[str]:
    """A copy of `headers` (duplicates kept) without hop-by-hop headers, those named in `Connection`,
    `Proxy-*` and the lower-case names in `extra`."""
    named = {token.strip().lower() for value in headers.getall("Connection", []) for token in value.split(",")}
    dropped = HOP_BY_HOP | named | set(extra)
    return CIMultiDict(
        (name, value)
        for name, value in headers.items()
        if name.lower() not in dropped and not name.lower().startswith("proxy-")
    )


def looks_like_s3(request: web.BaseRequest) -> bool:
    """True for SigV2/SigV4-signed requests, presigned URLs and anything carrying `x-amz-*` headers."""
    if request.headers.get("Authorization", "").startswith(("AWS4-", "AWS ")):
        return True
    if any(name.lower().startswith("x-amz-") for name in request.headers):
        return True
    return "x-amz-" in request.raw_path.lower()


class FaultProxy:
    """A reverse proxy to `target` that injects faults into a `fault_rate` share of requests.

    `faults` are the kinds to pick from (uniformly), `methods` restricts faults to those HTTP methods (None: any).
    Each eligible request (faults `enabled`, method matching) draws twice from `random.Random(seed)`, so the
    sequence of decisions depends only on the seed and the order of requests. Set `enabled` from any thread to
    switch faults off or on; `total`, `faulted` and `events` report what happened.
    """

    def __init__(
        self,
        target: str,
        fault_rate: float,
        seed: int = 0,
        faults: tuple[str, ...] = DEFAULT_FAULTS,
        methods: frozenset[str] | None = None,
    ) -> None:
        if not 0.0 <= fault_rate <= 1.0:
            raise ValueError(f"fault_rate must be within 0..1, got {fault_rate}")
        unknown = set(faults) - FAULT_KINDS
        if not faults or unknown:
            raise ValueError(f"faults must be a non-empty tuple of {sorted(FAULT_KINDS)}, got {faults!r}")
        self.target = target.rstrip("/")
        self.fault_rate = fault_rate
        self.seed = seed
        self.faults = tuple(faults)
        self.methods = None if methods is None else frozenset(m.upper() for m in methods)
        self.enabled = True
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._total = 0
        self._faulted: Counter[str] = Counter()
        self._events: list[tuple[str, str, str | None]] = []
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._port: int | None = None
        self._error: BaseException | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def port(self) -> int:
        """The port the proxy listens on (127.0.0.1)."""
        if self._port is None:
            raise RuntimeError("the fault proxy is not running")
        return self._port

    @property
    def url(self) -> str:
        """Where clients should connect instead of the target: `http://127.0.0.1:<port>`."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def total(self) -> int:
        """Requests received, faulted or not."""
        with self._lock:
            return self._total

    @property
    def faulted(self) -> dict[str, int]:
        """Faulted requests by kind (kinds never injected are absent)."""
        with self._lock:
            return dict(self._faulted)

    @property
    def faulted_total(self) -> int:
        """Faulted requests of any kind."""
        with self._lock:
            return sum(self._faulted.values())

    @property
    def events(self) -> list[tuple[str, str, str | None]]:
        """`(method, raw path, fault or None)` for every request, in arrival order."""
        with self._lock:
            return list(self._events)

    def reset(self, seed: int | None = None) -> None:
        """Zero the counters and events and restart the RNG (from `seed`, by default the original one)."""
        with self._lock:
            if seed is not None:
                self.seed = seed
            self._rng = random.Random(self.seed)
            self._total = 0
            self._faulted.clear()
            self._events.clear()

    def _decide(self, method: str, raw_path: str) -> str | None:
        with self._lock:
            self._total += 1
            fault: str | None = None
            if self.enabled and (self.methods is None or method.upper() in self.methods):
                roll, pick = self._rng.random(), self._rng.randrange(len(self.faults))
                if roll < self.fault_rate:
                    fault = self.faults[pick]
                    self._faulted[fault] += 1
            self._events.append((method, raw_path, fault))
            return fault

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        fault = self._decide(request.method, request.raw_path)
        if fault == "503":
            s3 = looks_like_s3(request)
            return web.Response(
                status=503,
                body=S3_ERROR if s3 else JSON_ERROR,
                content_type="application/xml" if s3 else "application/json",
            )
        if fault in ("drop", "reset"):
            return _drop(request, abrupt=fault == "reset")
        return await self._forward(request, drop_after=fault == "drop-after")

    async def _forward(self, request: web.BaseRequest, *, drop_after: bool) -> web.StreamResponse:
        assert self._session is not None
        if request.headers.get("Expect", "").lower() == "100-continue" and request.version >= (1, 1):
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0
        try:
            upstream = await self._session.request(
                request.method,
                URL(self.target + request.raw_path, encoded=True),
                headers=strip_hop_by_hop(request.headers, NOT_FORWARDED),
                data=request.content if request.body_exists else None,
                allow_redirects=False,
                skip_auto_headers=SKIP_AUTO_HEADERS,
            )
        except (aiohttp.ClientError, OSError) as exc:
            body = json.dumps({"message": f"fault proxy: upstream failed: {exc!r}", "status": 502})
            return web.Response(status=502, text=body, content_type="application/json")
        response = web.StreamResponse(
            status=upstream.status, reason=upstream.reason, headers=strip_hop_by_hop(upstream.headers)
        )
        try:
            if drop_after:
                async for _ in upstream.content.iter_any():
                    pass
                return _drop(request, abrupt=False)
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
        except (aiohttp.ClientError, OSError):
            # Upstream or client failed mid-body: cut the client off so it cannot take a short body as complete.
            _drop(request, abrupt=True)
        finally:
            upstream.release()
        return response

    def start(self) -> FaultProxy:
        """Start serving in a background thread; returns once the port is bound."""
        if self._thread is not None:
            raise RuntimeError("the fault proxy is already running")
        self._ready.clear()
        self._error = None
        self._thread = threading.Thread(target=self._run, name="fault-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT) or self._error is not None:
            error = self._error
            self.stop()
            raise RuntimeError(f"the fault proxy could not start: {error!r}") from error
        return self

    def stop(self) -> None:
        """Close the listener, client and upstream connections and join the thread; safe to call twice."""
        thread, loop, stop = self._thread, self._loop, self._stop
        if thread is None:
            return
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed already
                loop.call_soon_threadsafe(stop.set)
        thread.join(STOP_TIMEOUT)
        if thread.is_alive():
            raise RuntimeError("the fault proxy thread did not stop")
        self._thread = self._loop = self._stop = None
        self._port = None

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported to the starting thread
            self._error = exc
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        stop = asyncio.Event()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        runner = web.ServerRunner(web.Server(self._handle, access_log=None), shutdown_timeout=1.0)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=UPSTREAM_TIMEOUT,
        )
        try:
            sock.bind(("127.0.0.1", 0))
            await runner.setup()
            await web.SockSite(runner, sock).start()
            self._port = sock.getsockname()[1]
            self._loop, self._stop = asyncio.get_running_loop(), stop
            self._ready.set()
            await stop.wait()
        finally:
            await runner.cleanup()
            await self._session.close()
            self._session = None
            sock.close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _drop(request: web.BaseRequest, *, abrupt: bool) -> web.StreamResponse:
    """Close the client connection (`abrupt`: with a TCP RST); the returned response is never sent."""
    transport = request.transport
    if transport is not None:
        if abrupt:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
        else:
            transport.close()
    return web.Response(status=503)
