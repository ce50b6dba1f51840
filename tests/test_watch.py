"""POCKETBASE_WATCH: records created through PocketBase's REST API are queued by the one worker holding the
realtime subscription, with no command; the sweep after each (re)connect queues what no event brought; the
subscription survives a PocketBase restart and passes to another worker when its holder is killed."""

from __future__ import annotations

import asyncio
import re
import signal

import aiohttp
import pytest

from imagegen.clients.sse import ServerEvent, SSEParser
from imagegen.errors import PocketBaseError
from imagegen.ops.control import open_control
from imagegen.queue.keys import RedisKeys
from imagegen.worker.watch import Watcher

from .conftest import SECRETS, RecordFactory, Stack, wait_for_records
from .faultproxy import FaultProxy
from .test_pipeline import wait_until

# Sweeps at (re)connect only: a record queued in a test was queued by an event or by the sweep after a connect.
WATCHING = {"POCKETBASE_WATCH": "true", "RECONCILE_INTERVAL": "600"}
SUBSCRIBED = "subscribed to realtime changes of prompts"


def test_the_event_stream_parser_takes_any_split_line_ends_and_comments():
    stream = (
        b': a comment\r\nid:abc\r\nevent:PB_CONNECT\r\ndata:{"clientId":"abc"}\r\n\r\n'
        b"event: prompts\ndata: line one\ndata:line two\n\n"
        b"data:plain\r\r\n"
    )
    for size in (1, 2, 3, 7, len(stream)):
        parser = SSEParser()
        events = [e for start in range(0, len(stream), size) for e in parser.feed(stream[start : start + size])]
        assert events == [
            ServerEvent("PB_CONNECT", '{"clientId":"abc"}', "abc"),
            ServerEvent("prompts", "line one\nline two", "abc"),
            ServerEvent("message", "plain", "abc"),
        ], size


def test_the_event_stream_parser_refuses_an_endless_event():
    parser = SSEParser(max_event_bytes=100)
    with pytest.raises(Exception, match="larger than 100 bytes"):
        for _ in range(20):
            parser.feed(b"data:" + b"x" * 10 + b"\n")


def logged(worker, text: str):
    async def check() -> bool:
        return text in worker.output()

    return check


async def answers(pocketbase) -> bool:
    try:
        await pocketbase.check()
    except PocketBaseError:
        return False
    return True


def queued_by_event(worker, prompt_id: str) -> bool:
    return re.search(rf"\| {prompt_id} \| queued a new pending record \(watch\)", worker.output()) is not None


@pytest.mark.timeout(120)
async def test_a_record_created_through_the_rest_api_reaches_done_with_no_command(
    stack: Stack, records: RecordFactory, pocketbase, start_worker
):
    before = await records.create("created before any worker watched")
    worker = start_worker(**WATCHING)
    assert await wait_until(logged(worker, SUBSCRIBED), deadline=30), worker.output()
    # Queued by the sweep that follows the connection: no event was sent for it while nobody listened.
    [done_before] = await wait_for_records(pocketbase, [before.id], deadline=30)
    assert done_before.status == "done", worker.output()

    created = await records.create("created while the worker watches")
    loop = asyncio.get_running_loop()
    start = loop.time()

    async def taken() -> bool:
        return bool((await pocketbase.get_record(created.id)).status != "")

    assert await wait_until(taken, deadline=10)
    taken_after = loop.time() - start
    [record] = await wait_for_records(pocketbase, [created.id], deadline=30)
    assert record.status == "done" and record.image_url, worker.output()
    assert queued_by_event(worker, created.id), worker.output()
    assert taken_after < 3, taken_after  # "within a second", with room for a loaded 2-core box
    assert stack.jimeng.sandbox.stats()["total_calls"] == 2


@pytest.mark.timeout(180)
async def test_three_watching_workers_generate_twenty_new_records_exactly_once(
    stack: Stack, records: RecordFactory, pocketbase, start_worker
):
    workers = [start_worker(**WATCHING) for _ in range(3)]

    async def one_subscribed() -> bool:
        return sum(SUBSCRIBED in w.output() for w in workers) == 1

    assert await wait_until(one_subscribed, deadline=30), [w.output() for w in workers]
    created = await records.many(20, prefix="one of twenty watched")
    finished = await wait_for_records(pocketbase, [r.id for r in created], deadline=90)
    assert [r.status for r in finished] == ["done"] * 20
    assert stack.jimeng.sandbox.stats()["total_calls"] == 20
    assert {r.prompt: stack.jimeng.sandbox.generations(r.prompt) for r in created} == {r.prompt: 1 for r in created}
    assert sum("holds the subscription" in w.output() for w in workers) == 1


@pytest.mark.timeout(180)
async def test_the_subscription_survives_a_pocketbase_restart_and_the_sweep_queues_what_it_missed(
    stack: Stack, records: RecordFactory, pocketbase, start_worker, settings
):
    # The worker reaches PocketBase through a proxy the test can close: records are then created while
    # PocketBase is up but the watcher can't reconnect, so only the sweep after the reconnect can queue them.
    with FaultProxy(settings.pocketbase_url, fault_rate=1.0, faults=("503",)) as proxy:
        proxy.enabled = False
        worker = start_worker(POCKETBASE_URL=proxy.url, **WATCHING)
        assert await wait_until(logged(worker, SUBSCRIBED), deadline=30), worker.output()
        first = await records.create("before the restart")
        assert [r.status for r in await wait_for_records(pocketbase, [first.id], deadline=30)] == ["done"]

        proxy.enabled = True  # every new request through the proxy now gets a 503
        stack.pocketbase.stop()
        try:
            assert await wait_until(logged(worker, "lost the realtime connection"), deadline=30), worker.output()
        finally:
            stack.pocketbase.start()
        assert await wait_until(lambda: answers(pocketbase))  # our own kept-alive connections died with it
        missed = await records.many(3, prefix="while the watcher is disconnected")

        async def retried() -> bool:  # a few reconnects refused, so "one line per outage" means something
            return sum(path == "/api/realtime" and fault is not None for _, path, fault in proxy.events) >= 3

        assert await wait_until(retried, deadline=30)
        assert "realtime connection back" not in worker.output()
        proxy.enabled = False

        assert await wait_until(logged(worker, "realtime connection back after"), deadline=30), worker.output()
        finished = await wait_for_records(pocketbase, [r.id for r in missed], deadline=60)
        assert [r.status for r in finished] == ["done"] * 3, worker.output()
        assert "watch sweep queued 3 pending records" in worker.output()

        after = await records.create("after the reconnect")
        assert [r.status for r in await wait_for_records(pocketbase, [after.id], deadline=30)] == ["done"]
        assert queued_by_event(worker, after.id), worker.output()
        log = worker.output()
    assert log.count("lost the realtime connection") == 1  # one line per outage, not one per retry
    assert log.count("realtime connection back after") == 1
    assert not [secret for secret in SECRETS if secret in log]
    assert stack.jimeng.sandbox.stats()["total_calls"] == 5


@pytest.mark.timeout(180)
async def test_another_worker_takes_the_subscription_over_when_its_holder_is_killed(
    stack: Stack, records: RecordFactory, pocketbase, start_worker, redis_client, settings
):
    lease_key = RedisKeys(settings.queue_name).watch_lease
    workers = [start_worker(WORKER_LEASE="4", **WATCHING) for _ in range(2)]

    async def holder_pid() -> int | None:
        value = await redis_client.get(lease_key)
        return None if value is None else int(value.decode().split()[0].rsplit(":", 1)[1])

    async def subscribed_pid() -> int | None:
        pid = await holder_pid()
        found = [w for w in workers if w.process.pid == pid and SUBSCRIBED in w.output()]
        return pid if found else None

    pid = await wait_until(subscribed_pid, deadline=30)
    assert pid is not None, [w.output() for w in workers]
    holder = next(w for w in workers if w.process.pid == pid)
    other = next(w for w in workers if w is not holder)
    holder.signal(signal.SIGKILL)
    loop = asyncio.get_running_loop()
    killed_at = loop.time()
    assert await wait_until(logged(other, SUBSCRIBED), deadline=20), other.output()
    assert loop.time() - killed_at < 10
    assert await holder_pid() == other.process.pid

    created = await records.create("after the holder died")
    [record] = await wait_for_records(pocketbase, [created.id], deadline=30)
    assert record.status == "done", other.output()
    assert queued_by_event(other, created.id)

    # A clean stop gives the subscription up at once instead of letting it expire.
    assert other.stop() == 0
    assert await redis_client.get(lease_key) is None
    assert "gave up the PocketBase subscription" in other.output()


@pytest.mark.timeout(60)
async def test_a_stale_token_is_renewed_before_subscribing(stack: Stack, records: RecordFactory, pocketbase, settings):
    # PocketBase takes a subscription sent with an expired or invalid token (204) and then sends nothing.
    async with open_control(settings) as control, aiohttp.ClientSession() as http:
        await control.pocketbase.login()
        control.pocketbase._token = "an.expired.token"  # as a token past its lifetime is: refused, then ignored
        watcher = Watcher(control, http, lease=10, sweep_interval=600, worker_id="test:1")
        watcher.start()
        try:
            async with asyncio.timeout(20):
                await watcher.subscribed.wait()
            created = await records.create("seen with a renewed token")

            async def queued() -> bool:
                return bool((await pocketbase.get_record(created.id)).status == "queued")

            assert await wait_until(queued, deadline=10)
            assert control.pocketbase._token not in ("an.expired.token", None)
        finally:
            await watcher.stop()
