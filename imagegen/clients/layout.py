"""Which fields of the prompts collection imagegen uses, and the one rule of what a pending record is.

The settings name the fields (`POCKETBASE_FIELD_*`); a name set empty means the collection has no such field.
Once the collection's schema is read (see `schema`), a configured field the collection lacks is dropped too,
so a collection of the old system (`prompt` and `imageUrl` only) works as it is: with no `status` field, a
record's state lives in Redis only (see `marks`).

`pending()` is the only definition of a pending record: the PocketBase filter and the test in memory come from
the same tuple of statuses, and every reader (add-pending, the watch and its sweep, status, listing, metrics)
asks it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

from imagegen.models import PromptRecord, RecordStatus
from imagegen.settings import Settings

# Every value imagegen writes into the status field; a select must offer each of them.
WRITTEN_STATUSES = (RecordStatus.QUEUED, RecordStatus.PROCESSING, RecordStatus.DONE, RecordStatus.FAILED)
# The longest error text imagegen writes into the error field (longer ones are cut to it).
ERROR_MAX_CHARS = 4000
# Fields every collection must have: what imagegen reads the prompt from and writes the image into.
REQUIRED_FIELDS = ("prompt", "image_url")


def filter_literal(value: str) -> str:
    """A PocketBase filter string literal: backslash, then double quote, escaped."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass(frozen=True)
class RecordRule:
    """A set of records, said twice from one definition: as a PocketBase filter and as a test in memory."""

    filter: str
    matches: Callable[[PromptRecord], bool]


def setting_of(role: str) -> str:
    """The variable naming a role's field: POCKETBASE_FIELD_<ROLE>."""
    return f"POCKETBASE_FIELD_{role.upper()}"


@dataclass(frozen=True)
class FieldLayout:
    """The field names in use; an empty name means the collection has no such field."""

    prompt: str
    negative_prompt: str
    image_url: str
    status: str
    error: str
    images: str
    model: str
    ratio: str
    resolution: str
    priority: str
    # Status values that mean "pending" besides an empty one (POCKETBASE_PENDING_VALUES).
    pending_values: tuple[str, ...] = ("pending",)
    # A status select without `queued`: imagegen leaves the status alone where it would write `queued` (the
    # queue in Redis says a record is queued; the select still takes processing, done and failed).
    marks_queued: bool = True

    @classmethod
    def from_settings(cls, settings: Settings) -> FieldLayout:
        """Each role's field as POCKETBASE_FIELD_<ROLE> names it."""
        names = {role: getattr(settings, f"pocketbase_field_{role}") for role in ROLES}
        return cls(**names, pending_values=settings.pending_values())

    def named(self) -> dict[str, str]:
        """Each role (`status`, `image_url`, ...) with the field name configured for it, empty ones included."""
        return {role: getattr(self, role) for role in ROLES}

    def without(self, missing: set[str], *, marks_queued: bool = True) -> FieldLayout:
        """This layout with the fields named in `missing` dropped (the ones every collection needs stay)."""
        kept = {
            role: "" if name in missing and role not in REQUIRED_FIELDS else name for role, name in self.named().items()
        }
        return FieldLayout(**kept, pending_values=self.pending_values, marks_queued=marks_queued)

    def writes(self, status: RecordStatus) -> bool:
        """Whether imagegen writes this status into the status field."""
        return bool(self.status) and (status is not RecordStatus.QUEUED or self.marks_queued)

    @property
    def states_in_redis(self) -> bool:
        """No status field: `queued`, `processing` and `failed` are kept in Redis (see `marks`)."""
        return not self.status

    def read_status(self, raw: object) -> str:
        """A status as imagegen reasons about it: empty for pending, whichever value of the collection said so."""
        value = str(raw or "")
        return RecordStatus.PENDING.value if value in self.pending_values else value

    def pending(self) -> RecordRule:
        """Pending: no image URL, and a status that is empty or one of POCKETBASE_PENDING_VALUES (never `failed`
        or `done`). With no status field, no image URL and no `failed` or other state kept in Redis (the records
        read from the collection carry that state in `status`, see `marks`)."""
        waiting = (RecordStatus.PENDING.value, *self.pending_values)
        clauses = [f'{self.image_url} = ""']
        if self.status:
            clauses.append("(" + " || ".join(f"{self.status} = {filter_literal(v)}" for v in waiting) + ")")
        return RecordRule(" && ".join(clauses), lambda record: not record.image_url and record.status in waiting)

    def in_status(self, status: RecordStatus) -> RecordRule:
        """Records in one of imagegen's statuses; pending is `pending()`. Needs a status field, except for
        `done` (an image URL) and pending."""
        if status is RecordStatus.PENDING:
            return self.pending()
        if status is RecordStatus.DONE and not self.status:
            return RecordRule(f'{self.image_url} != ""', lambda record: bool(record.image_url))
        if not self.status:
            raise ValueError(f"no status field: records {status.value} are known from Redis only")
        return RecordRule(f"{self.status} = {filter_literal(status.value)}", lambda record: record.status == status)


# The roles of the fields, each read from its POCKETBASE_FIELD_<ROLE> setting: the layout's str fields (their
# annotations are strings here, `from __future__ import annotations`).
ROLES = tuple(f.name for f in fields(FieldLayout) if f.type == "str")
