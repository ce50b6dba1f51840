"""Which records are in which status: read from the collection's status field, or, for a collection without
one, from the states Redis keeps (see `marks`) with the records read by id.

The front ends and the sweeps ask here: `retry-failed` and the reconcile sweep page through `iter_status`, the
dashboard's lists come from `list_status`, `imagegen status` and the metrics from `count_by_status`. Pending is
`FieldLayout.pending` everywhere.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace

from imagegen.clients.layout import RecordRule, filter_literal
from imagegen.clients.pocketbase import MAX_PAGE, PocketBaseClient, RecordPage
from imagegen.models import PromptRecord, RecordStatus

# Ids per filter when records are read by id (states kept in Redis): the filter stays a few KiB long.
IDS_PER_FILTER = 100
# Records with a state in Redis that a list of pending records leaves out by filter (`id != ...`); past it they
# are left out of each page in memory.
MAX_EXCLUDED = 200
# The states only Redis knows in a collection without a status field.
REDIS_KEPT = (RecordStatus.QUEUED, RecordStatus.PROCESSING, RecordStatus.FAILED)


def _by_ids(ids: list[str]) -> str:
    """A filter matching exactly these record ids."""
    return " || ".join(f"id = {filter_literal(i)}" for i in ids)


async def iter_status(
    pocketbase: PocketBaseClient, *statuses: RecordStatus, page_size: int = MAX_PAGE
) -> AsyncIterator[list[PromptRecord]]:
    """The records in these statuses, a page at a time in id order; with no status field, those whose state
    Redis keeps (read by id)."""
    layout = await pocketbase.fields()
    if layout.status:
        record_filter = " || ".join(f"({layout.in_status(s).filter})" for s in statuses)
        async for page in pocketbase.iter_rule(
            RecordRule(record_filter, lambda r: r.status in statuses), page_size=page_size
        ):
            yield page
        return
    if pocketbase.marks is None:
        return
    ids = await pocketbase.marks.ids(statuses)
    for start in range(0, len(ids), IDS_PER_FILTER):
        chunk = ids[start : start + IDS_PER_FILTER]
        found: set[str] = set()
        async for page in pocketbase.iter_pages(_by_ids(chunk)):
            found.update(r.id for r in page)
            kept = [r for r in page if r.status in statuses]
            if kept:
                yield kept
        # the states of records deleted from the collection go too
        await pocketbase.marks.forget([i for i in chunk if i not in found])


async def list_status(
    pocketbase: PocketBaseClient, status: RecordStatus, *, page: int, per_page: int, search: str = ""
) -> RecordPage:
    """One page of the records in a status as the dashboard lists them (pending by `FieldLayout.pending`).

    With no status field, `queued`, `processing` and `failed` come from Redis (their ids, then the page's
    records); pending records are those without an image URL whose state Redis doesn't keep."""
    layout = await pocketbase.fields()
    marks = pocketbase.marks if layout.states_in_redis else None
    if marks is not None and status not in (RecordStatus.PENDING, RecordStatus.DONE):
        ids = await marks.ids([status])
        chunk = ids[(page - 1) * per_page : page * per_page]
        if not chunk:
            return RecordPage([], page, per_page, len(ids))
        found = await pocketbase.list_page(_by_ids(chunk), page=1, per_page=per_page, search=search)
        return RecordPage(found.items, page, per_page, len(ids))
    rule = layout.in_status(status)
    marked = []
    if marks is not None and status is RecordStatus.PENDING:
        marked = await marks.ids(REDIS_KEPT)
    # Past MAX_EXCLUDED they are left out of each page in memory: pages come short, the total is high.
    left_out = [f"id != {filter_literal(i)}" for i in marked] if len(marked) <= MAX_EXCLUDED else []
    found = await pocketbase.list_page(
        " && ".join([rule.filter, *left_out]), page=page, per_page=per_page, search=search
    )
    return replace(found, items=[r for r in found.items if rule.matches(r)])


async def count_by_status(pocketbase: PocketBaseClient) -> dict[str, int]:
    """How many records are pending, queued, processing, done and failed (with no status field: done and
    not done from the collection, the states in between from Redis)."""
    layout = await pocketbase.fields()
    order = (RecordStatus.PENDING, RecordStatus.QUEUED, RecordStatus.PROCESSING, RecordStatus.DONE, RecordStatus.FAILED)
    if not layout.states_in_redis:
        return {s.value or "pending": await pocketbase.count(layout.in_status(s).filter) for s in order}
    marked = await pocketbase.marks.counts() if pocketbase.marks is not None else {}
    counts = {s.value: marked.get(s.value, 0) for s in REDIS_KEPT}
    # what the collection calls pending (no image URL) holds the records in the states Redis keeps, too
    waiting = await pocketbase.count(layout.pending().filter)
    counts["pending"] = max(0, waiting - sum(counts.values()))
    counts[RecordStatus.DONE.value] = await pocketbase.count(layout.in_status(RecordStatus.DONE).filter)
    return {s.value or "pending": counts[s.value or "pending"] for s in order}
