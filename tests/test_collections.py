"""imagegen on the collections users already have, each made through PocketBase's API: ours, the old system's
(`prompt` and `imageUrl` only: states in Redis), and an app's (`status` a select of pending, processing, done,
failed with records created `pending`, `imageUrl` a url field, and a required field of its own).

On each, the main flows end every record done with one paid call: add-pending, add, the watch, retry-failed
after a fixed record, and the reconcile sweep for a record left `processing` with no job; status, the
dashboard's API, inspect and /metrics say what happened. Then a deliberately broken collection: `check` names
each problem with its fix and the worker refuses it before any paid call. `setup-collection` twice: the second
run changes nothing, and records and fields stay as they were.
"""

from __future__ import annotations

import json
import os
import pty
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer

from imagegen.clients.pocketbase import PocketBaseClient
from imagegen.models import RecordStatus
from imagegen.queue.keys import RedisKeys
from imagegen.queue.marks import RecordMarks
from imagegen.settings import Settings
from imagegen.web import create_app

from .conftest import BIN, SECRETS, Stack, WorkerProcess, run_cli
from .test_pipeline import wait_until

TEXT: dict[str, Any] = {"type": "text"}
OLD_FIELDS: list[dict[str, Any]] = [{"name": "prompt", **TEXT}, {"name": "imageUrl", **TEXT}]
APP_FIELDS: list[dict[str, Any]] = [
    {"name": "prompt", "type": "text", "max": 10000},
    {"name": "imageUrl", "type": "url"},
    {"name": "status", "type": "select", "maxSelect": 1, "values": ["pending", "processing", "done", "failed"]},
    {"name": "owner", "type": "text", "required": True},
]


@dataclass
class Collection:
    """One collection under test: its name, what its records need besides the prompt, the settings for it."""

    name: str
    extra: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)

    @property
    def has_status(self) -> bool:
        return self.name != "oldsystem"


COLLECTIONS = {
    "ours": Collection("prompts"),
    # the old system's .env names no field: imagegen finds `status`, `error`, ... missing and does without
    "old": Collection("oldsystem", env={"POCKETBASE_COLLECTION": "oldsystem"}),
    "app": Collection(
        "appprompts", {"owner": "mobile-app", "status": "pending"}, {"POCKETBASE_COLLECTION": "appprompts"}
    ),
}


class Admin:
    """Superuser calls to PocketBase's collections API, as a user's own tools would make them."""

    def __init__(self, http: aiohttp.ClientSession, stack: Stack) -> None:
        self.http = http
        self.base = stack.env["POCKETBASE_URL"]
        self.token = ""
        self.stack = stack

    async def login(self) -> None:
        body = {"identity": self.stack.env["POCKETBASE_EMAIL"], "password": self.stack.env["POCKETBASE_PASSWORD"]}
        async with self.http.post(f"{self.base}/api/collections/_superusers/auth-with-password", json=body) as answer:
            assert answer.status == 200, await answer.text()
            self.token = (await answer.json())["token"]

    async def call(self, method: str, path: str, body: object = None) -> tuple[int, Any]:
        headers = {"Authorization": self.token}
        async with self.http.request(method, f"{self.base}{path}", json=body, headers=headers) as answer:
            text = await answer.text()
            return answer.status, json.loads(text) if text else None

    async def replace_collection(self, name: str, fields: list[dict[str, Any]]) -> None:
        await self.call("DELETE", f"/api/collections/{name}")
        status, body = await self.call("POST", "/api/collections", {"name": name, "type": "base", "fields": fields})
        assert status == 200, body

    async def collection(self, name: str) -> dict[str, Any]:
        status, body = await self.call("GET", f"/api/collections/{name}")
        assert status == 200, body
        return dict(body)

    async def create(self, collection: Collection, prompt: str) -> str:
        body = {"prompt": prompt, **collection.extra}
        status, record = await self.call("POST", f"/api/collections/{collection.name}/records", body)
        assert status == 200, record
        return str(record["id"])

    async def record(self, collection: str, record_id: str) -> dict[str, Any]:
        status, record = await self.call("GET", f"/api/collections/{collection}/records/{record_id}")
        assert status == 200, record
        return dict(record)

    async def patch(self, collection: str, record_id: str, body: dict[str, Any]) -> None:
        status, record = await self.call("PATCH", f"/api/collections/{collection}/records/{record_id}", body)
        assert status == 200, record


@pytest.fixture
async def admin(stack: Stack) -> AsyncIterator[Admin]:
    async with aiohttp.ClientSession() as http:
        admin = Admin(http, stack)
        await admin.login()
        yield admin


def cli(stack: Stack, collection: Collection, *args: str) -> subprocess.CompletedProcess[str]:
    """`imagegen ...` as a subprocess with this collection's settings."""
    return run_cli(stack, *args, timeout=60, **collection.env)


def cli_json(stack: Stack, collection: Collection, *args: str) -> Any:
    result = cli(stack, collection, *args, "--json")
    assert "Traceback" not in result.stderr
    return json.loads(result.stdout)


async def dashboard(stack: Stack, collection: Collection, path: str) -> Any:
    """What the dashboard reads: the web API in-process with this collection's settings."""
    async with TestClient(TestServer(create_app(settings_for(stack, collection)))) as client:
        answer = await client.get(path)
        assert answer.status == 200, await answer.text()
        return await answer.json() if answer.content_type == "application/json" else await answer.text()


def settings_for(stack: Stack, collection: Collection) -> Settings:
    return stack.settings(**{k.lower(): v for k, v in collection.env.items()})


async def wait_shown(pb: PocketBaseClient, ids: list[str], status: str, deadline: float = 60) -> list[str]:
    """Wait until every record shows `status` as the front ends show it; returns what they show."""

    async def shown() -> list[str]:
        return [(await pb.get_record(i)).shown_status for i in ids]

    await wait_until(lambda: _all(shown, status), deadline)
    return await shown()


async def _all(shown: Any, status: str) -> bool:
    return all(s == status for s in await shown())


@pytest.mark.parametrize("kind", list(COLLECTIONS))
async def test_the_main_flows_end_every_record_done_with_one_paid_call(
    stack: Stack, admin: Admin, start_worker: Any, redis_client: aioredis.Redis, kind: str
) -> None:
    collection = COLLECTIONS[kind]
    if kind == "old":
        await admin.replace_collection(collection.name, OLD_FIELDS)
    elif kind == "app":
        await admin.replace_collection(collection.name, APP_FIELDS)
    settings = settings_for(stack, collection)
    pb = PocketBaseClient(admin.http, settings, RecordMarks(redis_client, RedisKeys(settings.queue_name)))
    sandbox = stack.jimeng.sandbox

    # add and add-pending, with no worker yet; and a record a vanished run left processing, with no job
    bulk = [await admin.create(collection, f"a {kind} lighthouse #{i}") for i in range(3)]
    broken = await admin.create(collection, "")  # an empty prompt fails at once, before any paid call
    single = await admin.create(collection, f"a {kind} kite")
    stranded = await admin.create(collection, f"a {kind} stranded comet")
    if collection.has_status:
        await admin.patch(collection.name, stranded, {"status": "processing"})
    else:  # where imagegen keeps a state the collection has no field for
        await RecordMarks(redis_client, RedisKeys(settings.queue_name)).set(stranded, RecordStatus.PROCESSING)
    counts = cli_json(stack, collection, "status")["records"]
    assert (counts["pending"], counts["processing"], counts["done"], counts["failed"]) == (5, 1, 0, 0)
    checked = cli(stack, collection, "check")
    assert checked.returncode == 0, checked.stdout
    if kind == "old":  # what adding each field would bring, not a failure
        assert (
            "note:       no field 'status'; add it (`imagegen setup-collection`) and records show queued, processing, "
            "done and failed in PocketBase and a Redis flush loses no state (without it these states are kept in "
            "Redis); POCKETBASE_FIELD_STATUS= silences this"
        ) in checked.stdout.splitlines()
    assert cli_json(stack, collection, "add", single)["counts"] == {"queued": 1}
    # a record `add` marked queued is no longer pending; one whose select has no `queued` still reads pending
    expected = {"queued": 4} if collection.name != "appprompts" else {"queued": 4, "already queued": 1}
    assert cli_json(stack, collection, "add-pending")["counts"] == expected
    # the dashboard's pending list: queued in bulk still reads pending, marked queued or processing does not
    listed = await dashboard(stack, collection, "/api/tasks?state=pending")
    shown = sorted([*bulk, broken, *([single] if "already queued" in expected else [])])
    assert (sorted(item["id"] for item in listed["items"]), listed["total"]) == (shown, len(shown))

    # the worker: the queued records, the stranded one (reconcile sweep) and, watched, a new one
    worker: WorkerProcess = start_worker(
        POCKETBASE_WATCH="true", RECONCILE_INTERVAL="1", WORKER_LEASE="2", **collection.env
    )
    assert await wait_shown(pb, [*bulk, single, stranded], "done") == ["done"] * 5, worker.output()
    assert await wait_shown(pb, [broken], "failed") == ["failed"]
    watched = await admin.create(collection, f"a {kind} watched owl")
    assert await wait_shown(pb, [watched], "done") == ["done"], worker.output()

    # status, the dashboard and inspect say what happened, wherever the state lives
    counts = cli_json(stack, collection, "status")["records"]
    assert (counts["pending"], counts["processing"], counts["done"], counts["failed"]) == (0, 0, 6, 1)
    metrics = await dashboard(stack, collection, "/metrics")
    assert 'imagegen_records{status="done"} 6.0' in metrics and 'imagegen_records{status="failed"} 1.0' in metrics
    queue = await dashboard(stack, collection, "/api/queue")
    assert (queue["records"]["done"], queue["records"]["failed"]) == (6, 1)
    listed = await dashboard(stack, collection, "/api/tasks?state=failed")
    assert [item["id"] for item in listed["items"]] == [broken]
    assert "empty prompt" in listed["items"][0]["error"]
    inspected = cli_json(stack, collection, "inspect", broken)
    assert (inspected["state"], inspected["record"]["status"]) == ("failed", "failed")
    assert cli_json(stack, collection, "inspect", watched)["record"]["status"] == "done"
    stored = await admin.record(collection.name, broken)
    if collection.has_status:
        assert stored["status"] == "failed"
    else:
        assert set(stored) == {"id", "collectionId", "collectionName", "prompt", "imageUrl"}

    # retry-failed, once the record is fixed
    await admin.patch(collection.name, broken, {"prompt": f"a {kind} mended prompt"})
    assert cli_json(stack, collection, "retry-failed")["counts"] == {"queued": 1}
    assert await wait_shown(pb, [broken], "done") == ["done"], worker.output()

    every = [*bulk, single, stranded, watched, broken]
    for record_id in every:
        record = await admin.record(collection.name, record_id)
        assert record["imageUrl"].startswith(settings.tos_public_base_url)
        assert sandbox.calls(record["prompt"]) == 1, record
        if collection.has_status:
            assert record["status"] == "done"
    assert sandbox.stats()["total_calls"] == len(every)
    assert "Traceback" not in worker.output()
    for secret in SECRETS:
        assert secret not in worker.output()


BROKEN_FIELDS: list[dict[str, Any]] = [
    {"name": "text", "type": "text"},  # the prompt under another name: `prompt` is missing
    {"name": "imageUrl", "type": "text", "max": 30},  # too short for the bucket's URLs
    {"name": "status", "type": "select", "maxSelect": 1, "values": ["queued", "done"]},  # no processing, failed
    {"name": "error", "type": "text", "max": 200},  # too short for imagegen's errors
    {"name": "images", "type": "text"},  # not json
]


async def test_check_names_every_problem_and_the_worker_refuses_before_any_paid_call(
    stack: Stack, admin: Admin, start_worker: Any
) -> None:
    collection = Collection("brokenprompts", env={"POCKETBASE_COLLECTION": "brokenprompts"})
    await admin.replace_collection(collection.name, BROKEN_FIELDS)
    status, _ = await admin.call(
        "POST", f"/api/collections/{collection.name}/records", {"text": "a broken-collection fox"}
    )
    assert status == 200
    result = cli(stack, collection, "check")
    assert result.returncode == 3, result.stdout
    problems = [line.removeprefix("collection  FAIL ") for line in result.stdout.splitlines() if "FAIL" in line]
    longest = len(f"{settings_for(stack, collection).tos_public_base_url}/imagegen/") + len("x" * 15 + "/9.webp")
    assert problems == [
        "prompt: no such field in the collection - add it (`imagegen setup-collection`) or set POCKETBASE_FIELD_PROMPT",
        f"imageUrl: holds at most 30 characters, shorter than the image URLs imagegen writes ({longest}) - raise its "
        f"max length to {longest} or more (0 means 5000) in the admin UI",
        "status: offers queued, done, not processing, failed, which imagegen writes - add processing, failed to its "
        "values (`imagegen setup-collection` does)",
        "error: holds at most 200 characters, shorter than imagegen's error messages (4000) - raise its max length "
        "to 4000 or more (0 means 5000) in the admin UI",
        "images: is a text field, imagegen needs json - change its type to json in the PocketBase admin UI, or point "
        "the setting at another field",
    ]
    assert "Traceback" not in result.stdout + result.stderr
    assert cli_json(stack, collection, "check")["collection"]["problems"] == problems

    worker: WorkerProcess = start_worker(POCKETBASE_WATCH="true", **collection.env)
    assert worker.process.wait(30) == 2
    refused = worker.output()
    assert "would refuse imagegen's writes after a paid call" in refused
    assert all(problem in refused for problem in problems[1:4])  # every problem that fails a write
    assert "Traceback" not in refused
    assert stack.jimeng.sandbox.stats()["total_calls"] == 0


@pytest.mark.parametrize("kind", ["old", "app"])
async def test_setup_collection_adds_what_is_missing_once_and_keeps_records_and_fields(
    stack: Stack, admin: Admin, kind: str
) -> None:
    app = COLLECTIONS[kind]
    await admin.replace_collection(app.name, OLD_FIELDS if kind == "old" else APP_FIELDS)
    record_id = await admin.create(app, "an app's heron")
    before = await admin.collection(app.name)
    record = await admin.record(app.name, record_id)

    # off a terminal, without --yes: only says what it would do
    dry = cli(stack, app, "setup-collection")
    assert dry.returncode == 0, dry.stderr
    status_change = (
        "would add field status (select: queued, processing, done, failed)"
        if kind == "old"
        else "would add queued to the values of select status"
    )
    assert dry.stdout.splitlines() == [
        "would add field negativePrompt (text, up to 20000 characters)",
        status_change,
        "would add field error (text, up to 5000 characters)",
        "would add field images (json)",
        "would add field model (text, up to 100 characters)",
        "would add field ratio (text, up to 100 characters)",
        "would add field resolution (text, up to 100 characters)",
        "would add field priority (number)",
        "dry run: nothing changed; run `imagegen setup-collection --yes` to apply",
    ]
    assert await admin.collection(app.name) == before

    applied = cli(stack, app, "setup-collection", "--yes")
    assert applied.returncode == 0, applied.stderr
    assert applied.stdout.splitlines()[-1] == f"collection {app.name}: 8 change(s) made"
    after = await admin.collection(app.name)
    kept = {f["name"]: f for f in after["fields"]}
    for old in before["fields"]:
        expected = {**old, "values": [*old["values"], "queued"]} if old["name"] == "status" else old
        assert kept[old["name"]] == expected
    stored = await admin.record(app.name, record_id)
    assert {name: stored[name] for name in record} == record  # the record keeps every value it had
    again = cli(stack, app, "setup-collection", "--yes")
    assert again.stdout.strip() == f"collection {app.name} has every field imagegen uses; nothing to change"
    assert await admin.collection(app.name) == after
    check = cli(stack, app, "check")
    assert check.returncode == 0, check.stdout
    assert "collection  ok" in check.stdout


async def test_one_rule_of_pending_for_the_filter_the_counts_the_lists_and_add_pending(
    stack: Stack, admin: Admin, redis_client: aioredis.Redis
) -> None:
    """A text status takes any value: pending is no image URL and a status empty or of POCKETBASE_PENDING_VALUES."""
    collection = Collection(
        "textstatus", env={"POCKETBASE_COLLECTION": "textstatus", "POCKETBASE_PENDING_VALUES": "pending,new"}
    )
    await admin.replace_collection(collection.name, [*OLD_FIELDS, {"name": "status", **TEXT}])
    expected = []
    for status in ("", "pending", "new", "queued", "processing", "done", "failed", "draft"):
        for image in ("", "http://127.0.0.1:1/a.png"):
            body = {"prompt": f"a {status or 'blank'} heron", "status": status, "imageUrl": image}
            code, record = await admin.call("POST", f"/api/collections/{collection.name}/records", body)
            assert code == 200, record
            if status in ("", "pending", "new") and not image:
                expected.append(record["id"])
    settings = settings_for(stack, collection)
    pb = PocketBaseClient(admin.http, settings, RecordMarks(redis_client, RedisKeys(settings.queue_name)))
    rule = (await pb.fields()).pending()
    every = [r async for r in pb.iter_records('id != ""')]
    assert sorted(r.id for r in every if rule.matches(r)) == sorted(expected)
    assert sorted([r.id async for r in pb.iter_records(rule.filter)]) == sorted(expected)
    assert cli_json(stack, collection, "status")["records"]["pending"] == 3
    listed = await dashboard(stack, collection, "/api/tasks?state=pending")
    assert sorted(item["id"] for item in listed["items"]) == sorted(expected)
    assert cli_json(stack, collection, "add-pending", "--dry-run")["counts"] == {"would queue": 3}


def answered(stack: Stack, collection: Collection, answer: bytes) -> subprocess.CompletedProcess[str]:
    """`imagegen setup-collection` on a terminal, answering its question with `answer`."""
    controller, terminal = pty.openpty()
    try:
        os.write(controller, answer)
        return subprocess.run(
            [str(BIN / "imagegen"), "setup-collection"],
            cwd=stack.workdir,
            env=stack.process_env(**collection.env),
            stdin=terminal,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(terminal)
        os.close(controller)


async def test_setup_collection_on_a_terminal_asks_first(stack: Stack, admin: Admin) -> None:
    old = COLLECTIONS["old"]
    await admin.replace_collection(old.name, OLD_FIELDS)
    before = await admin.collection(old.name)
    declined = answered(stack, old, b"n\n")
    assert declined.returncode == 1, declined.stderr
    # the answer's echo goes to the terminal, not to stdout
    assert declined.stdout.endswith("apply these changes to oldsystem? [y/N]: nothing changed\n")
    assert await admin.collection(old.name) == before
    accepted = answered(stack, old, b"y\n")
    assert accepted.returncode == 0, accepted.stderr
    assert accepted.stdout.endswith("[y/N]: collection oldsystem: 8 change(s) made\n")
    assert len((await admin.collection(old.name))["fields"]) == len(before["fields"]) + 8
