"""The records that cross module boundaries: statuses, prompts, generated images, job outcomes."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum

from .errors import InvalidPromptId

_PROMPT_ID = re.compile(r"^[a-z0-9]{15}$")


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


def validate_prompt_id(prompt_id: str) -> str:
    """Return the id when it is a PocketBase record id (15 chars of [a-z0-9]), else raise InvalidPromptId."""
    if not _PROMPT_ID.match(prompt_id):
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

    @property
    def is_done(self) -> bool:
        return bool(self.image_url) or self.status == RecordStatus.DONE


@dataclass(frozen=True)
class StoredImage:
    """One generated image now hosted in the bucket."""

    source_url: str
    key: str
    public_url: str
    content_type: str
    size: int
