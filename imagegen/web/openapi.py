"""The API's OpenAPI 3.1 document, written as data next to the routes it describes.

Request bodies and list queries come from the same pydantic models the handlers validate with, so the
document can't drift from what is accepted; a test checks that every route is documented and nothing else.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from imagegen.models import PROMPT_ID_PATTERN, JobState
from imagegen.ops.control import EnqueueOutcome
from imagegen.ops.listing import TaskState
from imagegen.queue.accounts import AccountState
from imagegen.queue.stages import TIMED, Stage

from .bodies import ActivityQuery, CreateTasks, NoOptions, PauseQueue, TaskQuery

STRING = {"type": "string"}
INT = {"type": "integer"}
NULLABLE_STRING = {"type": ["string", "null"]}
NULLABLE_TIME = {"type": ["string", "null"], "format": "date-time"}
COUNTS = {"type": "object", "additionalProperties": INT}


REF_TEMPLATE = "#/components/schemas/{model}"
BodyModel = type[CreateTasks | PauseQueue | NoOptions | TaskQuery | ActivityQuery]
QueryModel = type[TaskQuery | ActivityQuery]


def ref(name: str) -> dict[str, str]:
    return {"$ref": REF_TEMPLATE.format(model=name)}


def model_schema(model: BodyModel) -> dict[str, Any]:
    """A model's JSON Schema with the types it refers to (enums) under components, where its $refs point."""
    return model.model_json_schema(ref_template=REF_TEMPLATE)


def obj(properties: dict[str, Any], *required: str) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(required or properties)}


SCHEMAS: dict[str, Any] = {
    "Error": obj({"error": STRING}),
    "Health": {
        **obj(
            {
                "ok": {"type": "boolean"},
                "status": {"enum": ["ok", "unavailable"]},
                "redis": {"enum": ["ok", "unreachable"]},
                "error": STRING,
            },
            "ok",
            "status",
        ),
        "description": "`redis` and `error` only for a caller with the token (or when none is configured).",
    },
    "Pause": obj(
        {
            "reason": STRING,
            "since": {"type": "string", "format": "date-time"},
            "source": {"enum": ["manual", "auto", "outage", "limit", "accounts"]},
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
            "updated": {**NULLABLE_TIME, "description": "records: when PocketBase last changed them, where it says"},
        }
    ),
    "Activity": {
        **obj({"limit": INT, "items": {"type": "array", "items": ref("TaskItem")}}),
        "description": "The records changed last, in every state, newest first (by their `updated` field).",
    },
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
    "Account": {
        **obj(
            {
                "account": STRING,
                "fingerprint": STRING,
                "state": {"enum": [state.value for state in AccountState]},
                "until": {"type": ["number", "null"]},
                "since": {"type": ["number", "null"]},
                "reason": STRING,
                "in_flight": INT,
                "calls_today": INT,
                "transient_streak": INT,
                "credits": {"type": ["integer", "null"]},
            }
        ),
        "description": "One jimeng account of JIMENG_API_KEY, named by its position and last four characters "
        "(never the key); `until`/`since` in epoch seconds while it is set aside; `credits` only where asked of "
        "the proxy (`imagegen accounts`).",
    },
    "Worker": {
        **obj(
            {
                "id": STRING,
                "queue": STRING,
                "started": {"type": "number"},
                "running": {"type": "array", "items": STRING},
                "waiting": {"type": "array", "items": STRING},
                "jobs": {"type": "array", "items": {"type": "object"}},
                "outages": {"type": "object"},
                "stopping": {"type": "boolean"},
                "jobs_done": INT,
                "seen": {"type": "number"},
            }
        ),
        "description": "A live worker's heartbeat: the job ids it runs and those waiting for a resume, each job's "
        "phase and stage, the outages it sees; times in epoch seconds.",
    },
    "Queue": {
        **obj(
            {
                "jobs": obj({"queued": INT, "deferred": INT, "in_progress": INT, "waiting": INT}),
                "records": {"oneOf": [{"type": "null"}, COUNTS]},
                "records_as_of": {
                    **NULLABLE_TIME,
                    "description": "when the record counts were counted: they are shared by every viewer for "
                    "RECORD_COUNTS_MAX_AGE seconds; null without counts",
                },
                "records_age_seconds": {
                    "type": ["number", "null"],
                    "description": "seconds since `records_as_of`; null without counts",
                },
                "records_error": NULLABLE_STRING,
                "paused": {"oneOf": [{"type": "null"}, ref("Pause")]},
                "outages": {"type": "array", "items": {"type": "object"}},
                "consecutive_failures": INT,
                "max_failed": INT,
                "spend": ref("Spend"),
                "accounts": {"type": "array", "items": ref("Account")},
                "workers": {"type": "array", "items": ref("Worker")},
                "last_worker_seen": {
                    **NULLABLE_TIME,
                    "description": "when a worker of this queue last beat; null: never on this Redis",
                },
                "warnings": {"type": "array", "items": STRING},
                "throughput": ref("Throughput"),
            }
        ),
        "description": "What `imagegen status --json` prints (less its `target`), with the last hour's outcomes "
        "per minute. Job counts are read in O(log n) Redis work (running jobs from the workers' heartbeats).",
    },
}


def response(description: str, schema: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": ref(schema)}}}


MEANING = {
    400: "bad input: invalid JSON, field, id, state or paging",
    401: "missing or wrong bearer token",
    403: "a write refused: not `Content-Type: application/json`, or sent by another site's page",
    404: "no such record",
    413: "the body is larger than the server accepts",
    421: "the request names a host this server does not answer to (WEB_ALLOWED_HOSTS)",
    503: "Redis or PocketBase is unreachable",
}
WRITE_ERRORS = (400, 403, 413)


def errors(*statuses: int) -> dict[str, Any]:
    return {str(status): response(MEANING[status], "Error") for status in sorted({401, 421, 503, *statuses})}


def json_body(model: BodyModel) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": model_schema(model)}}}


def defined_types() -> dict[str, Any]:
    """The types the request models refer to, as components/schemas holds them."""
    found: dict[str, Any] = {}
    for model in (CreateTasks, PauseQueue, NoOptions, TaskQuery, ActivityQuery):
        found.update(model_schema(model).get("$defs", {}))
    return found


def query_parameters(model: QueryModel) -> list[dict[str, Any]]:
    schema = model_schema(model)
    return [
        {"name": name, "in": "query", "required": False, "schema": prop} for name, prop in schema["properties"].items()
    ]


def task_id_parameter() -> dict[str, Any]:
    return {
        "name": "id",
        "in": "path",
        "required": True,
        "description": "a PocketBase record id: 15 characters of a-z and 0-9",
        "schema": {"type": "string", "pattern": PROMPT_ID_PATTERN},
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
                "responses": {
                    "200": response("Redis answers", "Health"),
                    "421": response(MEANING[421], "Error"),
                    "503": response("Redis is down", "Health"),
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "The queue's Prometheus metrics (text format; token needed when API_TOKEN is set)",
                "responses": {
                    "200": {"description": "metrics in Prometheus' text format", "content": {"text/plain": {}}},
                    "401": response(MEANING[401], "Error"),
                    "421": response(MEANING[421], "Error"),
                    "503": response("Redis is unreachable", "Error"),
                },
            }
        },
        "/api/openapi.json": {
            "get": {
                "summary": "This document (no token needed)",
                "security": [],
                "responses": {
                    "200": {"description": "the OpenAPI document", "content": {"application/json": {}}},
                    "421": response(MEANING[421], "Error"),
                },
            }
        },
        "/api/queue": {"get": operation("Queue summary", response("the summary", "Queue"), errors())},
        "/api/accounts": {
            "get": operation(
                "The jimeng accounts of JIMENG_API_KEY and their states",
                {
                    "description": "every account, in JIMENG_API_KEY's order",
                    "content": {
                        "application/json": {"schema": obj({"accounts": {"type": "array", "items": ref("Account")}})}
                    },
                },
                errors(),
            )
        },
        "/api/queue/pause": {
            "post": operation(
                "Pause the queue for every worker (jobs in flight finish)",
                {
                    "description": "the pause in force (an existing pause keeps its reason)",
                    "content": {"application/json": {"schema": obj({"paused": ref("Pause")})}},
                },
                errors(*WRITE_ERRORS),
                requestBody=json_body(PauseQueue),
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
                errors(*WRITE_ERRORS),
                requestBody=json_body(NoOptions),
            )
        },
        "/api/tasks": {
            "get": operation(
                "Tasks in one state, a page at a time (record states searchable by id or prompt text)",
                response("one page", "TaskPage"),
                errors(400),
                parameters=query_parameters(TaskQuery),
            ),
            "post": operation(
                "Queue prompts by id, as `imagegen add`",
                response("one outcome per id and the counts", "EnqueueResults"),
                errors(*WRITE_ERRORS),
                requestBody=json_body(CreateTasks),
            ),
        },
        "/api/activity": {
            "get": operation(
                "The records changed last, in every state, newest first (the dashboard's first view)",
                response("the latest records", "Activity"),
                errors(400),
                parameters=query_parameters(ActivityQuery),
            )
        },
        "/api/tasks/enqueue-pending": {
            "post": operation(
                "Queue every pending record, as `imagegen add-pending`",
                response("how many records had each outcome", "EnqueueCounts"),
                errors(*WRITE_ERRORS),
                requestBody=json_body(NoOptions),
            )
        },
        "/api/tasks/retry-failed": {
            "post": operation(
                "Queue every failed record again, as `imagegen retry-failed`",
                response("how many records had each outcome", "EnqueueCounts"),
                errors(*WRITE_ERRORS),
                requestBody=json_body(NoOptions),
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
                errors(*WRITE_ERRORS, 404),
                parameters=task_id,
                requestBody=json_body(NoOptions),
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
            "'Authorization: Bearer <API_TOKEN>' when API_TOKEN is set. Every POST sends "
            "'Content-Type: application/json' and a JSON object ({} when it has no options); a browser page of "
            'another site is refused. Errors are {"error": "..."}.',
        },
        "paths": paths(),
        "components": {
            "schemas": {**SCHEMAS, **defined_types()},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }
