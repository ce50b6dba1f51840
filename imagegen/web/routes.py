"""One handler per route, each a thin call of one `Control` operation (or the listing) turned into JSON.

The API has the CLI's semantics: the same enqueue outcomes, the same inspect and status reports. Routes
that change anything are POSTs.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from imagegen.access import token_refusal
from imagegen.errors import ImagegenError, InvalidRequest, RecordNotFound
from imagegen.models import JobState, validate_prompt_id
from imagegen.ops.control import EnqueueOutcome, EnqueueTally, pause_json, redis_errors
from imagegen.ops.listing import list_tasks, recent_activity
from imagegen.ops.metrics import CONTENT_TYPE, queue_metrics

from .bodies import DEFAULT_PAUSE_REASON, ActivityQuery, CreateTasks, NoOptions, PauseQueue, TaskQuery, parse
from .context import DASHBOARD_PAGE, SETTINGS, STATIC_DIR, control_of
from .openapi import document

HEALTH_TIMEOUT = 3.0
# The dashboard's files, by name: nothing else under /static/ is served.
STATIC_FILES = {"app.js": "text/javascript; charset=utf-8", "app.css": "text/css; charset=utf-8"}
# A task id in a path, as the router matches it: `/api/tasks/enqueue-pending` is never taken for an id.
TASK_ID = "{id:[a-z0-9]{15}}"

routes = web.RouteTableDef()


def reply(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda value: json.dumps(value, ensure_ascii=False))


async def json_body(request: web.Request, *, optional: bool = False) -> Any:
    """The request's JSON body; `{}` for an empty body when `optional`."""
    raw = await request.read()
    if not raw.strip():
        if optional:
            return {}
        raise InvalidRequest("this route needs a JSON body")
    try:
        return json.loads(raw)
    except RecursionError:
        raise InvalidRequest("the body is nested too deeply to be a request") from None
    except ValueError:
        raise InvalidRequest("the body is not valid JSON (UTF-8)") from None


@routes.get("/")
async def dashboard(request: web.Request) -> web.FileResponse:
    return web.FileResponse(DASHBOARD_PAGE, headers={"Content-Type": "text/html; charset=utf-8"})


@routes.get("/static/{name}")
async def static_file(request: web.Request) -> web.FileResponse:
    """The dashboard's script and style sheet; a JSON 404 for any other name."""
    name = request.match_info["name"]
    content_type = STATIC_FILES.get(name)
    if content_type is None:
        raise web.HTTPNotFound()
    return web.FileResponse(STATIC_DIR / name, headers={"Content-Type": content_type})


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    """200 when Redis answers, 503 otherwise; no token needed. Only a caller that could use the API (the token,
    or none configured) learns why Redis is unreachable: the answer names its address."""
    settings = request.app[SETTINGS]
    detailed = token_refusal(settings, request.headers.get("Authorization", "")) is None
    try:
        control = await control_of(request)
        with redis_errors(settings):
            async with asyncio.timeout(HEALTH_TIMEOUT):
                await control.redis.ping()
    except (ImagegenError, TimeoutError) as exc:
        details = {"redis": "unreachable", "error": str(exc) or "no answer in time"} if detailed else {}
        return reply({"ok": False, "status": "unavailable", **details}, 503)
    return reply({"ok": True, "status": "ok", **({"redis": "ok"} if detailed else {})})


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    """The queue's Prometheus metrics; the record counts are left out (imagegen_records_up 0) while PocketBase
    can't be read, and the answer is 503 only when Redis can't."""
    control = await control_of(request)
    figures = await control.queue_figures()
    return web.Response(body=queue_metrics(figures), headers={"Content-Type": CONTENT_TYPE})


@routes.get("/api/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    return reply(document())


@routes.get("/api/queue")
async def queue_summary(request: web.Request) -> web.Response:
    """Jobs and records by state, the pause, the failure streak, live workers and the last hour's outcomes."""
    control = await control_of(request)
    report = await control.status()
    throughput = await control.throughput()
    return reply({**report.to_json(), "throughput": throughput.to_json()})


@routes.get("/api/accounts")
async def accounts(request: web.Request) -> web.Response:
    """The jimeng accounts: each one's state, calls today and in flight (never its key)."""
    control = await control_of(request)
    return reply({"accounts": [health.to_json() for health in await control.accounts_health()]})


@routes.post("/api/queue/pause")
async def pause(request: web.Request) -> web.Response:
    body = parse(PauseQueue, await json_body(request, optional=True))
    control = await control_of(request)
    info = await control.pause(body.reason or DEFAULT_PAUSE_REASON)
    return reply({"paused": pause_json(info)})


@routes.post("/api/queue/resume")
async def resume(request: web.Request) -> web.Response:
    parse(NoOptions, await json_body(request, optional=True))
    control = await control_of(request)
    lifted = await control.resume()
    return reply({"resumed": lifted is not None, "was_paused": None if lifted is None else pause_json(lifted)})


@routes.get("/api/tasks")
async def tasks(request: web.Request) -> web.Response:
    query = parse(TaskQuery, dict(request.query))
    control = await control_of(request)
    page = await list_tasks(control, query.state, page=query.page, per_page=query.per_page, search=query.q)
    return reply(page.to_json())


@routes.get("/api/activity")
async def activity(request: web.Request) -> web.Response:
    """The records changed last, in every state, newest first: the dashboard's first view."""
    query = parse(ActivityQuery, dict(request.query))
    control = await control_of(request)
    items = await recent_activity(control, query.limit)
    return reply({"limit": query.limit, "items": [item.to_json() for item in items]})


@routes.post("/api/tasks")
async def create_tasks(request: web.Request) -> web.Response:
    """Queue each id, as `imagegen add` does: one outcome per id and the counts."""
    body = parse(CreateTasks, await json_body(request))
    control = await control_of(request)
    reports = [await control.enqueue(prompt_id, force=body.force, priority=body.priority) for prompt_id in body.ids]
    tally = EnqueueTally()
    tally.add(reports)
    return reply(tally.to_json(reports))


@routes.post("/api/tasks/enqueue-pending")
async def enqueue_pending(request: web.Request) -> web.Response:
    parse(NoOptions, await json_body(request, optional=True))
    control = await control_of(request)
    return reply((await EnqueueTally().add_pages(control.enqueue_pending())).to_json())


@routes.post("/api/tasks/retry-failed")
async def retry_failed(request: web.Request) -> web.Response:
    parse(NoOptions, await json_body(request, optional=True))
    control = await control_of(request)
    return reply((await EnqueueTally().add_pages(control.retry_failed())).to_json())


@routes.get(f"/api/tasks/{TASK_ID}")
async def task(request: web.Request) -> web.Response:
    """What `imagegen inspect --json` prints; 404 when neither a job nor a record has the id."""
    prompt_id = validate_prompt_id(request.match_info["id"])
    control = await control_of(request)
    report = await control.inspect(prompt_id)
    if report.record_unavailable:
        return reply(
            {"error": f"the record could not be read: {report.record_unavailable}", "task": report.to_json()}, 503
        )
    if report.record_status is None and report.state is JobState.UNKNOWN:
        raise RecordNotFound(f"no job and no record with id {prompt_id!r}")
    return reply(report.to_json())


@routes.post(f"/api/tasks/{TASK_ID}/retry")
async def retry(request: web.Request) -> web.Response:
    """Queue the record again as `imagegen add` does: a new run with all its attempts (a done one stays done)."""
    prompt_id = validate_prompt_id(request.match_info["id"])
    parse(NoOptions, await json_body(request, optional=True))
    control = await control_of(request)
    report = await control.enqueue(prompt_id)
    if report.outcome is EnqueueOutcome.NOT_FOUND:
        raise RecordNotFound(report.detail)
    return reply(report.to_json())
