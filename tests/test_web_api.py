"""The web API in-process against the real services: every route, bad input, tokens, errors and secrets."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from imagegen.dev.localstack import free_port
from imagegen.settings import Settings
from imagegen.web import create_app
from imagegen.web.openapi import document

from .conftest import SECRETS, RecordFactory, Stack
from .test_pipeline import run_queue

TOKEN = "test-api-token-0b7d4e"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class Api:
    """A client of the app that keeps every answer, so a test can check that none leaks a secret."""

    def __init__(self, client: TestClient[web.Request, web.Application]) -> None:
        self.client = client
        self.seen: list[str] = []

    async def call(
        self,
        method: str,
        path: str,
        *,
        body: object = None,
        raw: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        data = raw if raw is not None else (None if body is None else json.dumps(body))
        if headers is None:
            # What the dashboard and a script send: the token, and JSON for a write.
            headers = {**AUTH, "Content-Type": "application/json"} if method == "POST" else AUTH
        response = await self.client.request(method, path, data=data, headers=headers)
        text = await response.text()
        self.seen.append(f"{dict(response.headers)} {text}")
        assert response.content_type == "application/json", (path, text)
        payload = json.loads(text)
        assert "Traceback" not in text
        return response.status, payload

    def assert_no_secret(self) -> None:
        for text in self.seen:
            for secret in (*SECRETS, TOKEN):
                assert secret not in text


@asynccontextmanager
async def open_api(stack: Stack, **overrides: object) -> AsyncIterator[Api]:
    """The app with the stack's settings and API_TOKEN set, served in-process on a loopback port."""
    async with TestClient(TestServer(create_app(stack.settings(api_token=TOKEN, **overrides)))) as client:
        api = Api(client)
        yield api
    api.assert_no_secret()


@pytest.fixture
async def api(stack: Stack) -> AsyncIterator[Api]:
    async with open_api(stack) as api:
        yield api


async def test_healthz_needs_no_token_and_says_redis_answers(api: Api):
    assert await api.call("GET", "/healthz", headers={}) == (200, {"ok": True, "status": "ok"})
    assert await api.call("GET", "/healthz") == (200, {"ok": True, "status": "ok", "redis": "ok"})


async def test_healthz_and_the_api_answer_503_while_redis_is_down(stack: Stack):
    async with open_api(stack, redis_port=free_port()) as api:
        # Without the token only the verdict: the reason names Redis' address.
        assert await api.call("GET", "/healthz", headers={}) == (503, {"ok": False, "status": "unavailable"})
        status, body = await api.call("GET", "/healthz")
        assert status == 503
        assert (body["ok"], body["status"], body["redis"]) == (False, "unavailable", "unreachable")
        assert "cannot reach Redis" in body["error"]
        status, body = await api.call("GET", "/api/queue")
        assert status == 503
        assert "cannot reach Redis" in body["error"]


async def test_pocketbase_down_is_503_with_a_clear_message(stack: Stack):
    async with open_api(stack, pocketbase_url="http://127.0.0.1:1") as api:
        status, body = await api.call("GET", "/api/tasks?state=done")
        assert status == 503
        assert body == {"error": body["error"]}
        assert "cannot reach http://127.0.0.1:1" in body["error"]
        status, body = await api.call("POST", "/api/tasks", body={"ids": ["aaaaaaaaaaaaaaa"]})
        assert status == 503


async def test_wrong_pocketbase_login_is_503_without_the_password(stack: Stack):
    async with open_api(stack, pocketbase_email="nobody@imagegen.test") as api:
        status, body = await api.call("GET", "/api/tasks?state=pending")
        assert status == 503
        assert "login as nobody@imagegen.test failed" in body["error"]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/queue"),
        ("POST", "/api/queue/pause"),
        ("POST", "/api/queue/resume"),
        ("GET", "/api/tasks"),
        ("POST", "/api/tasks"),
        ("POST", "/api/tasks/enqueue-pending"),
        ("POST", "/api/tasks/retry-failed"),
        ("GET", "/api/tasks/aaaaaaaaaaaaaaa"),
        ("POST", "/api/tasks/aaaaaaaaaaaaaaa/retry"),
    ],
)
async def test_every_api_route_needs_the_token(api: Api, method: str, path: str):
    for headers, words in (
        ({}, "needs a token"),
        ({"Authorization": "Bearer not-the-token"}, "wrong token"),
        ({"Authorization": f"Basic {TOKEN}"}, "needs a token"),
        ({"Authorization": f"Bearer {TOKEN}x"}, "wrong token"),
    ):
        sent = {**headers, "Content-Type": "application/json"} if method == "POST" else headers
        response = await api.client.request(method, path, headers=sent, data="{}" if method == "POST" else None)
        assert response.status == 401
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert words in (await response.json())["error"]


async def test_without_a_token_set_the_api_is_open(settings: Settings):
    async with TestClient(TestServer(create_app(settings))) as client:
        response = await client.get("/api/queue")
        assert response.status == 200


async def test_queue_summary_counts_records_and_jobs(api: Api, records: RecordFactory, pocketbase):
    created = await records.many(3)
    await pocketbase.update_record(created[2].id, {"status": "failed", "error": "earlier"})
    status, _ = await api.call("POST", "/api/tasks", body={"ids": [created[0].id]})
    assert status == 200
    status, queue = await api.call("GET", "/api/queue")
    assert status == 200
    assert queue["records"] == {"pending": 1, "queued": 1, "processing": 0, "done": 0, "failed": 1}
    assert queue["jobs"] == {"queued": 1, "deferred": 0, "in_progress": 0, "waiting": 0}
    assert queue["paused"] is None
    assert queue["workers"] == []
    assert queue["throughput"]["window_minutes"] == 60
    assert len(queue["throughput"]["minutes"]) == 60
    assert queue["throughput"]["failure_rate"] is None


async def test_throughput_counts_the_last_hours_outcomes(
    api: Api, stack: Stack, records: RecordFactory, settings: Settings
):
    good = await records.many(2)
    bad = await records.create("a prompt the moderation refuses")
    stack.jimeng.sandbox.script(bad.prompt, ["-2006"])
    await api.call("POST", "/api/tasks", body={"ids": [r.id for r in (*good, bad)]})
    await run_queue(settings)
    _, queue = await api.call("GET", "/api/queue")
    hour = queue["throughput"]
    assert (hour["done"], hour["failed"]) == (2, 1)
    assert hour["failure_rate"] == pytest.approx(1 / 3)
    assert sum(m["done"] for m in hour["minutes"]) == 2
    stamps = [m["minute"] for m in hour["minutes"]]
    assert stamps == sorted(stamps)  # oldest first, the current minute last
    assert queue["records"]["done"] == 2
    assert queue["records"]["failed"] == 1


async def test_create_tasks_reports_each_id_like_the_cli(api: Api, records: RecordFactory):
    record = await records.create("a kite over the dunes")
    status, body = await api.call(
        "POST", "/api/tasks", body={"ids": [record.id, "zzzzzzzzzzzzzzz", "not-an-id"], "force": False}
    )
    assert status == 200
    outcomes = {r["id"]: r["outcome"] for r in body["results"]}
    assert outcomes == {record.id: "queued", "zzzzzzzzzzzzzzz": "not found", "not-an-id": "invalid id"}
    assert body["counts"] == {"queued": 1, "not found": 1, "invalid id": 1}
    _, again = await api.call("POST", "/api/tasks", body={"ids": [record.id]})
    assert again["results"][0]["outcome"] == "already queued"


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        ("{not json", "not valid JSON"),
        ("", "needs a JSON body"),
        ("[]", "Input should be a valid dictionary"),
        ('{"ids": []}', "ids"),
        ('{"ids": "aaaaaaaaaaaaaaa"}', "ids"),
        ('{"ids": [1]}', "ids.0"),
        ('{"ids": ["aaaaaaaaaaaaaaa"], "force": "yes"}', "force"),
        ('{"ids": ["aaaaaaaaaaaaaaa"], "colour": "red"}', "colour"),
    ],
)
async def test_create_tasks_refuses_bad_bodies(api: Api, raw: str, words: str):
    status, body = await api.call("POST", "/api/tasks", raw=raw)
    assert status == 400
    assert words in body["error"]


async def test_enqueue_pending_and_retry_failed_return_counts(api: Api, records: RecordFactory, pocketbase):
    await records.many(2)
    failed = await records.create("failed before")
    await pocketbase.update_record(failed.id, {"status": "failed", "error": "earlier"})
    assert await api.call("POST", "/api/tasks/enqueue-pending") == (200, {"counts": {"queued": 2}})
    assert await api.call("POST", "/api/tasks/enqueue-pending") == (200, {"counts": {"already queued": 2}})
    assert await api.call("POST", "/api/tasks/retry-failed") == (200, {"counts": {"queued": 1}})
    # Queued in bulk, the record keeps its status until a worker takes it; the task says it is queued.
    assert (await pocketbase.get_record(failed.id)).status == "failed"
    assert (await api.call("GET", f"/api/tasks/{failed.id}"))[1]["state"] == "queued"


async def test_get_task_shows_state_tries_prompt_and_image_urls(api: Api, records: RecordFactory, settings: Settings):
    record = await records.create("a lighthouse at dusk")
    await api.call("POST", "/api/tasks", body={"ids": [record.id]})
    status, queued = await api.call("GET", f"/api/tasks/{record.id}")
    assert status == 200
    assert (queued["state"], queued["record"]["status"], queued["record"]["prompt"]) == (
        "queued",
        "queued",
        "a lighthouse at dusk",
    )
    await run_queue(settings)
    _, done = await api.call("GET", f"/api/tasks/{record.id}")
    assert done["state"] == "done"
    assert done["tries"] == 1
    assert done["record"]["status"] == "done"
    assert len(done["record"]["images"]) == 4
    assert all(url.startswith(settings.tos_public_base_url) for url in done["record"]["images"])
    assert done["duration_seconds"] > 0


async def test_get_task_bad_and_unknown_ids(api: Api):
    # Not an id: no route takes it (so /api/tasks/enqueue-pending is never read as one), and the answer says why.
    status, body = await api.call("GET", "/api/tasks/NOT-AN-ID")
    assert status == 404
    assert "a task id is 15 characters of a-z and 0-9" in body["error"]
    status, body = await api.call("GET", "/api/tasks/zzzzzzzzzzzzzzz")
    assert status == 404
    assert "zzzzzzzzzzzzzzz" in body["error"]


async def test_retry_one_failed_task_brings_it_to_done(
    api: Api, stack: Stack, records: RecordFactory, settings: Settings
):
    record = await records.create("refused the first time")
    stack.jimeng.sandbox.script(record.prompt, ["-2006"])
    await api.call("POST", "/api/tasks", body={"ids": [record.id]})
    await run_queue(settings)
    _, failed = await api.call("GET", f"/api/tasks/{record.id}")
    assert failed["state"] == "failed"
    assert "moderation" in failed["error"]
    assert await api.call("POST", f"/api/tasks/{record.id}/retry") == (
        200,
        {"id": record.id, "outcome": "queued", "detail": ""},
    )
    await run_queue(settings)
    _, done = await api.call("GET", f"/api/tasks/{record.id}")
    assert (done["state"], done["record"]["status"]) == ("done", "done")
    status, again = await api.call("POST", f"/api/tasks/{record.id}/retry")
    assert (status, again["outcome"]) == (200, "already done")


async def test_retry_bad_and_unknown_ids(api: Api):
    status, body = await api.call("POST", "/api/tasks/bad/retry")
    assert status == 404
    assert "a task id is 15 characters" in body["error"]
    status, body = await api.call("POST", "/api/tasks/zzzzzzzzzzzzzzz/retry")
    assert status == 404
    assert "zzzzzzzzzzzzzzz" in body["error"]


async def test_list_tasks_by_record_state_with_paging_and_search(api: Api, records: RecordFactory, pocketbase):
    lighthouses = await records.many(5, prefix="a lighthouse")
    kites = await records.many(2, prefix="a kite")
    await pocketbase.update_record(kites[0].id, {"status": "failed", "error": "refused"})
    status, page = await api.call("GET", "/api/tasks?state=pending&per_page=4")
    assert status == 200
    assert (page["state"], page["page"], page["per_page"], page["total"]) == ("pending", 1, 4, 6)
    assert len(page["items"]) == 4
    _, second = await api.call("GET", "/api/tasks?state=pending&per_page=4&page=2")
    ids = [item["id"] for item in page["items"] + second["items"]]
    assert sorted(ids) == sorted(r.id for r in (*lighthouses, kites[1]))
    _, found = await api.call("GET", "/api/tasks?state=pending&q=kite")
    assert [(i["id"], i["prompt"], i["status"]) for i in found["items"]] == [(kites[1].id, kites[1].prompt, "pending")]
    _, by_id = await api.call("GET", f"/api/tasks?state=pending&q={lighthouses[3].id[:9]}")
    assert [i["id"] for i in by_id["items"]] == [lighthouses[3].id]
    _, failed = await api.call("GET", "/api/tasks?state=failed")
    assert [(i["id"], i["error"]) for i in failed["items"]] == [(kites[0].id, "refused")]
    _, quoted = await api.call("GET", '/api/tasks?state=pending&q=a"%20||%20id!="')
    assert quoted["total"] == 0


async def test_list_deferred_and_in_progress_jobs_from_redis(
    api: Api, records: RecordFactory, settings: Settings, redis_client
):
    record = await records.create("a retry waiting for its time")
    await api.call("POST", "/api/tasks", body={"ids": [record.id]})
    # As a job whose retry is due in a minute: arq's queue score is the time it runs next.
    await redis_client.zadd(settings.queue_name, {record.id: (await redis_client.time())[0] * 1000 + 60_000})
    _, deferred = await api.call("GET", "/api/tasks?state=deferred")
    assert deferred["total"] == 1
    assert deferred["items"][0]["id"] == record.id
    assert deferred["items"][0]["scheduled_for"] is not None
    _, queue = await api.call("GET", "/api/queue")
    assert queue["jobs"]["deferred"] == 1
    _, running = await api.call("GET", "/api/tasks?state=in_progress")
    assert (running["total"], running["items"]) == (0, [])


@pytest.mark.parametrize(
    ("query", "words"),
    [
        ("state=sideways", "state"),
        ("state=done&per_page=0", "per_page"),
        ("state=done&per_page=101", "per_page"),
        ("state=done&page=0", "page"),
        ("state=done&page=abc", "page"),
        ("state=done&colour=red", "colour"),
        ("state=done&q=" + "x" * 201, "q"),
    ],
)
async def test_list_tasks_refuses_bad_queries(api: Api, query: str, words: str):
    status, body = await api.call("GET", f"/api/tasks?{query}")
    assert status == 400
    assert body["error"].startswith(words)


async def test_pause_with_a_reason_and_resume(api: Api):
    status, body = await api.call("POST", "/api/queue/pause", body={"reason": "rotating the API key"})
    assert status == 200
    assert body["paused"]["reason"] == "rotating the API key"
    assert body["paused"]["source"] == "manual"
    _, queue = await api.call("GET", "/api/queue")
    assert queue["paused"]["reason"] == "rotating the API key"
    assert await api.call("POST", "/api/queue/resume") == (
        200,
        {"resumed": True, "was_paused": body["paused"]},
    )
    assert await api.call("POST", "/api/queue/resume") == (200, {"resumed": False, "was_paused": None})
    _, without_body = await api.call("POST", "/api/queue/pause")
    assert without_body["paused"]["reason"] == "paused from the web API"


@pytest.mark.parametrize(("raw", "words"), [("{", "not valid JSON"), ('{"reason": 5}', "reason"), ("[1]", "body")])
async def test_pause_refuses_bad_bodies(api: Api, raw: str, words: str):
    status, body = await api.call("POST", "/api/queue/pause", raw=raw)
    assert status == 400
    assert words in body["error"]


async def test_unknown_routes_and_methods_are_json(api: Api):
    status, body = await api.call("GET", "/api/nothing-here")
    assert (status, body) == (404, {"error": "nothing at /api/nothing-here"})
    response = await api.client.post("/api/queue", headers=AUTH, json={})
    assert response.status == 405
    assert response.headers["Allow"]
    assert "POST is not allowed on /api/queue" in (await response.json())["error"]
    response = await api.client.get("/api/queue/pause", headers=AUTH)
    assert response.status == 405


async def test_the_dashboard_needs_no_token(api: Api):
    page = await api.client.get("/")
    assert page.status == 200
    html = await page.text()
    assert "<title>imagegen</title>" in html
    assert "default-src 'self'" in page.headers["Content-Security-Policy"]
    for src in re.findall(r'(?:src|href)="(/static/[^"]+)"', html):
        asset = await api.client.get(src)
        assert asset.status == 200, src
    assert (await api.client.get("/static/nope.js")).status == 404


async def test_openapi_document_describes_every_route_and_nothing_else(api: Api):
    status, served = await api.call("GET", "/api/openapi.json", headers={})
    assert status == 200
    assert served == json.loads(json.dumps(document()))
    assert served["openapi"].startswith("3.1")
    in_app = set()
    for route in api.client.app.router.routes():
        path = route.resource.canonical if route.resource is not None else ""
        if route.method == "HEAD" or path == "/" or path.startswith("/static"):
            continue  # the dashboard's page and files, not part of the API
        in_app.add((route.method.lower(), path))
    documented = {(method, path) for path, item in served["paths"].items() for method in item}
    assert in_app == documented


async def test_no_response_carries_a_secret(api: Api, records: RecordFactory, settings: Settings, stack: Stack):
    # Every route once, errors included; the fixture checks every answer it saw for every secret.
    record = await records.create("a secret-free prompt")
    await api.call("POST", "/api/tasks", body={"ids": [record.id, "bad"]})
    await run_queue(settings)
    for method, path in (
        ("GET", "/healthz"),
        ("GET", "/api/openapi.json"),
        ("GET", "/api/queue"),
        ("GET", "/api/tasks?state=done"),
        ("GET", f"/api/tasks/{record.id}"),
        ("POST", f"/api/tasks/{record.id}/retry"),
        ("POST", "/api/tasks/enqueue-pending"),
        ("POST", "/api/tasks/retry-failed"),
        ("POST", "/api/queue/pause"),
        ("POST", "/api/queue/resume"),
        ("GET", "/api/tasks/x"),
    ):
        await api.call(method, path)
    await api.call("GET", "/api/queue", headers={"Authorization": "Bearer wrong"})
    api.assert_no_secret()


def test_settings_count_the_token_as_a_secret(stack: Stack):
    assert TOKEN in stack.settings(api_token=TOKEN).secrets()
