"""The PocketBase collection holding the prompts: the source of truth for what to generate and where it is.

One superuser login per process, reused; an expired token (PocketBase answers 403 on records, 401 on
collections) triggers one fresh login and one retry. Realtime subscriptions are the exception: PocketBase
accepts them with an expired token and then silently sends nothing, so `subscribe` renews the token first.
Record ids are validated before any call and records are addressed by path, never spliced raw into a filter.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import aiohttp

from imagegen.errors import FailureKind, PocketBaseError, RecordNotFound, excerpt
from imagegen.models import PromptRecord, RecordStatus, validate_prompt_id
from imagegen.queue.marks import RecordMarks
from imagegen.queue.priority import check_priority
from imagegen.settings import Settings

from .layout import ERROR_MAX_CHARS, FieldLayout, RecordRule, filter_literal
from .schema import CollectionSchema, SchemaReport, check_schema

PAGE_SIZE = 500
# The most records PocketBase serves in one page (its search.MaxPerPage); it clamps larger requests to it.
MAX_PAGE = 1000
# Newest first by the autodate fields a collection may have; "" is PocketBase's own order, which always works.
RECENT_ORDERS = ("-updated", "-created", "")


def like_escaped(value: str) -> str:
    """`value` for PocketBase's `~` (SQL LIKE with backslash as escape): its wildcards match only themselves."""
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _ignore_outcome(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()


@dataclass(frozen=True)
class RecordPage:
    """One page of records matching a filter, with how many match in all."""

    items: list[PromptRecord]
    page: int
    per_page: int
    total: int


class PocketBaseClient:
    """Reads and patches prompt records over one shared aiohttp session."""

    def __init__(self, session: aiohttp.ClientSession, settings: Settings, marks: RecordMarks | None = None) -> None:
        self._session = session
        self._settings = settings
        self.marks = marks
        self._base = settings.pocketbase_url
        self._email = settings.pocketbase_email
        self._password = settings.pocketbase_password
        self.collection = settings.pocketbase_collection
        self._records = f"{self._base}/api/collections/{self.collection}/records"
        self._token: str | None = None
        self._login_lock = asyncio.Lock()
        self._timeout = aiohttp.ClientTimeout(total=30)
        # The fields as configured until the collection's schema is read, then those it has (see `fields`).
        self.layout = FieldLayout.from_settings(settings)
        self._schema_report: SchemaReport | None = None
        self._schema_lock = asyncio.Lock()

    async def login(self) -> None:
        """Log in as the configured superuser; a refusal is an account-level failure."""
        url = f"{self._base}/api/collections/_superusers/auth-with-password"
        body = {"identity": self._email, "password": self._password.get_secret_value()}
        try:
            async with self._session.post(url, json=body, timeout=self._timeout) as response:
                text = await response.text()
                if response.status >= 500 or response.status == 429:
                    raise PocketBaseError(
                        f"login failed: PocketBase answered HTTP {response.status}", kind=FailureKind.TRANSIENT
                    )
                if response.status != 200:
                    raise PocketBaseError(
                        f"login as {self._email or '(no POCKETBASE_EMAIL)'} failed (HTTP {response.status}); "
                        "check POCKETBASE_EMAIL and POCKETBASE_PASSWORD",
                        kind=FailureKind.ACCOUNT,
                        status=response.status,
                    )
                self._token = str(json.loads(text)["token"])
        except aiohttp.ClientError as exc:
            raise self._unreachable(exc) from None
        except TimeoutError:
            raise PocketBaseError(f"no answer from {self._base}", kind=FailureKind.TRANSIENT) from None

    def _unreachable(self, exc: Exception) -> PocketBaseError:
        return PocketBaseError(
            f"cannot reach {self._base} ({type(exc).__name__}); is PocketBase running and POCKETBASE_URL right?",
            kind=FailureKind.TRANSIENT,
        )

    async def _ensure_token(self, stale: str | None = None) -> str:
        async with self._login_lock:
            if self._token is None or self._token == stale:
                await self.login()
            assert self._token is not None
            return self._token

    async def authorization(self) -> str:
        """The superuser token to send as `Authorization` (logged in first if need be)."""
        return await self._ensure_token()

    async def _request(
        self, method: str, url: str, *, params: Mapping[str, str] | None = None, body: Any = None
    ) -> tuple[int, Any]:
        token = await self._ensure_token()
        for attempt in (1, 2):
            try:
                async with self._session.request(
                    method,
                    url,
                    params=params,
                    json=body,
                    headers={"Authorization": token},
                    timeout=self._timeout,
                ) as response:
                    text = await response.text()
                    status = response.status
            except aiohttp.ClientError as exc:
                raise self._unreachable(exc) from None
            except TimeoutError:
                raise PocketBaseError(f"{method} {url} got no answer in time", kind=FailureKind.TRANSIENT) from None
            if status in (401, 403) and attempt == 1:
                token = await self._ensure_token(stale=token)
                continue
            try:
                payload = json.loads(text) if text else None
            except ValueError:
                payload = None
            return status, payload
        raise PocketBaseError(
            f"{method} {url} refused after a fresh login (HTTP {status}); does POCKETBASE_EMAIL name a superuser?",
            kind=FailureKind.ACCOUNT,
            status=status,
        )

    def _fail(self, action: str, status: int, payload: Any) -> PocketBaseError:
        message = payload.get("message", "") if isinstance(payload, dict) else ""
        fields = payload.get("data", {}) if isinstance(payload, dict) else {}
        detail = excerpt(f"{message} {json.dumps(fields, ensure_ascii=False) if fields else ''}", 240)
        kind = FailureKind.TRANSIENT if status >= 500 or status == 429 else FailureKind.PERMANENT
        if status == 404 and action.startswith(("listing", "reading the schema")):
            kind = FailureKind.ACCOUNT
            detail = (
                f"collection {self.collection!r} not found; check POCKETBASE_COLLECTION, or create it with "
                "`imagegen setup-collection`"
            )
        return PocketBaseError(f"{action} failed (HTTP {status}): {detail}", kind=kind, status=status, detail=detail)

    # The collection's schema

    async def read_schema(self) -> CollectionSchema | None:
        """The collection as PocketBase describes it (superusers only); None when there is no such collection."""
        status, payload = await self._request("GET", f"{self._base}/api/collections/{self.collection}")
        if status == 404:
            return None
        if status != 200 or not isinstance(payload, dict):
            raise self._fail(f"reading the schema of {self.collection}", status, payload)
        return CollectionSchema.parse(payload)

    async def save_schema(self, body: Mapping[str, Any], *, create: bool) -> None:
        """Create the collection, or update its fields (`collection_setup` builds the body)."""
        if create:
            status, payload = await self._request("POST", f"{self._base}/api/collections", body=dict(body))
        else:
            url = f"{self._base}/api/collections/{self.collection}"
            status, payload = await self._request("PATCH", url, body=dict(body))
        if status != 200:
            raise self._fail(f"{'creating' if create else 'updating'} collection {self.collection}", status, payload)
        self._schema_report = None  # read again on next use

    async def schema_report(self) -> SchemaReport:
        """The checks of the collection's schema, which also settle `layout`: read once per client, or again on
        each use while it has problems that refuse writes (so a fixed collection is taken without a restart)."""
        async with self._schema_lock:
            if self._schema_report is None or self._schema_report.blocking:
                schema = await self.read_schema()
                if schema is None:
                    raise self._fail(f"reading the schema of {self.collection}", 404, None)
                self._schema_report = check_schema(schema, FieldLayout.from_settings(self._settings), self._settings)
                self.layout = self._schema_report.layout
            return self._schema_report

    async def fields(self) -> FieldLayout:
        """The fields in use on this collection: the configured ones it has."""
        return (await self.schema_report()).layout

    async def _writable(self) -> FieldLayout:
        """The layout, unless a write would fail on the schema: then one ACCOUNT error (the queue pauses)."""
        report = await self.schema_report()
        if report.blocking:
            more = f" (and {len(report.blocking) - 1} more: `imagegen check`)" if len(report.blocking) > 1 else ""
            raise PocketBaseError(
                f"collection {self.collection} can't take imagegen's writes: {report.blocking[0].line()}{more}",
                kind=FailureKind.ACCOUNT,
            )
        return report.layout

    # Records

    def record_from(self, item: Mapping[str, Any]) -> PromptRecord:
        """A record as PocketBase sends it (a list item, or the `record` of a realtime event); a state kept in
        Redis (no status field) is not on it: `with_states` adds it."""
        return self._record(item)

    def _priority(self, item: Mapping[str, Any]) -> tuple[int, str]:
        """The record's priority and, for a value that is none (read as 0), why."""
        name = self.layout.priority
        raw = item.get(name) if name else None
        try:
            return check_priority(raw), ""
        except ValueError as exc:
            return 0, f"record {item['id']} has {name}={raw!r}, which {exc}; queued at priority 0"

    def _record(self, item: Mapping[str, Any]) -> PromptRecord:
        layout = self.layout

        def text(name: str) -> str:
            return str(item.get(name) or "") if name else ""

        images = item.get(layout.images) if layout.images else None
        priority, priority_problem = self._priority(item)
        return PromptRecord(
            id=str(item["id"]),
            prompt=text(layout.prompt),
            negative_prompt=text(layout.negative_prompt),
            image_url=text(layout.image_url),
            images=[str(u) for u in images] if isinstance(images, list) else [],
            status=layout.read_status(item.get(layout.status)) if layout.status else "",
            error=text(layout.error),
            model=text(layout.model),
            ratio=text(layout.ratio),
            resolution=text(layout.resolution),
            priority=priority,
            priority_problem=priority_problem,
            updated=str(item.get("updated") or "").replace(" ", "T", 1),
        )

    async def with_states(self, records: list[PromptRecord]) -> list[PromptRecord]:
        """The records with the states kept in Redis (a collection with no status or no error field; else as
        they are)."""
        layout = self.layout
        if (layout.status and layout.error) or self.marks is None or not records:
            return records
        marked = await self.marks.read([r.id for r in records])
        return [
            replace(r, status=r.status if layout.status else marked[r.id][0], error=r.error or marked[r.id][1])
            if r.id in marked
            else r
            for r in records
        ]

    async def get_record(self, prompt_id: str) -> PromptRecord:
        """The record with this id; RecordNotFound when there is none."""
        validate_prompt_id(prompt_id)
        await self.fields()
        status, payload = await self._request("GET", f"{self._records}/{prompt_id}")
        if status == 404:
            raise RecordNotFound(f"no record {prompt_id!r} in collection {self.collection!r}", status=404)
        if status != 200 or not isinstance(payload, dict):
            raise self._fail(f"reading record {prompt_id}", status, payload)
        [record] = await self.with_states([self._record(payload)])
        return record

    async def update_record(self, prompt_id: str, fields: Mapping[str, Any]) -> PromptRecord:
        """Patch some fields of a record; RecordNotFound when it has been deleted."""
        validate_prompt_id(prompt_id)
        await self._writable()
        status, payload = await self._request("PATCH", f"{self._records}/{prompt_id}", body=dict(fields))
        if status == 404:
            raise RecordNotFound(f"record {prompt_id!r} was deleted from {self.collection!r}", status=404)
        if status != 200 or not isinstance(payload, dict):
            raise self._fail(f"updating record {prompt_id}", status, payload)
        [record] = await self.with_states([self._record(payload)])
        return record

    async def create_record(self, prompt: str, negative_prompt: str = "", **extra: Any) -> PromptRecord:
        """Add a pending prompt record (used to seed the local stack); `extra`: other fields, by name."""
        layout = await self.fields()
        body = {layout.prompt: prompt, **extra}
        if layout.negative_prompt:
            body[layout.negative_prompt] = negative_prompt
        status, payload = await self._request("POST", self._records, body=body)
        if status != 200 or not isinstance(payload, dict):
            raise self._fail(f"creating a record in {self.collection}", status, payload)
        return self._record(payload)

    async def delete_record(self, prompt_id: str) -> None:
        """Remove a record (the local stack's clean-up; a record already gone is fine)."""
        validate_prompt_id(prompt_id)
        status, payload = await self._request("DELETE", f"{self._records}/{prompt_id}")
        if status not in (204, 404):
            raise self._fail(f"deleting record {prompt_id}", status, payload)

    async def _write_state(
        self, prompt_id: str, status: RecordStatus, error: str, fields: dict[str, Any]
    ) -> PromptRecord:
        """Write a record's status and error where they live (its fields, or Redis), with other `fields`."""
        layout = await self._writable()
        error = error[:ERROR_MAX_CHARS]
        if layout.writes(status):
            fields[layout.status] = status.value
        if layout.error:
            fields[layout.error] = error
        marks = self.marks if layout.states_in_redis else None
        if self.marks is not None and layout.status and not layout.error:
            await self.marks.set_error(prompt_id, error)
        # A failure is remembered before its write, a success forgotten after its image URL is written: a record
        # never reads pending while it failed, nor while its images are being recorded.
        if marks is not None and status is not RecordStatus.DONE:
            await marks.set(prompt_id, status, error)
        # Nothing in the collection to write: the record must still exist.
        record = await (self.update_record(prompt_id, fields) if fields else self.get_record(prompt_id))
        if marks is not None and status is RecordStatus.DONE:
            await marks.set(prompt_id, status)
            record = replace(record, status=RecordStatus.DONE.value, error="")
        return record

    async def set_status(self, prompt_id: str, status: RecordStatus, error: str = "") -> PromptRecord:
        return await self._write_state(prompt_id, status, error, {})

    async def set_done(self, prompt_id: str, urls: list[str], note: str = "") -> PromptRecord:
        """Mark the record done with its image URLs; `note` (in the error field) says what the call refused."""
        layout = await self._writable()
        fields: dict[str, Any] = {layout.image_url: urls[0]}
        if layout.images:
            fields[layout.images] = urls
        return await self._write_state(prompt_id, RecordStatus.DONE, note, fields)

    async def set_failed(self, prompt_id: str, error: str) -> PromptRecord:
        """Mark the record failed with the reason; image URLs of an earlier run go, so no field says otherwise."""
        layout = await self._writable()
        fields: dict[str, Any] = {layout.image_url: ""}
        if layout.images:
            fields[layout.images] = []
        return await self._write_state(prompt_id, RecordStatus.FAILED, error, fields)

    def pending_filter(self) -> str:
        """Records still waiting for images (see `FieldLayout.pending`, the one definition)."""
        return self.layout.pending().filter

    def status_filter(self, status: RecordStatus) -> str:
        """Records in one status as the counts and lists show them (pending: `pending_filter`)."""
        return self.layout.in_status(status).filter

    async def _page(self, record_filter: str, after: str, page_size: int) -> tuple[list[PromptRecord], bool]:
        """One page of records after the id `after`, and whether more may follow."""
        clauses = f"({record_filter})" + (f" && id > {filter_literal(after)}" if after else "")
        # Whole records: PocketBase applies `fields` by decoding and encoding again the JSON it has already
        # built, which costs it more time than sending the rest costs us (a page took ~30 ms instead of ~20).
        params = {"filter": clauses, "sort": "id", "perPage": str(page_size), "skipTotal": "1"}
        status, payload = await self._request("GET", self._records, params=params)
        if status != 200 or not isinstance(payload, dict):
            raise self._fail(f"listing {self.collection}", status, payload)
        items = payload.get("items") or []
        # PocketBase caps perPage (at MAX_PAGE today): a page as long as the cap it applied may not be the last.
        served = int(payload.get("perPage") or page_size)
        records = await self.with_states([self._record(item) for item in items])
        return records, bool(items) and len(items) >= min(served, page_size)

    async def iter_pages(self, record_filter: str, *, page_size: int = MAX_PAGE) -> AsyncIterator[list[PromptRecord]]:
        """Every record matching the filter, a page at a time in id order, paged by key (`id > last`) so it
        scales: no page is found by counting past the ones before it.

        The next page is fetched while the caller works on this one, so at most two pages are held."""
        upcoming = asyncio.create_task(self._page(record_filter, "", page_size))
        try:
            while True:
                records, more = await upcoming
                if more:
                    upcoming = asyncio.create_task(self._page(record_filter, records[-1].id, page_size))
                if records:
                    yield records
                if not more:
                    return
        finally:
            if not upcoming.done():
                upcoming.cancel()
            # A page fetched for a caller that stopped early: its failure is nobody's to report.
            upcoming.add_done_callback(_ignore_outcome)

    async def iter_rule(self, rule: RecordRule, *, page_size: int = MAX_PAGE) -> AsyncIterator[list[PromptRecord]]:
        """The records of a rule, a page at a time: filtered by PocketBase, then by the same rule in memory
        (which also sees the states kept in Redis); a page left empty is skipped."""
        async for page in self.iter_pages(rule.filter, page_size=page_size):
            kept = [record for record in page if rule.matches(record)]
            if kept:
                yield kept

    def search_filter(self, text: str) -> str:
        """Records whose id or prompt contains `text`, taken literally (`%` and `_` are no wildcards)."""
        literal = filter_literal(like_escaped(text))
        return f"(id ~ {literal} || {self.layout.prompt} ~ {literal})"

    async def list_page(self, record_filter: str, *, page: int, per_page: int, search: str = "") -> RecordPage:
        """One page (from 1) of the records matching the filter, in id order; `search`: id or prompt contains it."""
        await self.fields()
        clauses = f"({record_filter})" + (f" && {self.search_filter(search)}" if search else "")
        params = {"filter": clauses, "sort": "id", "page": str(page), "perPage": str(per_page)}
        status, payload = await self._request("GET", self._records, params=params)
        if status != 200 or not isinstance(payload, dict):
            raise self._fail(f"listing {self.collection}", status, payload)
        items = await self.with_states([self._record(item) for item in payload.get("items") or []])
        return RecordPage(items, page, per_page, int(payload.get("totalItems", 0)))

    async def recent(self, count: int) -> list[PromptRecord]:
        """The `count` records changed last, newest first: by `updated`, or `created` in a collection without
        it, or as PocketBase lists them in one with neither (it refuses to sort by a field it lacks: HTTP 400)."""
        for order in RECENT_ORDERS:
            params = {"perPage": str(count), "skipTotal": "1", **({"sort": order} if order else {})}
            status, payload = await self._request("GET", self._records, params=params)
            if status == 400 and order:
                continue
            if status != 200 or not isinstance(payload, dict):
                raise self._fail(f"listing {self.collection}", status, payload)
            return [self._record(item) for item in payload.get("items") or []]
        raise AssertionError("the last order is PocketBase's own, which needs no field")

    async def iter_records(self, record_filter: str, page_size: int = PAGE_SIZE) -> AsyncIterator[PromptRecord]:
        """Every record matching the filter, in id order (see `iter_pages`)."""
        async for page in self.iter_pages(record_filter, page_size=page_size):
            for record in page:
                yield record

    async def count(self, record_filter: str) -> int:
        status, payload = await self._request(
            "GET", self._records, params={"filter": record_filter, "perPage": "1", "fields": "id"}
        )
        if status != 200 or not isinstance(payload, dict):
            raise self._fail(f"listing {self.collection}", status, payload)
        return int(payload.get("totalItems", 0))

    async def refresh_token(self) -> None:
        """Renew the superuser token (an expired one can't be renewed: log in again, once)."""
        status, payload = await self._request("POST", f"{self._base}/api/collections/_superusers/auth-refresh")
        if status != 200 or not isinstance(payload, dict) or not payload.get("token"):
            raise self._fail("renewing the PocketBase login", status, payload)
        self._token = str(payload["token"])

    async def subscribe(self, client_id: str, topics: list[str]) -> None:
        """Submit the subscriptions of one realtime connection (its `clientId` from PB_CONNECT).

        The token is renewed first: PocketBase takes a subscription sent with an expired token (204) and then
        delivers none of the events the token no longer allows."""
        await self.refresh_token()
        body = {"clientId": client_id, "subscriptions": topics}
        status, payload = await self._request("POST", f"{self._base}/api/realtime", body=body)
        if status != 204:
            raise self._fail(f"subscribing to {', '.join(topics)}", status, payload)

    async def check(self) -> None:
        """Raise PocketBaseError unless login works and the collection can be listed."""
        await self.login()
        status, payload = await self._request("GET", self._records, params={"perPage": "1", "skipTotal": "1"})
        if status != 200:
            raise self._fail(f"listing {self.collection}", status, payload)
