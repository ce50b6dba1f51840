"""What the API accepts: request bodies and list queries, validated at the edge into typed records."""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from imagegen.errors import InvalidRequest
from imagegen.ops.listing import MAX_PER_PAGE, MAX_RECENT, TaskState
from imagegen.queue.priority import PRIORITY_MAX, PRIORITY_MIN

MAX_IDS = 500
DEFAULT_PAUSE_REASON = "paused from the web API"
M = TypeVar("M", bound=BaseModel)


def _whole_number(value: Any) -> Any:
    """1000.0 is the integer 1000 by JSON Schema (and many JSON writers send it so); 1000.5 stays refused."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


WholeNumber = Annotated[int, BeforeValidator(_whole_number)]


class CreateTasks(BaseModel):
    """POST /api/tasks: queue these prompt ids; `force` runs done or failed records again; `priority`
    overrides each record's own."""

    model_config = ConfigDict(extra="forbid", strict=True)

    ids: list[str] = Field(min_length=1, max_length=MAX_IDS)
    force: bool = False
    priority: WholeNumber | None = Field(
        default=None,
        ge=PRIORITY_MIN,
        le=PRIORITY_MAX,
        description="Higher runs first; default: each record's priority field, else 0. "
        "A prompt already queued keeps its priority.",
    )


class PauseQueue(BaseModel):
    """POST /api/queue/pause: an optional reason, shown with the pause."""

    model_config = ConfigDict(extra="forbid", strict=True)

    reason: str | None = Field(default=None, max_length=1000)


class NoOptions(BaseModel):
    """The body of a write that takes no options (resume, enqueue-pending, retry-failed, retry): `{}`.

    Writes are JSON so that no other site's page can send them (see `security`); this one has nothing to say."""

    model_config = ConfigDict(extra="forbid", strict=True)


class TaskQuery(BaseModel):
    """GET /api/tasks: which state, which page, what to search for."""

    model_config = ConfigDict(extra="forbid")

    state: TaskState = TaskState.QUEUED
    page: int = Field(default=1, ge=1, le=100_000)
    per_page: int = Field(default=20, ge=1, le=MAX_PER_PAGE)
    q: str = Field(
        default="",
        max_length=200,
        pattern=r"^[^\x00-\x1f\x7f]*$",
        description="text the id or prompt contains (literally: % and _ are no wildcards); no control characters",
    )


class ActivityQuery(BaseModel):
    """GET /api/activity: how many of the records changed last."""

    model_config = ConfigDict(extra="forbid")

    limit: int = Field(default=20, ge=1, le=MAX_RECENT)


def describe(exc: ValidationError) -> str:
    """One line naming each bad field and what is wrong with it."""
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]) or "body"
        problems.append(f"{where}: {error['msg']}")
    return "; ".join(problems)


def parse(model: type[M], data: Any) -> M:
    """Validate `data` into `model`; InvalidRequest (400) with one readable line otherwise."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise InvalidRequest(describe(exc)) from None
