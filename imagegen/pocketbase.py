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
from dataclasses import dataclass
from typing import Any

import aiohttp

from .errors import FailureKind, PocketBaseError, RecordNotFound, excerpt
from .models import PromptRecord, RecordStatus, validate_prompt_id
from .priority import check_priority
from .settings import Settings

PAGE_SIZE = 500
# The most records PocketBase serves in one page (its search.MaxPerPage); it clamps larger requests to it.
MAX_PAGE = 1000
# Newest first by the autodate fields a collection may have; "" is PocketBase's own order, which always works.
RECENT_ORDERS = ("-updated", "-created", "")


def filter_literal(value: str) -> str:
    """A PocketBase filter string literal: backslash, then double quote, escaped."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


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

    def __init__(self, session: aiohttp.ClientSession, settings: Settings) -> None:
        self._session = session
        self._base = settings.pocketbase_url
        self._email = settings.pocketbase_email
        self._password = settings.pocketbase_password
        self.collection = settings.pocketbase_collection
        self._records = f"{self._base}/api/collections/{self.collection}/records"
        self._token: str | None = None
        self._login_lock = asyncio.Lock()
        self._timeout = aiohttp.ClientTimeout(total=30)
        self.f_prompt = settings.pocketbase_field_prompt
        self.f_negative = settings.pocketbase_field_negative_prompt
        self.f_image_url = settings.pocketbase_field_image_url
        self.f_status = settings.pocketbase_field_status
        self.f_error = settings.pocketbase_field_error
        self.f_images = settings.pocketbase_field_images
        self.f_model = settings.pocketbase_field_model
        self.f_ratio = settings.pocketbase_field_ratio
        self.f_resolution = settings.pocketbase_field_resolution
        self.f_priority = settings.pocketbase_field_priority

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
        if status == 404 and action.startswith("listing"):
            kind = FailureKind.ACCOUNT
            detail = f"collection {self.collection!r} not found; check POCKETBASE_COLLECTION"
        return PocketBaseError(f"{action} failed (HTTP {status}): {detail}", kind=kind, status=status, detail=detail)

    def record_from(self, item: Mapping[str, Any]) -> PromptRecord:
        """A record as PocketBase sends it (a list item, or the `record` of a realtime event)."""
        return self._record(item)

    def _priority(self, item: Mapping[str, Any]) -> tuple[int, str]:
        """The record's priority and, for a value that is none (read as 0), why."""
        raw = item.get(self.f_priority) if self.f_priority else None
        try:
            return check_priority(raw), ""
        except ValueError as exc:
            return 0, f"record {item['id']} has {self.f_priority}={raw!r}, which {exc}; queued at priority 0"

    def _record(self, item: Mapping[str, Any]) -> PromptRecord:
        images = item.get(self.f_images) if self.f_images else None
        priority, priority_problem = self._priority(item)
        return PromptRecord(
            id=str(item["id"]),
            prompt=str(item.get(self.f_prompt) or ""),
            negative_prompt=str(item.get(self.f_negative) or ""),
            image_url=str(item.get(self.f_image_url) or ""),
            images=[str(u) for u in images] if isinstance(images, list) else [],
            status=str(item.get(self.f_status) or ""),
            error=str(item.get(self.f_error) or ""),
            model=str(item.get(self.f_model) or "") if self.f_model else "",
            ratio=str(item.get(self.f_ratio) or "") if self.f_ratio else "",
            resolution=str(item.get(self.f_resolution) or "") if self.f_resolution else "",
            priority=priority,
            priority_problem=priority_problem,
            updated=str(item.get("updated") or "").replace(" ", "T", 1),
        )

    async def get_record(self, prompt_id: str) -> PromptRecord:
        """The record with this id; RecordNotFound when there is none."""
        validate_prompt_id(prompt_id)
        status, payload = await self._request("GET", f"{self._records}/{prompt_id}")
        if status == 404:
            raise RecordNotFound(f"no record {prompt_id!r} in collection {self.collection!r}", status=404)
        if status != 200 or not isinstance(payload, dict):
            raise self._fail(f"reading record {prompt_id}", status, payload)
        return self._record(payload)

    async def update_record(self, prompt_id: str, fields: Mapping[str, Any]) -> PromptRecord:
        """Patch some fields of a record; RecordNotFound when it has been deleted."""
        validate_prompt_id(prompt_id)
        status, payload = await self._request("PATCH", f"{self._records}/{prompt_id}", body=dict(fields))
        if status == 404:
            raise RecordNotFound(f"record {prompt_id!r} was deleted from {self.collection!r}", status=404)
        if status != 200 or not isinstance(payload, dict):
            raise self._fail(f"updating record {prompt_id}", status, payload)
        return self._record(payload)

    async def create_record(self, prompt: str, negative_prompt: str = "") -> PromptRecord:
        """Add a pending prompt record (used to seed the local stack)."""
        body = {self.f_prompt: prompt, self.f_negative: negative_prompt}
        status, payload = await self._request("POST", self._records, body=body)
        if status != 200 or not isinstance(payload, dict):
            raise self._fail(f"creating a record in {self.collection}", status, payload)
        return self._record(payload)

    async def set_status(self, prompt_id: str, status: RecordStatus, error: str = "") -> PromptRecord:
        return await self.update_record(prompt_id, {self.f_status: status.value, self.f_error: error})

    async def set_done(self, prompt_id: str, urls: list[str], note: str = "") -> PromptRecord:
        """Mark the record done with its image URLs; `note` (in the error field) says what the call refused."""
        fields: dict[str, Any] = {
            self.f_image_url: urls[0],
            self.f_status: RecordStatus.DONE.value,
            self.f_error: note,
        }
        if self.f_images:
            fields[self.f_images] = urls
        return await self.update_record(prompt_id, fields)

    async def set_failed(self, prompt_id: str, error: str) -> PromptRecord:
        """Mark the record failed with the reason; image URLs of an earlier run go, so no field says otherwise."""
        fields: dict[str, Any] = {self.f_status: RecordStatus.FAILED.value, self.f_error: error, self.f_image_url: ""}
        if self.f_images:
            fields[self.f_images] = []
        return await self.update_record(prompt_id, fields)

    def pending_filter(self) -> str:
        """Records still waiting for images: no image URL and not failed."""
        return f'{self.f_image_url} = "" && {self.f_status} != {filter_literal(RecordStatus.FAILED.value)}'

    def status_filter(self, status: RecordStatus) -> str:
        return f"{self.f_status} = {filter_literal(status.value)}"

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
        return [self._record(item) for item in items], bool(items) and len(items) >= min(served, page_size)

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

    def state_filter(self, status: RecordStatus) -> str:
        """Records in one status as the counts and lists show them; pending: no status and no image URL."""
        if status is RecordStatus.PENDING:
            return f'{self.f_image_url} = "" && {self.status_filter(RecordStatus.PENDING)}'
        return self.status_filter(status)

    def search_filter(self, text: str) -> str:
        """Records whose id or prompt contains `text`, taken literally (`%` and `_` are no wildcards)."""
        literal = filter_literal(like_escaped(text))
        return f"(id ~ {literal} || {self.f_prompt} ~ {literal})"

    async def list_page(self, record_filter: str, *, page: int, per_page: int, search: str = "") -> RecordPage:
        """One page (from 1) of the records matching the filter, in id order; `search`: id or prompt contains it."""
        clauses = f"({record_filter})" + (f" && {self.search_filter(search)}" if search else "")
        params = {"filter": clauses, "sort": "id", "page": str(page), "perPage": str(per_page)}
        status, payload = await self._request("GET", self._records, params=params)
        if status != 200 or not isinstance(payload, dict):
            raise self._fail(f"listing {self.collection}", status, payload)
        items = [self._record(item) for item in payload.get("items") or []]
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

    async def count_by_status(self) -> dict[str, int]:
        """How many records are pending, queued, processing, done and failed."""
        counts = {"pending": await self.count(self.state_filter(RecordStatus.PENDING))}
        for status in (RecordStatus.QUEUED, RecordStatus.PROCESSING, RecordStatus.DONE, RecordStatus.FAILED):
            counts[status.value] = await self.count(self.state_filter(status))
        return counts

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
