"""The API's OpenAPI 3.1 document, written as data next to the routes it describes.

Request bodies and list queries come from the same pydantic models the handlers validate with, so the
document can't drift from what is accepted; a test checks that every route is documented and nothing else.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from ..control import EnqueueOutcome
from ..listing import TaskState
from ..models import JobState
from ..stages import TIMED, Stage
from .bodies import CreateTasks, PauseQueue, TaskQuery

STRING = {"type": "string"}
INT = {"type": "integer"}
NULLABLE_STRING = {"type": ["string", "null"]}
NULLABLE_TIME = {"type": ["string", "null"], "format": "date-time"}
COUNTS = {"type": "object", "additionalProperties": INT}


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def obj(properties: dict[str, Any], *required: str) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(required or properties)}


SCHEMAS: dict[str, Any] = {
    "Error": obj({"error": STRING}),
    "Health": obj(
        {"ok": {"type": "boolean"}, "redis": {"enum": ["ok", "unreachable"]}, "error": STRING}, "ok", "redis"
    ),
    "Pause": obj(
        {
            "reason": STRING,
            "since": {"type": "string", "format": "date-time"},
            "source": {"enum": ["manual", "auto", "outage", "limit"]},
        }
    ),
    "EnqueueResult": obj({"id": STRING, "outcome": {"enum": [o.value for o in EnqueueOutcome]}, "detail": STRING}),
    "EnqueueResults": obj({"results": {"type": "array", "items": ref("EnqueueResult")}, "counts": COUNTS}),
    "EnqueueCounts": obj({"counts": COUNTS}),
    "Task": {
        **obj(
            {
                "id": STRING,
                "state": {"enum": [s.value for s in JobState]},
                "tries": INT,
                "priority": {
                    "type": ["integer", "null"],
                    "description": "the priority of its job while in the queue (higher runs first), else null",
                },
                "enqueued_at": NULLABLE_TIME,
                "started_at": NULLABLE_TIME,
                "finished_at": NULLABLE_TIME,
                "scheduled_for": NULLABLE_TIME,
                "duration_seconds": {"type": ["number", "null"]},
                "error": STRING,
                "record_unavailable": NULLABLE_STRING,
                "record": {
                    "oneOf": [
                        {"type": "null"},
                        obj(
                            {
                                "status": STRING,
                                "prompt": STRING,
                                "imageUrl": STRING,
                                "images": {"type": "array", "items": STRING},
                                "error": STRING,
                            }
                        ),
                    ]
                },
                "stage": {"oneOf": [{"type": "null"}, {"enum": [s.value for s in Stage]}]},
                "stage_since": NULLABLE_TIME,
                "stages": {"type": "array", "items": ref("StageTiming")},
            },
            "id",
            "state",
            "tries",
            "error",
            "record",
        ),
        "description": "What `imagegen inspect --json` prints.",
    },
    "StageTiming": {
        **obj(
            {
                "stage": {"enum": [s.value for s in TIMED]},
                "seconds": {"type": "number", "minimum": 0},
                "started": {"type": "string", "format": "date-time"},
            }
        ),
        "description": "Seconds the job spent in one stage (over all its runs) and when it first entered it.",
    },
    "TaskItem": obj(
        {
            "id": STRING,
            "prompt": NULLABLE_STRING,
            "status": NULLABLE_STRING,
            "error": NULLABLE_STRING,
            "images": {"type": "array", "items": STRING},
            "scheduled_for": NULLABLE_TIME,
            "phase": NULLABLE_STRING,
            "worker": NULLABLE_STRING,
        }
    ),
    "TaskPage": obj(
        {
            "state": {"enum": [s.value for s in TaskState]},
            "page": INT,
            "per_page": INT,
            "total": INT,
            "items": {"type": "array", "items": ref("TaskItem")},
        }
    ),
    "MinuteCount": obj({"minute": {"type": "string", "format": "date-time"}, "done": INT, "failed": INT}),
    "Throughput": obj(
        {
            "window_minutes": INT,
            "done": INT,
            "failed": INT,
            "failure_rate": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
            "minutes": {"type": "array", "items": ref("MinuteCount")},
        }
    ),
    "Spend": {
        **obj(
            {
                "day": {"type": "string", "format": "date"},
                "timezone": STRING,
                "limit": {"type": ["integer", "null"]},
                "calls": INT,
                "images": INT,
                "moderated": INT,
                "failed": INT,
                "reserved": INT,
            }
        ),
        "description": "Today's paid jimeng calls (in JIMENG_DAILY_LIMIT_TZ) by outcome, against JIMENG_DAILY_LIMIT "
        "(null: none); `reserved` are calls in flight or of a worker that died during its call.",
    },
    "Queue": {
        **obj(
            {
                "jobs": obj({"queued": INT, "deferred": INT, "in_progress": INT, "waiting": INT}),
                "records": {"oneOf": [{"type": "null"}, COUNTS]},
                "records_error": NULLABLE_STRING,
                "paused": {"oneOf": [{"type": "null"}, ref("Pause")]},
                "outages": {"type": "array", "items": {"type": "object"}},
                "consecutive_failures": INT,
                "max_failed": INT,
                "spend": ref("Spend"),
                "workers": {"type": "array", "items": {"type": "object"}},
                "throughput": ref("Throughput"),
            }
        ),
        "description": "What `imagegen status --json` prints, with the last hour's outcomes per minute.",
    },
}


def response(description: str, schema: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": ref(schema)}}}


def errors(*statuses: int) -> dict[str, Any]:
    meaning = {
        400: "bad input: invalid JSON, field, id, state or paging",
        401: "missing or wrong bearer token",
        404: "no such record",
        503: "Redis or PocketBase is unreachable",
    }
    return {str(status): response(meaning[status], "Error") for status in (401, 503, *statuses)}


def json_body(model: type[CreateTasks | PauseQueue], required: bool = True) -> dict[str, Any]:
    return {"required": required, "content": {"application/json": {"schema": model.model_json_schema()}}}


def query_parameters() -> list[dict[str, Any]]:
    schema = TaskQuery.model_json_schema()
    return [
        {"name": name, "in": "query", "required": False, "schema": prop} for name, prop in schema["properties"].items()
    ]


def task_id_parameter() -> dict[str, Any]:
    return {
        "name": "id",
        "in": "path",
        "required": True,
        "description": "a PocketBase record id: 15 characters of a-z and 0-9",
        "schema": STRING,
    }


def operation(summary: str, ok: dict[str, Any], failures: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"summary": summary, "responses": {"200": ok, **failures}, **extra}


@cache
def paths() -> dict[str, dict[str, Any]]:
    task_id = [task_id_parameter()]
    return {
        "/healthz": {
            "get": {
                "summary": "Whether Redis answers (no token needed)",
                "security": [],
                "responses": {"200": response("Redis answers", "Health"), "503": response("Redis is down", "Health")},
            }
        },
        "/metrics": {
            "get": {
                "summary": "The queue's Prometheus metrics (text format; token needed when API_TOKEN is set)",
                "responses": {
                    "200": {"description": "metrics in Prometheus' text format", "content": {"text/plain": {}}},
                    "401": response("missing or wrong bearer token", "Error"),
                    "503": response("Redis is unreachable", "Error"),
                },
            }
        },
        "/api/openapi.json": {
            "get": {
                "summary": "This document (no token needed)",
                "security": [],
                "responses": {"200": {"description": "the OpenAPI document", "content": {"application/json": {}}}},
            }
        },
        "/api/queue": {"get": operation("Queue summary", response("the summary", "Queue"), errors())},
        "/api/queue/pause": {
            "post": operation(
                "Pause the queue for every worker (jobs in flight finish)",
                {
                    "description": "the pause in force (an existing pause keeps its reason)",
                    "content": {"application/json": {"schema": obj({"paused": ref("Pause")})}},
                },
                errors(400),
                requestBody=json_body(PauseQueue, required=False),
            )
        },
        "/api/queue/resume": {
            "post": operation(
                "Lift the pause and reset the failure streak",
                {
                    "description": "whether a pause was lifted",
                    "content": {
                        "application/json": {
                            "schema": obj(
                                {
                                    "resumed": {"type": "boolean"},
                                    "was_paused": {"oneOf": [{"type": "null"}, ref("Pause")]},
                                }
                            )
                        }
                    },
                },
                errors(),
            )
        },
        "/api/tasks": {
            "get": operation(
                "Tasks in one state, a page at a time (record states searchable by id or prompt text)",
                response("one page", "TaskPage"),
                errors(400),
                parameters=query_parameters(),
            ),
            "post": operation(
                "Queue prompts by id, as `imagegen add`",
                response("one outcome per id and the counts", "EnqueueResults"),
                errors(400),
                requestBody=json_body(CreateTasks),
            ),
        },
        "/api/tasks/enqueue-pending": {
            "post": operation(
                "Queue every pending record, as `imagegen add-pending`",
                response("how many records had each outcome", "EnqueueCounts"),
                errors(),
            )
        },
        "/api/tasks/retry-failed": {
            "post": operation(
                "Queue every failed record again, as `imagegen retry-failed`",
                response("how many records had each outcome", "EnqueueCounts"),
                errors(),
            )
        },
        "/api/tasks/{id}": {
            "get": operation(
                "One task: job state, tries, timings, error, the record and its image URLs",
                response("the task", "Task"),
                errors(400, 404),
                parameters=task_id,
            )
        },
        "/api/tasks/{id}/retry": {
            "post": operation(
                "Queue one record again with all its attempts (a done record stays done)",
                response("the outcome", "EnqueueResult"),
                errors(400, 404),
                parameters=task_id,
            )
        },
    }


@cache
def document() -> dict[str, Any]:
    """The OpenAPI document the app serves at /api/openapi.json."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "imagegen",
            "version": "1",
            "description": "Queue, inspect and steer image generation. Every /api/ route but this document needs "
            '\'Authorization: Bearer <API_TOKEN>\' when API_TOKEN is set. Errors are {"error": "..."}.',
        },
        "paths": paths(),
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }
