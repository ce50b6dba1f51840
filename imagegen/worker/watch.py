"""Watching PocketBase: records created (or set back) pending are queued without any command.

With POCKETBASE_WATCH=true every worker process runs a `Watcher`, and exactly one of them at a time holds the
deployment's subscription: a Redis lease with an owner token (`keys.watch_lease`), renewed every
WORKER_LEASE / 4 seconds. When its holder dies the lease expires and another worker takes it within about
one lease period; a clean stop gives it up at once.

The holder opens PocketBase's realtime stream (server-sent events, `sse`, read chunk by chunk from aiohttp's
streaming response, so it never blocks the event loop), submits its subscription to the collection and
queues each record that an event shows pending (`FieldLayout.pending`, the rule add-pending and the counts
use: no image URL, status empty or one of POCKETBASE_PENDING_VALUES) after a create or an update. Statuses
the worker writes itself (`queued`, `processing`, `done`, `failed`) are not pending, so they never loop back
into the queue; with no status field, the state Redis keeps is checked when the record is read again.

Each event goes through `Control.enqueue`, the rules of `imagegen add`: the record is read again, a done
record is not queued, a prompt with a live job is not queued twice, and the record is marked `queued` before
its job is written. Marking costs one request per record, which is nothing at the pace records are created
by hand or by an app, and it buys two things: whoever created the record sees it taken, and should Redis
lose the job the reconcile sweep (which looks at `queued` records) brings it back by itself.

Events sent while no stream is open are lost (a restart of PocketBase, a dropped connection, no worker
holding the lease), so after every (re)connect, and every RECONCILE_INTERVAL seconds, the holder sweeps the
pending records by key, a page at a time, and queues the ones without a live job through the bulk path of
`add-pending` (no record writes; one Redis round trip per page). Records left `queued` or `processing`
without a job are the reconcile sweep's, which waits a lease period before re-queueing so that a run still
working is never doubled.

A dropped stream is reopened at once; when that fails, attempts back off from 0.5 s to 10 s and the worker
logs one line when the connection is lost and one when it is back. The superuser token is renewed before
every subscription (an expired one is replaced by a fresh login).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from contextlib import suppress
from typing import Any

import aiohttp
from loguru import logger
from redis.exceptions import RedisError

from imagegen.clients.sse import ServerEvent, SSEParser
from imagegen.errors import ImagegenError, RealtimeError
from imagegen.ops.control import Control
from imagegen.queue.enqueue import EnqueueOutcome, EnqueueTally
from imagegen.queue.lease import RELEASE

from .periodic import cancel_and_wait

FIRST_DELAY = 0.5
MAX_DELAY = 10.0
# A connection that lived this long was healthy: the next failure starts backing off from FIRST_DELAY again.
STABLE_AFTER = 30.0
# PocketBase closes a realtime connection after 5 idle minutes; silence past this means the connection is dead.
READ_TIMEOUT = 360.0
CONNECT_TIMEOUT = 15.0
# Records enqueued at once while a burst of events is worked off.
ENQUEUERS = 4

# KEYS: the watch lease; ARGV: token, ttl ms. Returns 1 renewed, 2 taken (it was free), 0 held by another.
_CLAIM = """
local holder = redis.call('get', KEYS[1])
if holder == ARGV[1] then
  redis.call('pexpire', KEYS[1], ARGV[2])
  return 1
end
if not holder then
  redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 2
end
return 0
"""


class Watcher:
    """One worker process's share of watching: competing for the subscription, holding it while it has it."""

    def __init__(
        self, control: Control, http: aiohttp.ClientSession, *, lease: float, sweep_interval: float, worker_id: str
    ) -> None:
        self._control = control
        self._pocketbase = control.pocketbase
        self._http = http
        self._url = f"{control.settings.pocketbase_url}/api/realtime"
        self._topic = control.pocketbase.collection
        self._lease_key = control.keys.watch_lease
        self._ttl = lease
        self._ttl_ms = int(lease * 1000)
        self._sweep_interval = sweep_interval
        # The lease's value names its holder (host:pid, as in `imagegen status`) before the random part.
        self._token = f"{worker_id} {secrets.token_hex(12)}"
        self._claim = control.redis.register_script(_CLAIM)
        self._release = control.redis.register_script(RELEASE)
        self._task: asyncio.Task[None] | None = None
        self._held = False
        self._confirmed = 0.0  # monotonic time Redis last confirmed the lease
        self._redis_failing = False
        self._sweep_now = asyncio.Event()
        self._incoming: asyncio.Queue[str] = asyncio.Queue()
        self._waiting: set[str] = set()  # ids in `_incoming`: a burst of updates to one record queues it once
        self._enqueue_failing = False
        self._sweep_failing = False
        # One outage of the stream: when it started and whether its line was logged.
        self._lost_at: float | None = None
        self._lost_logged = False
        self._announced = False  # the first subscription of a hold is logged, quiet reopens are not
        self.subscribed = asyncio.Event()  # set while a subscription is live (tests wait on it)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="imagegen-watch")

    async def stop(self) -> None:
        """Stop watching and give the subscription up, so another worker takes it over at once."""
        task, self._task = self._task, None
        await cancel_and_wait(task)
        if self._held:
            self._held = False
            with suppress(RedisError, OSError):
                await self._release(keys=[self._lease_key], args=[self._token])
                logger.info("gave up the PocketBase subscription")

    # The lease

    async def _run(self) -> None:
        while True:
            try:
                if await self._renew():
                    await self._hold()
            except Exception as exc:  # a bug: logged, and watching goes on
                logger.opt(exception=exc).error("watch failed: {}", exc)
            await asyncio.sleep(self._ttl / 4)

    async def _renew(self) -> bool:
        """Take or renew the lease; whether this worker holds it (a Redis failure: as long as it can't have expired)."""
        try:
            held = int(await self._claim(keys=[self._lease_key], args=[self._token, self._ttl_ms])) > 0
        except (RedisError, OSError) as exc:
            if not self._redis_failing:
                logger.warning("watch: cannot reach Redis for the subscription lease ({})", type(exc).__name__)
            self._redis_failing = True
            if self._held and time.monotonic() - self._confirmed >= self._ttl * 3 / 4:
                # It may expire before Redis answers again, and another worker take it.
                logger.warning("watch: the subscription lease could not be renewed; this worker stops watching")
                self._held = False
            return self._held
        if self._redis_failing:
            logger.info("watch: Redis answers again")
        self._redis_failing = False
        if held:
            self._confirmed = time.monotonic()
        elif self._held:
            logger.warning("another worker holds the PocketBase subscription now; this one stops watching")
        self._held = held
        return held

    async def _hold(self) -> None:
        """Watch for as long as the lease is ours."""
        logger.info(
            "watching PocketBase collection {} for pending records (this worker holds the subscription)", self._topic
        )
        tasks = [
            asyncio.create_task(self._keep_subscribed(), name="imagegen-watch-stream"),
            asyncio.create_task(self._keep_sweeping(), name="imagegen-watch-sweep"),
            *(asyncio.create_task(self._enqueue_events(), name="imagegen-watch-enqueue") for _ in range(ENQUEUERS)),
        ]
        try:
            while True:
                await asyncio.sleep(self._ttl / 4)
                if not await self._renew():
                    return
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.subscribed.clear()
            self._sweep_now.clear()

    # The stream

    async def _keep_subscribed(self) -> None:
        delay = FIRST_DELAY
        self._lost_at, self._lost_logged, self._announced = time.monotonic(), False, False
        while True:
            opened = time.monotonic()
            try:
                await self._stream()
                reason = "PocketBase ended the stream"
            except (aiohttp.ClientError, TimeoutError, ImagegenError) as exc:
                reason = _describe(exc)
            except Exception as exc:
                logger.opt(exception=exc).error("the realtime stream failed: {}", type(exc).__name__)
                reason = type(exc).__name__
            self.subscribed.clear()
            lived = time.monotonic() - opened
            if self._lost_at is None:
                self._lost_at = time.monotonic()
                if lived >= STABLE_AFTER:
                    # A healthy stream ended (PocketBase ends idle ones after a few minutes): reopen at once;
                    # only a failure to reopen starts an outage. A stream that keeps dropping soon after it
                    # opened is an outage at once, and keeps backing off.
                    delay = FIRST_DELAY
                    logger.debug("realtime stream ended ({}); reopening", reason)
                    continue
            if not self._lost_logged:
                self._lost_logged = True
                logger.warning("lost the realtime connection to PocketBase ({}); reconnecting", reason)
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_DELAY)

    async def _stream(self) -> None:
        """One realtime connection: open, subscribe, then hand events on until the stream ends."""
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT, sock_read=READ_TIMEOUT)
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
        async with self._http.get(self._url, headers=headers, timeout=timeout) as response:
            if response.status != 200:
                raise RealtimeError(f"GET /api/realtime answered HTTP {response.status}")
            parser = SSEParser()
            subscribed = False
            async for chunk in response.content.iter_any():
                for event in parser.feed(chunk):
                    if event.event == "PB_CONNECT" and not subscribed:
                        await self._subscribe(event)
                        subscribed = True
                    elif event.event == self._topic and subscribed:
                        self._on_change(event)

    async def _subscribe(self, event: ServerEvent) -> None:
        client_id = str(_json(event).get("clientId") or event.id)
        await self._pocketbase.fields()  # the pending rule of the events needs the collection's fields
        await self._pocketbase.subscribe(client_id, [self._topic])
        if self._lost_logged and self._lost_at is not None:
            logger.info("realtime connection back after {:.1f} s", time.monotonic() - self._lost_at)
        elif not self._announced:
            logger.info("subscribed to realtime changes of {}", self._topic)
        else:
            logger.debug("realtime stream reopened")
        self._announced = True
        self._lost_at, self._lost_logged = None, False
        self.subscribed.set()
        self._sweep_now.set()  # whatever changed while no stream was open

    def _on_change(self, event: ServerEvent) -> None:
        payload = _json(event)
        item = payload.get("record")
        if payload.get("action") not in ("create", "update") or not isinstance(item, dict) or "id" not in item:
            return
        record = self._pocketbase.record_from(item)
        if self._pocketbase.layout.pending().matches(record) and record.id not in self._waiting:
            self._waiting.add(record.id)
            self._incoming.put_nowait(record.id)

    # Queueing

    async def _enqueue_events(self) -> None:
        while True:
            prompt_id = await self._incoming.get()
            self._waiting.discard(prompt_id)
            try:
                report = await self._control.enqueue(prompt_id, only_pending=True)
            except ImagegenError as exc:
                # The sweep after the next reconnect (or the next interval) queues it.
                if not self._enqueue_failing:
                    logger.bind(prompt_id=prompt_id).warning("watch: could not queue a new record ({})", exc)
                self._enqueue_failing = True
                continue
            if self._enqueue_failing:
                logger.info("watch: queueing new records works again")
            self._enqueue_failing = False
            if report.outcome is EnqueueOutcome.QUEUED:
                logger.bind(prompt_id=prompt_id).info("queued a new pending record (watch)")

    async def _keep_sweeping(self) -> None:
        while True:
            with suppress(TimeoutError):
                async with asyncio.timeout(self._sweep_interval):
                    await self._sweep_now.wait()
            self._sweep_now.clear()
            if not self.subscribed.is_set():
                continue  # PocketBase is out of reach: the reconnect asks for a sweep, no need to log failures
            try:
                await self.sweep()
            except Exception as exc:
                if not isinstance(exc, ImagegenError):
                    logger.opt(exception=exc).error("watch sweep failed: {}", exc)
                elif not self._sweep_failing:
                    logger.warning("watch sweep failed ({}); trying again in {:.0f} s", exc, MAX_DELAY)
                self._sweep_failing = True
                await asyncio.sleep(MAX_DELAY)  # what it was to find must not wait a whole interval
                self._sweep_now.set()
            else:
                if self._sweep_failing:
                    logger.info("watch sweep works again")
                self._sweep_failing = False

    async def sweep(self) -> int:
        """Queue every pending record without a live job (bulk, paged by key); returns how many were queued."""
        tally = EnqueueTally()
        await tally.add_pages(self._control.enqueue_pending())
        queued = tally.counts.get(EnqueueOutcome.QUEUED.value, 0)
        if queued:
            logger.info("watch sweep queued {} pending records no event had brought ({})", queued, tally.summary())
        return queued


def _json(event: ServerEvent) -> dict[str, Any]:
    try:
        value = json.loads(event.data)
    except ValueError:
        raise RealtimeError(f"a {event.event} event of the realtime stream is not JSON") from None
    if not isinstance(value, dict):
        raise RealtimeError(f"a {event.event} event of the realtime stream is not a JSON object")
    return value


def _describe(exc: BaseException) -> str:
    """One short line about a failed connection; never the request headers (they carry the token)."""
    if isinstance(exc, ImagegenError):
        return str(exc)
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"HTTP {exc.status}"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect to {exc.host}:{exc.port}"
    if isinstance(exc, TimeoutError):
        return "no data in time"
    return type(exc).__name__
