"""The API's OpenAPI 3.1 document, written as data next to the routes it describes.

Request bodies and list queries come from the same pydantic models the handlers validate with, and every
answer's schema from the model that makes its JSON (`ops/answers.py`), so the document can't drift from what
is accepted or sent; a test checks that every route is documented and nothing else.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from pydantic.json_schema import models_json_schema

from imagegen.models import PROMPT_ID_PATTERN
from imagegen.ops.answers import (
    AccountsAnswer,
    ActivityAnswer,
    Answer,
    EnqueueCountsAnswer,
    EnqueueResultAnswer,
    EnqueueResultsAnswer,
    ErrorAnswer,
    HealthAnswer,
    PausedAnswer,
    QueueSummaryAnswer,
    ResumedAnswer,
    TaskAnswer,
    TaskPageAnswer,
    TaskUnreadableAnswer,
)

from .bodies import ActivityQuery, CreateTasks, NoOptions, PauseQueue, TaskQuery

REF_TEMPLATE = "#/components/schemas/{model}"
# Every answer a route gives; the models and enums they hold come along.
ANSWERS: tuple[type[Answer], ...] = (
    ErrorAnswer,
    HealthAnswer,
    PausedAnswer,
    ResumedAnswer,
    EnqueueResultAnswer,
    EnqueueResultsAnswer,
    EnqueueCountsAnswer,
    TaskAnswer,
    TaskUnreadableAnswer,
    TaskPageAnswer,
    ActivityAnswer,
    AccountsAnswer,
    QueueSummaryAnswer,
)
BodyModel = type[CreateTasks | PauseQueue | NoOptions | TaskQuery | ActivityQuery]
QueryModel = type[TaskQuery | ActivityQuery]


def ref(model: type[Answer]) -> dict[str, str]:
    return {"$ref": REF_TEMPLATE.format(model=model.__name__)}


def model_schema(model: BodyModel) -> dict[str, Any]:
    """A model's JSON Schema with the types it refers to (enums) under components, where its $refs point."""
    return model.model_json_schema(ref_template=REF_TEMPLATE)


def answer_schemas() -> dict[str, Any]:
    """Every answer's JSON Schema, and those of the models and enums they hold, named by their classes."""
    _, found = models_json_schema([(model, "serialization") for model in ANSWERS], ref_template=REF_TEMPLATE)
    return dict(found.get("$defs", {}))


def response(description: str, model: type[Answer]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": ref(model)}}}


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
    return {str(status): response(MEANING[status], ErrorAnswer) for status in sorted({401, 421, 503, *statuses})}


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
                    "200": response("Redis answers", HealthAnswer),
                    "421": response(MEANING[421], ErrorAnswer),
                    "503": response("Redis is down", HealthAnswer),
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "The queue's Prometheus metrics (text format; token needed when API_TOKEN is set)",
                "responses": {
                    "200": {"description": "metrics in Prometheus' text format", "content": {"text/plain": {}}},
                    "401": response(MEANING[401], ErrorAnswer),
                    "421": response(MEANING[421], ErrorAnswer),
                    "503": response("Redis is unreachable", ErrorAnswer),
                },
            }
        },
        "/api/openapi.json": {
            "get": {
                "summary": "This document (no token needed)",
                "security": [],
                "responses": {
                    "200": {"description": "the OpenAPI document", "content": {"application/json": {}}},
                    "421": response(MEANING[421], ErrorAnswer),
                },
            }
        },
        "/api/queue": {"get": operation("Queue summary", response("the summary", QueueSummaryAnswer), errors())},
        "/api/accounts": {
            "get": operation(
                "The accounts of every provider and their states",
                response("every jimeng account, in JIMENG_API_KEY's order, then Ark's", AccountsAnswer),
                errors(),
            )
        },
        "/api/queue/pause": {
            "post": operation(
                "Pause the queue for every worker (jobs in flight finish)",
                response("the pause in force (an existing pause keeps its reason)", PausedAnswer),
                errors(*WRITE_ERRORS),
                requestBody=json_body(PauseQueue),
            )
        },
        "/api/queue/resume": {
            "post": operation(
                "Lift the pause and reset the failure streak",
                response("whether a pause was lifted", ResumedAnswer),
                errors(*WRITE_ERRORS),
                requestBody=json_body(NoOptions),
            )
        },
        "/api/tasks": {
            "get": operation(
                "Tasks in one state, a page at a time (record states searchable by id or prompt text)",
                response("one page", TaskPageAnswer),
                errors(400),
                parameters=query_parameters(TaskQuery),
            ),
            "post": operation(
                "Queue prompts by id, as `imagegen add`",
                response("one outcome per id and the counts", EnqueueResultsAnswer),
                errors(*WRITE_ERRORS),
                requestBody=json_body(CreateTasks),
            ),
        },
        "/api/activity": {
            "get": operation(
                "The records changed last, in every state, newest first (the dashboard's first view)",
                response("the latest records", ActivityAnswer),
                errors(400),
                parameters=query_parameters(ActivityQuery),
            )
        },
        "/api/tasks/enqueue-pending": {
            "post": operation(
                "Queue every pending record, as `imagegen add-pending`",
                response("how many records had each outcome", EnqueueCountsAnswer),
                errors(*WRITE_ERRORS),
                requestBody=json_body(NoOptions),
            )
        },
        "/api/tasks/retry-failed": {
            "post": operation(
                "Queue every failed record again, as `imagegen retry-failed`",
                response("how many records had each outcome", EnqueueCountsAnswer),
                errors(*WRITE_ERRORS),
                requestBody=json_body(NoOptions),
            )
        },
        "/api/tasks/{id}": {
            "get": operation(
                "One task: job state, tries, timings, error, the record and its image URLs",
                response("the task", TaskAnswer),
                {
                    **errors(400, 404),
                    "503": {
                        "description": "Redis is unreachable, or the record could not be read (then with the task "
                        "as far as Redis knows it)",
                        "content": {
                            "application/json": {"schema": {"anyOf": [ref(TaskUnreadableAnswer), ref(ErrorAnswer)]}}
                        },
                    },
                },
                parameters=task_id,
            )
        },
        "/api/tasks/{id}/retry": {
            "post": operation(
                "Queue one record again with all its attempts (a done record stays done)",
                response("the outcome", EnqueueResultAnswer),
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
            "schemas": {**answer_schemas(), **defined_types()},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }
