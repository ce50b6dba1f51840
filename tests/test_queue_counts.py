"""The queue's counts as `status`, the API and /metrics show them: read from score ranges and the workers'
heartbeats (never the whole queue), they still match what is queued, deferred, running and waiting; the
record counts are counted once for every viewer and say how old they are."""

from __future__ import annotations

import asyncio

from imagegen.clients.layout import FieldLayout
from imagegen.ops.answers import QueueAnswer
from imagegen.ops.control import Control, JobCounts, open_control
from imagegen.ops.listing import TaskState, list_tasks
from imagegen.ops.metrics import queue_metrics

from .conftest import RecordFactory, Stack
from .test_pipeline import wait_until, worker_running
from .test_priority import server_ms


async def counts(control: Control) -> JobCounts:
    return (await control.status(records=False)).jobs


async def test_job_counts_match_the_queue_with_priorities_a_retry_and_a_live_worker(
    stack: Stack, records: RecordFactory, redis_client, sandbox_config
):
    settings = stack.settings(queue_concurrency=2)  # arq holds 4 jobs: 2 in their call, 2 ready for a slot
    sandbox_config.latency = 60  # calls stay in flight while the counts are read
    created = await records.many(7, prefix="a counted lighthouse")
    priorities = (0, 5, -3, 5, 0, 10, 0)
    async with open_control(settings) as control:
        for priority, record in zip(priorities, created, strict=True):
            assert (await control.enqueue(record.id, priority=priority)).outcome.value == "queued"
        # What arq does to a job that raised Retry(defer=60): a plain time a minute from now.
        retried = created[-1]
        await redis_client.zadd(settings.queue_name, {retried.id: await server_ms(redis_client) + 60_000})
        assert await counts(control) == JobCounts(queued=6, deferred=1, in_progress=0, waiting=0)
        deferred = await list_tasks(control, TaskState.DEFERRED, page=1, per_page=10)
        assert (deferred.total, [item.id for item in deferred.items]) == (1, [retried.id])
        assert (await list_tasks(control, TaskState.DEFERRED, page=2, per_page=1)).items == []

        await control.pause("counting the waiting jobs")
        async with worker_running(settings):
            # Paused: the worker's four jobs wait for a resume; the other two stay queued.
            waiting = JobCounts(queued=2, deferred=1, in_progress=0, waiting=4)
            assert await wait_until(lambda: _counted(control, waiting)), await counts(control)
            await control.resume()
            running = JobCounts(queued=2, deferred=1, in_progress=4, waiting=0)
            assert await wait_until(lambda: _counted(control, running)), await counts(control)
            # The four it runs are those of the highest priorities (first in, first out within one).
            [worker] = await control.state.workers()
            assert sorted(worker.running) == sorted(created[i].id for i in (5, 1, 3, 0))
            assert await wait_until(lambda: _in_flight(stack, 2))


async def _in_flight(stack: Stack, calls: int) -> bool:
    return bool(stack.jimeng.sandbox.stats()["inflight"] == calls)


async def _counted(control: Control, expected: JobCounts) -> bool:
    return await counts(control) == expected


class CountingViewer:
    """A viewer of its own (its own Redis pool and PocketBase client), counting its PocketBase count queries
    (and its reads of the collection's fields, the first request of a count)."""

    def __init__(self, control: Control) -> None:
        self.control = control
        self.queries = 0
        count, fields = control.pocketbase.count, control.pocketbase.fields

        async def counted(record_filter: str) -> int:
            self.queries += 1
            return await count(record_filter)

        async def fields_read() -> FieldLayout:
            self.queries += 1
            return await fields()

        control.pocketbase.count = counted  # type: ignore[method-assign]
        control.pocketbase.fields = fields_read  # type: ignore[method-assign]


async def test_record_counts_are_counted_once_for_every_viewer_and_say_how_old_they_are(
    stack: Stack, records: RecordFactory
):
    await records.many(3, prefix="a shared count")
    async with open_control(stack.settings(record_counts_max_age=0)) as control:
        alone = CountingViewer(control)
        report = await control.status()
        assert report.records is not None and report.records["pending"] == 3
        per_round = alone.queries  # one PocketBase query per status
        assert per_round > 0

    shared = stack.settings(record_counts_max_age=300)
    async with open_control(shared) as first, open_control(shared) as second:
        viewers = [CountingViewer(first), CountingViewer(second)]
        one, two = await asyncio.gather(first.status(), second.status())
        assert sum(viewer.queries for viewer in viewers) == per_round
        assert one.records == two.records and one.records is not None and one.records["pending"] == 3
        assert one.records_as_of == two.records_as_of
        shown = QueueAnswer.of(two).to_json()
        assert shown["records_as_of"] is not None and 0 <= shown["records_age_seconds"] < 300

        # A record created meanwhile shows once the shared counts expire; until then every viewer sees their age.
        await records.create("a record the shared counts don't know yet")
        again = await first.status()
        assert again.records == one.records and again.records_as_of == one.records_as_of
        assert sum(viewer.queries for viewer in viewers) == per_round
        assert b"imagegen_records_age_seconds" in queue_metrics(await second.queue_figures())


async def test_a_count_that_failed_is_not_tried_again_by_every_viewer_of_the_process(stack: Stack):
    settings = stack.settings(pocketbase_url="http://127.0.0.1:1", record_counts_max_age=300)
    async with open_control(settings) as control:
        viewer = CountingViewer(control)
        first, second = await control.status(), await control.status()
    assert first.records is None and "cannot reach http://127.0.0.1:1" in first.records_error
    assert (second.records, second.records_error) == (None, first.records_error)
    assert viewer.queries == 1
