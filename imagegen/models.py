"""The records that cross module boundaries: statuses, prompts, generated images, job outcomes."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from imagegen.errors import InvalidPromptId, PromptFailed

PROMPT_ID_PATTERN = "^[a-z0-9]{15}$"
_PROMPT_ID = re.compile(PROMPT_ID_PATTERN)


class RecordStatus(StrEnum):
    """The `status` field of a prompt record; an empty value means pending."""

    PENDING = ""
    QUEUED = "queued"
    PROCESSING = "processing"
    DONE = "done"
    FAILED = "failed"


class JobState(StrEnum):
    """Where a job stands in the queue, as `imagegen inspect` reports it."""

    QUEUED = "queued"
    DEFERRED = "deferred"
    IN_PROGRESS = "in progress"
    DONE = "done"
    FAILED = "failed"
    UNKNOWN = "unknown"


class ImageType(StrEnum):
    PNG = "image/png"
    JPEG = "image/jpeg"
    WEBP = "image/webp"

    @property
    def extension(self) -> str:
        return {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}[self.value]


def iso_time(epoch: float) -> str:
    """A Unix time as ISO 8601 in UTC, to the second."""
    return datetime.fromtimestamp(epoch, tz=UTC).isoformat(timespec="seconds")


def validate_prompt_id(prompt_id: str) -> str:
    """Return the id when it is a PocketBase record id (15 chars of [a-z0-9]), else raise InvalidPromptId."""
    if not _PROMPT_ID.fullmatch(prompt_id):
        shown = prompt_id if len(prompt_id) <= 40 else prompt_id[:40] + "…"
        raise InvalidPromptId(f"invalid prompt id {shown!r}: a PocketBase id is 15 characters of a-z and 0-9")
    return prompt_id


@dataclass(frozen=True)
class PromptRecord:
    id: str
    prompt: str
    negative_prompt: str = ""
    image_url: str = ""
    images: list[str] = field(default_factory=list)
    status: str = ""
    error: str = ""
    # The record's own model, ratio and resolution as written (unchecked); empty means the JIMENG_* setting.
    model: str = ""
    ratio: str = ""
    resolution: str = ""
    # The record's priority (checked; higher runs first); a value that is no priority reads as 0 and
    # `priority_problem` says why, for the warning of whoever queues the record.
    priority: int = 0
    priority_problem: str = ""
    updated: str = ""  # when PocketBase last changed it (ISO 8601), if the collection has an `updated` field

    def choices_given(self) -> dict[str, str]:
        """The record's model, ratio and resolution, keyed as `Choices` names them."""
        return {"model": self.model, "ratio": self.ratio, "resolution": self.resolution}

    @property
    def shown_status(self) -> str:
        """The status as the front ends show it: `pending` for none, `done` for an image URL with no status."""
        return RecordStatus.DONE.value if self.is_done else (self.status or "pending")

    @property
    def is_done(self) -> bool:
        """Done: marked so, or holding an image URL with no status at all (records made by the old system).

        A record `queued`, `processing` or `failed` is not done even with an older image URL: a re-run of it
        is under way or failed."""
        if self.status == RecordStatus.DONE:
            return True
        return bool(self.image_url) and self.status == RecordStatus.PENDING


@dataclass(frozen=True)
class StoredImage:
    """One generated image now hosted in the bucket."""

    source_url: str
    key: str
    public_url: str
    content_type: str
    size: int


# The arq function that runs one prompt; its job id is the prompt id, so a prompt is queued at most once.
JOB_NAME = "generate_images"


class OutcomeStatus(StrEnum):
    DONE = "done"
    FAILED = "failed"
    SUPERSEDED = "superseded"  # another run of the same prompt held its lease; that run decides


@dataclass(frozen=True)
class JobOutcome:
    """What a finished job reports; stored by arq as a plain dict, read back by `imagegen inspect`."""

    status: OutcomeStatus
    attempt: int
    kind: str = ""
    error: str = ""
    images: list[str] = field(default_factory=list)
    generated: bool = False
    skipped: bool = False
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["status"] = self.status.value
        return data

    @classmethod
    def from_result(cls, value: object) -> JobOutcome | None:
        """The outcome in an arq job result (a dict, or PromptFailed carrying one); None for anything else."""
        if isinstance(value, PromptFailed):
            value = value.outcome
        if not isinstance(value, dict) or value.get("status") not in {s.value for s in OutcomeStatus}:
            return None
        known = {f: value[f] for f in cls.__dataclass_fields__ if f in value}
        known["status"] = OutcomeStatus(value["status"])
        known.setdefault("attempt", 0)
        return cls(**known)
