"""The fault proxy: byte-exact forwarding, each fault kind, the RNG, the switch and the counters.

The upstream is a small aiohttp server on the test loop that records what it receives.
"""

from __future__ import annotations

import gzip
import io
import random
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDictProxy
from yarl import URL

from tests.faultproxy import FaultProxy

MIB = 1024 * 1024
BIG = random.Random(42).randbytes(10 * MIB)
DISCONNECTED = (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)


@dataclass
class Seen:
    method: str
    raw_path: str
    headers: CIMultiDictProxy[str]
    body: bytes


class Upstream:
    """Records every request; `/echo` answers with the request body, `/big` with 10 MiB, `/gzip` gzipped."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self.url = ""

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        body = await request.content.read()
        self.seen.append(Seen(request.method, request.raw_path, request.headers, body))
        if request.path == "/echo":
            headers = {"ETag": '"etag-1"', "x-amz-request-id": "req-1", "Content-Type": "application/x-test"}
            return await send(request, web.StreamResponse(status=201, reason="Made", headers=headers), body)
        if request.path == "/big":
            return await send(request, web.StreamResponse(headers={"Content-Type": "application/octet-stream"}), BIG)
        if request.path == "/gzip":
            return web.Response(body=gzip.compress(b"x" * 1000), headers={"Content-Encoding": "gzip"})
        if request.path == "/cookies":
            response = web.Response(text="ok")
            response.headers.add("Set-Cookie", "a=1; Path=/")
            response.headers.add("Set-Cookie", "b=2; Path=/")
            return response
        return web.json_response({"ok": True})


async def send(request: web.BaseRequest, response: web.StreamResponse, body: bytes) -> web.StreamResponse:
    """Send `body` with a Content-Length, in 1 MiB writes."""
    response.content_length = len(body)
    await response.prepare(request)
    if request.method != "HEAD":
        for offset in range(0, len(body), MIB):
            await response.write(body[offset : offset + MIB])
    await response.write_eof()
    return response


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    server = Upstream()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    runner = web.ServerRunner(web.Server(server.handle, access_log=None))
    await runner.setup()
    await web.SockSite(runner, sock).start()
    server.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        yield server
    finally:
        await runner.cleanup()
        sock.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A client that never reuses connections (no silent retries) and never decompresses."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
        yield session


@pytest.fixture
def proxy(upstream: Upstream) -> Iterator[FaultProxy]:
    with FaultProxy(upstream.url, fault_rate=0.0) as running:
        yield running


def raw(proxy: FaultProxy, path: str) -> URL:
    return URL(proxy.url + path, encoded=True)


async def test_forwards_method_raw_path_query_host_and_headers(proxy, upstream, http) -> None:
    path = "/bucket/a%2Fb/~c%7E/d%20e?list-type=2&prefix=a%2Fb%2B&x=~&empty="
    headers = [
        ("Host", "bucket.example.test:9000"),
        ("Authorization", "AWS4-HMAC-SHA256 Credential=x"),
        ("X-Multi", "one"),
        ("X-Multi", "two"),
        ("Connection", "keep-alive, X-Hop"),
        ("X-Hop", "gone"),
        ("Proxy-Authorization", "gone"),
    ]
    async with http.request("PATCH", raw(proxy, path), headers=headers, data=b"payload") as response:
        assert response.status == 200
        assert await response.json() == {"ok": True}
    [seen] = upstream.seen
    assert (seen.method, seen.raw_path, seen.body) == ("PATCH", path, b"payload")
    assert seen.headers.getall("Host") == ["bucket.example.test:9000"]
    assert seen.headers["Authorization"] == "AWS4-HMAC-SHA256 Credential=x"
    assert seen.headers.getall("X-Multi") == ["one", "two"]
    assert seen.headers["Content-Length"] == "7"
    for name in ("X-Hop", "Proxy-Authorization", "Transfer-Encoding"):
        assert name not in seen.headers
    assert proxy.total == 1
    assert proxy.events == [("PATCH", path, None)]


async def test_auto_headers_are_not_added(proxy, upstream, http) -> None:
    async with http.get(raw(proxy, "/plain"), skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent")):
        pass
    names = {name.lower() for name in upstream.seen[0].headers}
    assert names.isdisjoint({"accept", "accept-encoding", "user-agent", "content-type"})


async def test_status_reason_and_headers_come_back(proxy, http) -> None:
    async with http.put(raw(proxy, "/echo"), data=b"abc") as response:
        assert (response.status, response.reason) == (201, "Made")
        assert response.headers["ETag"] == '"etag-1"'
        assert response.headers["x-amz-request-id"] == "req-1"
        assert response.headers["Content-Type"] == "application/x-test"
        assert response.headers["Content-Length"] == "3"
        assert await response.read() == b"abc"
    async with http.get(raw(proxy, "/cookies")) as response:
        assert response.headers.getall("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/"]
    async with http.get(raw(proxy, "/gzip")) as response:
        assert response.headers["Content-Encoding"] == "gzip"
        assert gzip.decompress(await response.read()) == b"x" * 1000


async def test_ten_mib_both_ways_with_content_length(proxy, upstream, http) -> None:
    async with http.put(raw(proxy, "/echo"), data=io.BytesIO(BIG)) as response:
        assert response.status == 201
        assert response.headers["Content-Length"] == str(len(BIG))
        assert await response.read() == BIG
    seen = upstream.seen[0]
    assert seen.body == BIG
    assert seen.headers["Content-Length"] == str(len(BIG))
    assert "Transfer-Encoding" not in seen.headers
    async with http.get(raw(proxy, "/big")) as response:
        assert response.headers["Content-Length"] == str(len(BIG))
        assert await response.read() == BIG
    async with http.head(raw(proxy, "/big")) as response:
        assert response.headers["Content-Length"] == str(len(BIG))
        assert await response.read() == b""


async def test_chunked_and_expect_continue_uploads(proxy, upstream, http) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for offset in range(0, len(BIG), MIB):
            yield BIG[offset : offset + MIB]

    async with http.post(raw(proxy, "/echo"), data=chunks()) as response:
        assert await response.read() == BIG
    assert upstream.seen[0].headers["Transfer-Encoding"] == "chunked"
    async with http.put(raw(proxy, "/echo"), data=io.BytesIO(BIG), expect100=True) as response:
        assert await response.read() == BIG
    assert upstream.seen[1].body == BIG
    assert "Expect" not in upstream.seen[1].headers


async def test_503_is_s3_xml_or_json_and_never_reaches_the_server(upstream, http) -> None:
    with FaultProxy(upstream.url, fault_rate=1.0, faults=("503",)) as proxy:
        async with http.get(raw(proxy, "/collections/x/records")) as response:
            assert response.status == 503
            assert await response.json() == {"message": "injected fault", "status": 503}
        s3_headers = {"Authorization": "AWS4-HMAC-SHA256 Credential=x", "x-amz-date": "20240101T000000Z"}
        async with http.put(raw(proxy, "/bucket/key"), data=io.BytesIO(BIG), headers=s3_headers) as response:
            assert response.status == 503
            assert response.content_type == "application/xml"
            body = await response.text()
            assert "<Error><Code>ServiceUnavailable</Code><Message>injected</Message></Error>" in body
        assert proxy.faulted == {"503": 2}
    assert upstream.seen == []


@pytest.mark.parametrize("kind", ["drop", "reset"])
async def test_drop_and_reset_close_the_connection_before_forwarding(upstream, http, kind) -> None:
    with FaultProxy(upstream.url, fault_rate=1.0, faults=(kind,)) as proxy:
        # POST: aiohttp retries idempotent requests once after a disconnection.
        with pytest.raises(DISCONNECTED):
            async with http.post(raw(proxy, "/x")) as response:
                await response.read()
        with pytest.raises(DISCONNECTED):
            async with http.post(raw(proxy, "/echo"), data=io.BytesIO(BIG)) as response:
                await response.read()
        assert proxy.faulted == {kind: 2}
        with pytest.raises(DISCONNECTED):  # retried once by aiohttp itself, so faulted twice
            async with http.get(raw(proxy, "/x")) as response:
                await response.read()
        assert proxy.faulted == {kind: 4}
    assert upstream.seen == []


async def test_drop_after_forwards_then_drops(upstream, http) -> None:
    with FaultProxy(upstream.url, fault_rate=1.0, faults=("drop-after",)) as proxy:
        with pytest.raises(DISCONNECTED):
            async with http.post(raw(proxy, "/echo"), data=b"stored") as response:
                await response.read()
        assert proxy.faulted == {"drop-after": 1}
    assert [seen.body for seen in upstream.seen] == [b"stored"]


async def test_zero_rate_never_faults(upstream, http) -> None:
    with FaultProxy(upstream.url, fault_rate=0.0) as proxy:
        for _ in range(30):
            async with http.get(raw(proxy, "/x")) as response:
                assert response.status == 200
        assert (proxy.total, proxy.faulted_total, proxy.faulted) == (30, 0, {})
    assert len(upstream.seen) == 30


async def test_enabled_switch_and_method_filter(upstream, http) -> None:
    with FaultProxy(upstream.url, fault_rate=1.0, faults=("503",), methods=frozenset({"put"})) as proxy:
        async with http.get(raw(proxy, "/x")) as response:
            assert response.status == 200
        async with http.put(raw(proxy, "/x"), data=b"") as response:
            assert response.status == 503
        proxy.enabled = False
        async with http.put(raw(proxy, "/x"), data=b"") as response:
            assert response.status == 200
        proxy.enabled = True
        async with http.put(raw(proxy, "/x"), data=b"") as response:
            assert response.status == 503
        assert (proxy.total, proxy.faulted) == (4, {"503": 2})
    assert [seen.method for seen in upstream.seen] == ["GET", "PUT"]


async def statuses(proxy: FaultProxy, http: aiohttp.ClientSession, count: int = 40) -> list[int]:
    result = []
    for index in range(count):
        async with http.get(raw(proxy, f"/r/{index}")) as response:
            result.append(response.status)
    return result


async def test_seeded_rng_is_reproducible(upstream, http) -> None:
    with FaultProxy(upstream.url, fault_rate=0.5, seed=7, faults=("503",)) as proxy:
        first = await statuses(proxy, http)
        proxy.reset()
        assert proxy.total == 0
        assert await statuses(proxy, http) == first
        assert proxy.faulted_total == first.count(503)
    with FaultProxy(upstream.url, fault_rate=0.5, seed=7, faults=("503",)) as proxy:
        assert await statuses(proxy, http) == first
    with FaultProxy(upstream.url, fault_rate=0.5, seed=8, faults=("503",)) as proxy:
        assert await statuses(proxy, http) != first
    assert 5 < first.count(503) < 35


async def test_counters_count_each_kind(upstream, http) -> None:
    with FaultProxy(upstream.url, fault_rate=0.6, seed=3) as proxy:
        outcomes: list[str] = []
        for index in range(60):
            try:
                async with http.post(raw(proxy, f"/c/{index}")) as response:
                    outcomes.append(str(response.status))
            except DISCONNECTED:
                outcomes.append("disconnected")
        faulted = proxy.faulted
        assert proxy.total == 60
        assert set(faulted) == {"503", "drop", "reset"}
        assert faulted["503"] == outcomes.count("503")
        assert faulted["drop"] + faulted["reset"] == outcomes.count("disconnected")
        assert [fault for _, _, fault in proxy.events].count(None) == outcomes.count("200")
    assert len(upstream.seen) == outcomes.count("200")


def test_rejects_bad_arguments_and_stops_cleanly() -> None:
    with pytest.raises(ValueError):
        FaultProxy("http://127.0.0.1:1", fault_rate=1.5)
    with pytest.raises(ValueError):
        FaultProxy("http://127.0.0.1:1", fault_rate=0.5, faults=("timeout",))
    proxy = FaultProxy("http://127.0.0.1:1", fault_rate=0.5)
    with pytest.raises(RuntimeError):
        _ = proxy.url
    with proxy:
        port = proxy.port
    proxy.stop()
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass


async def test_unreachable_target_is_a_502(http) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    with FaultProxy(dead, fault_rate=0.0) as proxy:
        async with http.get(raw(proxy, "/x")) as response:
            assert response.status == 502
