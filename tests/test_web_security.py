"""The operations surface against what other web pages, foreign Host names and malformed requests can send:
writes refused unless same-origin JSON, a Host allow-list, one set of security headers, JSON 4xx for every
client fault with nothing echoed and no traceback logged, and the token rules at start."""

from __future__ import annotations

import asyncio
import gzip
import inspect
import io
import json
from pathlib import Path

import pytest
import requests
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from imagegen.dev.localstack import free_port
from imagegen.web import protocol

from .conftest import SECRETS, RecordFactory, Stack, run_cli
from .test_cli import assert_one_clean_line
from .test_web_api import AUTH, TOKEN, Api, api, open_api
from .test_web_serve import start_serving

__all__ = ["api"]  # the fixture, used here by name

WRITES = [
    ("/api/queue/pause", {"reason": "from another site"}),
    ("/api/queue/resume", {}),
    ("/api/tasks", {"ids": ["aaaaaaaaaaaaaaa"], "force": True}),
    ("/api/tasks/enqueue-pending", {}),
    ("/api/tasks/retry-failed", {}),
    ("/api/tasks/aaaaaaaaaaaaaaa/retry", {}),
]
SECURITY_HEADERS = ("Content-Security-Policy", "X-Content-Type-Options", "X-Frame-Options", "Referrer-Policy")


async def post(api: Api, path: str, body: object, **headers: str) -> tuple[int, dict[str, object]]:
    response = await api.client.post(path, data=json.dumps(body), headers={**AUTH, **headers})
    assert response.content_type == "application/json"
    return response.status, await response.json()


async def assert_nothing_changed(api: Api, pending_id: str) -> None:
    """No pause, no job, the pending record not queued: what a refused write must leave."""
    _, queue = await api.call("GET", "/api/queue")
    assert queue["paused"] is None
    assert queue["jobs"] == {"queued": 0, "deferred": 0, "in_progress": 0, "waiting": 0}
    _, task = await api.call("GET", f"/api/tasks/{pending_id}")
    assert (task["state"], task["record"]["status"]) == ("unknown", "pending")


async def test_writes_must_be_json_from_the_servers_own_origin(api: Api, records: RecordFactory):
    pending = await records.create("a prompt no other site may queue")
    await api.call("POST", "/api/queue/pause", body={"reason": "to be lifted only by the dashboard"})
    await api.call("POST", "/api/queue/resume")
    own = str(api.client.make_url("")).rstrip("/")
    for path, body in WRITES:
        # What a page of another site can send without asking first: a "simple" request.
        for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
            status, answer = await post(api, path, body, **{"Content-Type": content_type})
            assert status == 403, (path, content_type)
            assert "Content-Type: application/json" in str(answer["error"])
        response = await api.client.post(path, headers=AUTH)  # no body, no Content-Type
        assert response.status == 403
        # JSON, but from another origin (the browser says so in Origin or Sec-Fetch-Site).
        for headers in (
            {"Origin": "http://evil.example"},
            {"Origin": "null"},
            {"Origin": own.replace("127.0.0.1", "localhost")},
            {"Origin": own.rsplit(":", 1)[0] + ":1"},
            {"Sec-Fetch-Site": "cross-site"},
            {"Sec-Fetch-Site": "same-site"},
        ):
            status, answer = await post(api, path, body, **{"Content-Type": "application/json", **headers})
            assert status == 403, (path, headers)
            assert "another site" in str(answer["error"])
    await assert_nothing_changed(api, pending.id)
    # The dashboard's own requests (same origin, JSON) and scripts that send no Origin go through.
    json_type = {"Content-Type": "application/json; charset=utf-8"}
    assert (await post(api, "/api/queue/pause", {}, Origin=own, **json_type))[0] == 200
    assert (await post(api, "/api/queue/resume", {}, **{"Sec-Fetch-Site": "same-origin"}, **json_type))[0] == 200
    status, queued = await post(api, "/api/tasks", {"ids": [pending.id]}, **json_type)
    assert (status, queued["counts"]) == (200, {"queued": 1})


async def test_a_foreign_host_reads_and_writes_nothing(stack: Stack, records: RecordFactory):
    record = await records.create("a prompt a rebinding page wants to read")
    async with open_api(stack) as api:
        for method, path in (
            ("GET", "/api/queue"),
            ("GET", "/api/tasks?state=pending"),
            ("GET", "/"),
            ("GET", "/healthz"),
        ):
            status, body = await api.call(method, path, headers={**AUTH, "Host": "evil.example"})
            assert status == 421, path
            assert "WEB_ALLOWED_HOSTS" in body["error"]
            assert record.prompt not in json.dumps(body)
        status, _ = await api.call(
            "POST",
            "/api/queue/pause",
            body={},
            headers={
                **AUTH,
                "Host": "evil.example:8300",
                "Content-Type": "application/json",
                "Origin": "http://evil.example:8300",
            },
        )
        assert status == 421
        assert (await api.call("GET", "/api/queue"))[1]["paused"] is None
        # localhost and the bound address are the server's own names.
        for host in ("localhost", "LOCALHOST:8300", "127.0.0.1:8300", "[::1]:8300"):
            assert (await api.call("GET", "/api/queue", headers={**AUTH, "Host": host}))[0] == 200, host
    async with open_api(stack, web_allowed_hosts="images.example.com, Ops.Example.com") as api:
        assert (await api.call("GET", "/api/queue", headers={**AUTH, "Host": "ops.example.com"}))[0] == 200
        # A reverse proxy that rewrites Host: the public name in Origin is the server's own.
        status, _ = await api.call(
            "POST",
            "/api/queue/pause",
            body={},
            headers={**AUTH, "Content-Type": "application/json", "Origin": "https://images.example.com"},
        )
        assert status == 200


async def test_every_response_carries_the_security_headers(api: Api):
    for method, path, status in (
        ("GET", "/", 200),
        ("GET", "/static/app.js", 200),
        ("GET", "/static/app.css", 200),
        ("GET", "/api/queue", 200),
        ("GET", "/api/openapi.json", 200),
        ("GET", "/healthz", 200),
        ("GET", "/api/nothing", 404),
        ("GET", "/static/missing.js", 404),
        ("GET", "/static/index.html", 404),  # the dashboard's page exists only at /, with these headers
        ("DELETE", "/api/queue", 405),
        ("GET", "/api/tasks?page=0", 400),
    ):
        response = await api.client.request(method, path, headers=AUTH)
        assert response.status == status, path
        for name in SECURITY_HEADERS:
            assert response.headers.get(name), (path, name)
        assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]
        assert response.headers["X-Frame-Options"] == "DENY"
        assert response.headers["Server"] == "imagegen"  # no version to look up exploits by
        if status >= 400:
            assert response.content_type == "application/json", path
            assert set(await response.json()) == {"error"}
        expected_cache = "no-cache" if path == "/" or path.startswith("/static/") else "no-store"
        assert response.headers["Cache-Control"] == expected_cache, path
    page = await api.client.get("/")
    assert page.content_type == "text/html"
    assert (await api.client.get("/static/app.js")).content_type == "text/javascript"


async def test_bad_bodies_and_queries_are_one_line_400s(api: Api, records: RecordFactory):
    json_type = {**AUTH, "Content-Type": "application/json"}
    deep = "[" * 100_000 + "]" * 100_000
    for path in ("/api/tasks", "/api/queue/pause"):
        response = await api.client.post(path, data=deep, headers=json_type)
        assert response.status == 400
        assert "nested too deeply" in (await response.json())["error"]
    response = await api.client.post(
        # The server drops a connection whose body it could not read to the end: this one is not kept.
        "/api/queue/pause",
        data=b"not gzip at all",
        headers={**json_type, "Content-Encoding": "gzip", "Connection": "close"},
    )
    assert (response.status, response.content_type) == (400, "application/json")
    assert "Content-Encoding" in (await response.json())["error"]
    gzipped = await api.client.post(
        "/api/queue/pause",
        data=gzip.compress(b'{"reason": "sent compressed"}'),
        headers={**json_type, "Content-Encoding": "gzip"},
    )
    assert (await gzipped.json())["paused"]["reason"] == "sent compressed"
    await api.call("POST", "/api/queue/resume")
    for raw in ("[]", "0", "false", '""', "null", "[{}]", '"{}"'):
        for path in ("/api/queue/pause", "/api/queue/resume", "/api/tasks/enqueue-pending"):
            status, body = await api.call("POST", path, raw=raw)
            assert status == 400, (path, raw)
            assert "valid dictionary" in body["error"]
    status, body = await api.call("POST", "/api/queue/resume", body={"force": True})
    assert (status, "force" in body["error"]) == (400, True)
    assert (await api.call("GET", "/api/queue"))[1]["paused"] is None
    response = await api.client.post(
        "/api/tasks", data=io.BytesIO(b"x" * (1024**2 + 10)), headers={**json_type, "Connection": "close"}
    )
    assert (response.status, response.content_type) == (413, "application/json")
    for query in ("q=%00", "q=a%0Ab", "q=%7F"):
        status, body = await api.call("GET", f"/api/tasks?state=pending&{query}")
        assert status == 400, query
        assert body["error"].startswith("q:")


async def test_search_takes_wildcards_literally(api: Api, records: RecordFactory):
    sale = await records.create("a poster: 50% off")
    underscored = await records.create("a file_name on a sign")
    await records.many(2, prefix="a plain prompt")
    for text, expected in (("%", {sale.id}), ("50%", {sale.id}), ("_", {underscored.id}), ("e_n", {underscored.id})):
        status, page = await api.call("GET", f"/api/tasks?state=pending&q={text.replace('%', '%25')}")
        assert status == 200
        assert {item["id"] for item in page["items"]} == expected, text


async def test_priority_takes_whole_numbers_written_as_floats(api: Api, records: RecordFactory):
    record = await records.create("a prompt queued by a client that writes 1000.0")
    status, body = await api.call("POST", "/api/tasks", body={"ids": [record.id], "priority": 1000.0})
    assert (status, body["counts"]) == (200, {"queued": 1})
    _, task = await api.call("GET", f"/api/tasks/{record.id}")
    assert task["priority"] == 1000
    status, body = await api.call("POST", "/api/tasks", body={"ids": [record.id], "priority": 7.5})
    assert (status, "priority" in body["error"]) == (400, True)


async def test_no_route_shadows_another(api: Api):
    # GET on a write's path is that route's 405, not a lookup of a task called "enqueue-pending".
    for path in ("/api/tasks/enqueue-pending", "/api/tasks/retry-failed"):
        response = await api.client.get(path, headers=AUTH)
        assert response.status == 405, path
        assert response.headers["Allow"] == "POST"


def raw_request(port: int, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """One request as bytes on a fresh connection: what a client that is no HTTP library can send."""

    async def exchange() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(data)
        await writer.drain()
        answer = await reader.read()
        writer.close()
        return answer

    answer = asyncio.run(exchange())
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in header_lines)}
    return int(status_line.split()[1]), headers, body


def test_malformed_requests_get_json_400s_without_echo_or_traceback(stack: Stack, tmp_path: Path):
    served = start_serving(stack, tmp_path / "serve.log", API_TOKEN=TOKEN, LOG_LEVEL="DEBUG")
    port = int(served.url.rsplit(":", 1)[1])
    host = f"Host: 127.0.0.1:{port}\r\n".encode()
    cases = [
        # An over-long Authorization that begins with the real token: aiohttp's own answer echoed it.
        b"GET /api/queue HTTP/1.1\r\n" + host + b"Authorization: Bearer " + TOKEN.encode() + b"x" * 9000 + b"\r\n\r\n",
        b"GET /api/" + b"a" * 9000 + b" HTTP/1.1\r\n" + host + b"\r\n",
        b"GET /api/queue HTTP/1.1\r\n"
        + host
        + b"".join(b"X-%d: %s\r\n" % (i, TOKEN.encode()) for i in range(200))
        + b"\r\n",
        b"G(T /api/queue HTTP/1.1\r\n" + host + b"\r\n",
        b"GET /api/\x00queue HTTP/1.1\r\n" + host + b"\r\n",
        b"POST /api/queue/pause HTTP/1.1\r\n" + host + b"Content-Length: " + TOKEN.encode() + b"\r\n\r\n",
        b"POST /api/queue/pause HTTP/1.1\r\n" + host + b"Transfer-Encoding: chunked\r\nContent-Type: application/json"
        b"\r\n\r\nzz" + TOKEN.encode() + b"\r\n\r\n",
    ]
    try:
        for data in cases:
            status, headers, body = raw_request(port, data)
            assert status == 400, data[:40]
            assert headers["content-type"].startswith("application/json"), data[:40]
            assert headers["x-content-type-options"] == "nosniff"
            assert headers["server"] == "imagegen"
            message = json.loads(body)["error"]
            assert TOKEN not in message and TOKEN[:20] not in body.decode(), data[:40]
            assert "\n" not in message
        # A real request still works afterwards, on the same server.
        status, _, body = raw_request(port, b"GET /healthz HTTP/1.1\r\n" + host + b"Connection: close\r\n\r\n")
        assert (status, json.loads(body)) == (200, {"ok": True, "status": "ok"})
    finally:
        assert served.stop() == 0
    log = served.log.read_text()
    assert "Traceback" not in log
    assert "ERROR" not in log
    assert "refused a malformed request" in log  # each one line at debug, naming only the kind of fault
    for secret in (*SECRETS, TOKEN, TOKEN[:20]):
        assert secret not in log


def test_failures_with_secrets_in_their_text_leak_them_nowhere(stack: Stack, tmp_path: Path):
    # Each server fails in a way whose raw error text would hold a secret: a Redis URL with its password, a
    # refused PocketBase password, a refused S3 secret. Every route that reports an error is called.
    redis_password = "redis-url-password-91f2"
    wrong_pb = "refused-pocketbase-password-4c1d"
    wrong_s3 = "refused-s3-secret-key-77ab"

    configs = {
        "redis": {"REDIS_URL": f"redis://:{redis_password}@127.0.0.1:{free_port()}/0"},
        "pocketbase": {"POCKETBASE_PASSWORD": wrong_pb, "TOS_SECRET_KEY": wrong_s3},
    }
    secrets = (*SECRETS, TOKEN, redis_password, wrong_pb, wrong_s3)
    for name, env in configs.items():
        served = start_serving(stack, tmp_path / f"{name}.log", wait_for="/api/openapi.json", API_TOKEN=TOKEN, **env)
        seen = []
        try:
            for method, path in (
                ("GET", "/healthz"),
                ("GET", "/metrics"),
                ("GET", "/api/queue"),
                ("GET", "/api/tasks?state=pending"),
                ("GET", "/api/tasks?state=queued"),
                ("GET", "/api/tasks/aaaaaaaaaaaaaaa"),
                ("POST", "/api/tasks"),
                ("POST", "/api/tasks/enqueue-pending"),
                ("POST", "/api/tasks/retry-failed"),
                ("POST", "/api/tasks/aaaaaaaaaaaaaaa/retry"),
                ("POST", "/api/queue/pause"),
                ("POST", "/api/queue/resume"),
            ):
                body = {"ids": ["aaaaaaaaaaaaaaa"]} if path == "/api/tasks" and method == "POST" else {}
                for headers in ({"Authorization": f"Bearer {TOKEN}"}, {}):
                    response = requests.request(
                        method, served.url + path, json=body if method == "POST" else None, headers=headers, timeout=30
                    )
                    seen.append(f"{response.status_code} {response.headers} {response.text}")
            # The errors were real: each server reported its service as failing.
            failing = "REDIS_HOST/REDIS_PORT/REDIS_PASSWORD" if name == "redis" else "check POCKETBASE_EMAIL"
            assert any(failing in text and text.startswith("503") for text in seen), seen
        finally:
            assert served.stop() == 0
        log = served.log.read_text()
        for secret in secrets:
            assert secret not in log, (name, secret)
            for text in seen:
                assert secret not in text, (name, secret, text)


@pytest.mark.parametrize(
    ("token", "host", "words"),
    [
        ("   ", "127.0.0.1", "API_TOKEN is blank"),
        (" a-token-with-a-space-around-it ", "127.0.0.1", "API_TOKEN has spaces around it"),
        ("x", "0.0.0.0", "an API_TOKEN of 1 characters: beyond loopback it needs at least 16"),
        ("fifteen-chars-1", "0.0.0.0", "an API_TOKEN of 15 characters"),
    ],
)
def test_serve_refuses_a_token_nobody_can_send_or_anybody_can_guess(stack: Stack, token: str, host: str, words: str):
    result = run_cli(stack, "serve", "--host", host, "--port", str(free_port()), timeout=30, API_TOKEN=token)
    assert result.returncode == 2
    assert_one_clean_line(result.stderr)
    assert words in result.stderr
    assert token.strip() not in result.stderr or not token.strip()


def test_the_aiohttp_parts_the_server_overrides_are_there():
    # The names protocol.py relies on, against the installed aiohttp: an upgrade that moves one fails here.
    assert tuple(inspect.signature(RequestHandler.handle_error).parameters) == protocol.HANDLE_ERROR_PARAMETERS
    assert callable(web.AppRunner._make_server)
    assert {"handler", "request_factory", "handler_cancellation", "loop"} <= set(
        inspect.signature(web.Server.__init__).parameters
    )

    async def built() -> web.Server:
        return web.Server(lambda request: web.Response())  # type: ignore[arg-type, return-value]

    server = asyncio.run(built())
    assert all(hasattr(server, name) for name in protocol.SERVER_ATTRIBUTES)
    protocol.check_aiohttp()
    protocol.check_server(server)
