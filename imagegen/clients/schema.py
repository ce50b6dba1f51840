"""The prompts collection's schema, as PocketBase describes it, checked against what imagegen reads and writes.

A write PocketBase refuses after a paid call loses what was paid for, so every field imagegen writes is checked
before the worker starts: it exists with a type and settings that take what imagegen writes (a select offers
every status, a text is long enough for the errors and URLs, a url field accepts the bucket's domain). A field
imagegen only reads may be missing: a record then simply has none. A missing `status`, `error` or `images`
field is no problem either: the record's state is kept in Redis (see `marks`); `imagegen check` says what
adding it gains, and `imagegen setup-collection` adds it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field

from imagegen.models import RecordStatus
from imagegen.settings import Settings

from .layout import ERROR_MAX_CHARS, WRITTEN_STATUSES, FieldLayout, setting_of

# PocketBase caps a text field whose max is 0 (not set) at this many characters.
DEFAULT_TEXT_MAX = 5000
TEXT_TYPES = ("text", "editor")
# The longest image name imagegen appends to a prompt's key prefix: `<15-char id>/<n>.webp`.
_IMAGE_NAME = "x" * 15 + "/9.webp"


class SchemaField(BaseModel):
    """One field of a collection, as `GET /api/collections/{name}` lists it (only what the checks read)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str
    type: str
    id: str = ""
    required: bool = False
    system: bool = False
    max: float | None = None  # text: most characters (0: DEFAULT_TEXT_MAX)
    values: list[str] = Field(default_factory=list)  # select
    max_select: int = Field(0, alias="maxSelect")
    max_size: int = Field(0, alias="maxSize")  # json: bytes (0: PocketBase's default)
    only_domains: list[str] = Field(default_factory=list, alias="onlyDomains")  # url
    except_domains: list[str] = Field(default_factory=list, alias="exceptDomains")


class CollectionSchema(BaseModel):
    """A collection as PocketBase describes it; `raw` keeps every field as sent, for updates that keep them."""

    model_config = ConfigDict(extra="ignore")

    id: str
    name: str
    type: str = "base"
    fields: list[SchemaField] = Field(default_factory=list)
    raw_fields: list[dict[str, Any]] = Field(default_factory=list, exclude=True)

    @classmethod
    def parse(cls, payload: dict[str, Any]) -> CollectionSchema:
        schema = cls.model_validate(payload)
        schema.raw_fields = [dict(f) for f in payload.get("fields") or [] if isinstance(f, dict)]
        return schema

    def field(self, name: str) -> SchemaField | None:
        return next((f for f in self.fields if f.name == name), None)


@dataclass(frozen=True)
class SchemaProblem:
    """One thing about the collection that stops imagegen, or (not `blocking`) that it works around."""

    field: str
    problem: str
    fix: str
    blocking: bool = True

    def line(self) -> str:
        return f"{self.field}: {self.problem} - {self.fix}"


@dataclass
class SchemaReport:
    """What the checks found, and the layout imagegen uses on this collection (missing optional fields dropped)."""

    layout: FieldLayout
    problems: list[SchemaProblem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def blocking(self) -> list[SchemaProblem]:
        """Problems that would make a write fail after a paid call: the worker refuses to start on them."""
        return [p for p in self.problems if p.blocking]


# What the collection gains with each field it may lack (for `check`'s notes), and how imagegen does without.
GAINS = {
    "status": "records show queued, processing, done and failed in PocketBase and a Redis flush loses no state "
    "(without it these states are kept in Redis)",
    "error": "a failed record says why in PocketBase (without it the error is kept in Redis)",
    "images": "a record holds every image URL, not only the first",
    "negative_prompt": "records can say what the images should not show",
    "model": "records can ask for their own model (without it: JIMENG_MODEL)",
    "ratio": "records can ask for their own aspect ratio (without it: JIMENG_RATIO)",
    "resolution": "records can ask for their own resolution (without it: JIMENG_RESOLUTION)",
    "priority": "records can run before others (without it every record has priority 0)",
}
# Types a field imagegen only reads may have (a value of another type isn't a prompt, a choice or a number).
READ_TYPES = {
    "prompt": TEXT_TYPES,
    "negative_prompt": TEXT_TYPES,
    "model": (*TEXT_TYPES, "select"),
    "ratio": (*TEXT_TYPES, "select"),
    "resolution": (*TEXT_TYPES, "select"),
    "priority": ("number", *TEXT_TYPES),
}


def longest_image_url(settings: Settings) -> int:
    """Characters of the longest image URL imagegen writes (`<public base>/<prefix><id>/<n>.<ext>`)."""
    return len(f"{settings.tos_public_base_url}/{settings.tos_key_prefix}{_IMAGE_NAME}")


def text_max(found: SchemaField) -> int:
    return int(found.max) if found.max else DEFAULT_TEXT_MAX


class _Checker:
    def __init__(self, schema: CollectionSchema, layout: FieldLayout, settings: Settings) -> None:
        self.schema = schema
        self.layout = layout
        self.settings = settings
        self.report = SchemaReport(layout)
        self.missing: set[str] = set()
        self.marks_queued = True

    def problem(self, name: str, problem: str, fix: str, *, blocking: bool = True) -> None:
        self.report.problems.append(SchemaProblem(name, problem, fix, blocking))

    def run(self) -> SchemaReport:
        if self.schema.type == "view":
            self.problem(self.schema.name, "is a view collection, which can't be written", "use a base collection")
        for role, name in self.layout.named().items():
            if not name:
                if role in GAINS:
                    self.report.notes.append(
                        f"no {role} field ({setting_of(role)} is empty); name one there, and with it {GAINS[role]}"
                    )
                continue
            found = self.schema.field(name)
            if found is None:
                self._missing(role, name)
            elif role in READ_TYPES:
                self._read(role, found)
            else:
                getattr(self, f"_{role}")(found)
        self.report.layout = self.layout.without(self.missing, marks_queued=self.marks_queued)
        return self.report

    def _missing(self, role: str, name: str) -> None:
        self.missing.add(name)
        if role in ("prompt", "image_url"):
            self.problem(
                name,
                "no such field in the collection",
                f"add it (`imagegen setup-collection`) or set {setting_of(role)}",
            )
            return
        self.report.notes.append(
            f"no field {name!r}; add it (`imagegen setup-collection`) and {GAINS[role]}; "
            f"{setting_of(role)}= silences this"
        )

    def _wrong_type(self, found: SchemaField, allowed: tuple[str, ...], *, blocking: bool = True) -> bool:
        if found.type in allowed:
            return False
        kinds = " or ".join(allowed)
        self.problem(
            found.name,
            f"is a {found.type} field, imagegen needs {kinds}",
            f"change its type to {allowed[0]} in the PocketBase admin UI, or point the setting at another field",
            blocking=blocking,
        )
        return True

    def _read(self, role: str, found: SchemaField) -> None:
        # A read-only field of another type fails records, not writes: a problem, but the worker may start.
        self._wrong_type(found, READ_TYPES[role], blocking=False)

    def _not_required(self, found: SchemaField, why: str) -> None:
        if found.required:
            self.problem(found.name, f"is required, but imagegen {why}", "untick `Nonempty` on it in the admin UI")

    def _long_enough(self, found: SchemaField, needed: int, what: str) -> None:
        if found.type in TEXT_TYPES and text_max(found) < needed:
            self.problem(
                found.name,
                f"holds at most {text_max(found)} characters, shorter than {what} ({needed})",
                f"raise its max length to {needed} or more (0 means {DEFAULT_TEXT_MAX}) in the admin UI",
            )

    def _image_url(self, found: SchemaField) -> None:
        if self._wrong_type(found, (*TEXT_TYPES, "url")):
            return
        self._not_required(found, "clears it when a re-run of a record fails")
        self._long_enough(found, longest_image_url(self.settings), "the image URLs imagegen writes")
        if found.type == "url":
            host = urlsplit(self.settings.tos_public_base_url).hostname or ""
            if (found.only_domains and host not in found.only_domains) or host in found.except_domains:
                self.problem(
                    found.name,
                    f"does not accept URLs on {host or 'the bucket'} (TOS_PUBLIC_BASE_URL)",
                    f"allow {host} in its domains in the admin UI",
                )

    def _status(self, found: SchemaField) -> None:
        if self._wrong_type(found, (*TEXT_TYPES, "select")):
            return
        if found.type == "select":
            missing = [s.value for s in WRITTEN_STATUSES if s.value not in found.values]
            if missing == [RecordStatus.QUEUED.value]:
                self.marks_queued = False
                self.report.notes.append(
                    f"select {found.name} has no value queued: records `add` queues keep their status until a worker "
                    "takes them; adding it (`imagegen setup-collection`) shows them queued and lets the reconcile "
                    "sweep bring them back should Redis lose their jobs"
                )
            elif missing:
                self.problem(
                    found.name,
                    f"offers {', '.join(found.values) or 'no values'}, not {', '.join(missing)}, which imagegen writes",
                    f"add {', '.join(missing)} to its values (`imagegen setup-collection` does)",
                )
            if found.max_select > 1:
                self.problem(found.name, "takes several values", "set its max select to 1 in the admin UI")
        longest = max(len(s.value) for s in WRITTEN_STATUSES)
        self._long_enough(found, longest, "the statuses imagegen writes")

    def _error(self, found: SchemaField) -> None:
        if self._wrong_type(found, TEXT_TYPES):
            return
        self._not_required(found, "clears it when a record is done")
        self._long_enough(found, ERROR_MAX_CHARS, "imagegen's error messages")

    def _images(self, found: SchemaField) -> None:
        if self._wrong_type(found, ("json",)):
            return
        self._not_required(found, "empties it when a re-run of a record fails")


def check_schema(schema: CollectionSchema, layout: FieldLayout, settings: Settings) -> SchemaReport:
    """Every problem of the collection for imagegen, one each, and the layout imagegen uses on it."""
    return _Checker(schema, layout, settings).run()
