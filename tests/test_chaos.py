"""The chaos run: 300 prompts through a flaky API, flaky storage and a flaky record store, one of two worker
processes killed mid-run, then PocketBase down for 20 s and the bucket frozen for 20 s. Every record must end
done, no prompt paid for twice, no stray object, no manual command."""

from __future__ import annotations

import signal
from collections import Counter

import pytest

from imagegen.clients.storage import open_s3_client
from imagegen.models import RecordStatus
from imagegen.queue.keys import RedisKeys

from .conftest import RecordFactory, Stack, after_target, run_cli, wait_for_records
from .faultproxy import FaultProxy
from .test_outside_faults import hold
from .test_pipeline import wait_until

PROMPTS = 300
OUTAGE = 20.0


@pytest.mark.timeout(900)
async def test_chaos_run_ends_with_every_record_done_and_nothing_paid_twice(
    stack: Stack, records: RecordFactory, pocketbase, start_worker, sandbox_config, redis_client
):
    settings = stack.settings()
    created = await records.many(PROMPTS, prefix="chaos")
    sandbox = stack.jimeng.sandbox
    sandbox_config.fail_rate = 0.3
    sandbox_config.latency = 0.05

    async def done_at_least(count: int):
        return await pocketbase.count(pocketbase.status_filter(RecordStatus.DONE)) >= count

    async def every_answer_saved():
        """No paid answer is in transit: each generated prompt is remembered in Redis or already done."""
        generated = [r for r in created if sandbox.generations(r.prompt)]
        async with redis_client.pipeline(transaction=False) as pipe:
            for record in generated:
                pipe.exists(RedisKeys(settings.queue_name).generation(record.id))
            saved = await pipe.execute()
        unsaved = [r.id for r, flag in zip(generated, saved, strict=True) if not flag]
        return all([(await pocketbase.get_record(i)).status == "done" for i in unsaved])

    with (
        FaultProxy(settings.pocketbase_url, fault_rate=0.04, seed=1) as pb_proxy,
        FaultProxy(settings.tos_endpoint, fault_rate=0.04, seed=2) as s3_proxy,
    ):
        flaky = {
            "POCKETBASE_URL": pb_proxy.url,
            "TOS_ENDPOINT": s3_proxy.url,
            # Records must carry the real server's URLs, not the proxy's.
            "TOS_PUBLIC_BASE_URL": settings.tos_public_base_url,
            "QUEUE_ATTEMPTS": "12",
            "QUEUE_BACKOFF": "0.05",
            "QUEUE_BACKOFF_MAX": "1",
            "QUEUE_MAX_FAILED": "1000",
            "QUEUE_CONCURRENCY": "8",
            "OUTAGE_PAUSE_AFTER": "10",
            # The kill may land between arq marking a job running and the job taking its lease.
            "RECONCILE_INTERVAL": "5",
        }
        victim, survivor = start_worker(**flaky), start_worker(**flaky)
        assert after_target(stack, run_cli(stack, "add-pending")).strip() == f"{PROMPTS} queued"
        assert await wait_until(lambda: done_at_least(PROMPTS // 3), deadline=180)

        # A SIGKILL between the API's answer and the worker saving it loses that paid answer whatever the
        # worker does; the kill lands while the fake holds its answers, so the run can be held to exactly once.
        sandbox.holding = True
        try:
            assert await wait_until(every_answer_saved, deadline=30)
            victim.process.send_signal(signal.SIGKILL)
            victim.process.wait()
        finally:
            sandbox.holding = False

        stack.pocketbase.stop()
        try:
            await hold(OUTAGE, lambda: _logged(survivor, "pocketbase is down ("))
        finally:
            stack.pocketbase.start()
        assert await wait_until(lambda: done_at_least(2 * PROMPTS // 3), deadline=180)

        stack.seaweed.freeze()
        try:
            await hold(OUTAGE)
        finally:
            stack.seaweed.thaw()
        finished = await wait_for_records(pocketbase, [r.id for r in created], deadline=300)
        faults = pb_proxy.faulted_total + s3_proxy.faulted_total
        assert survivor.process.poll() is None

    statuses = Counter(r.status for r in finished)
    assert statuses == {"done": PROMPTS}, [(r.id, r.status, r.error) for r in finished if r.status != "done"]
    assert faults > 50
    stats = sandbox.stats()
    assert stats["total_calls"] > PROMPTS * 1.2
    paid_twice = [r.id for r in created if sandbox.generations(r.prompt) != 1]
    assert paid_twice == []
    log = survivor.output()
    assert "queue paused: pocketbase down" in log
    assert "queue resumed: pocketbase answers again" in log

    async with open_s3_client(settings) as s3:
        paginator = s3.get_paginator("list_objects_v2")
        stored = [
            o["Key"] async for page in paginator.paginate(Bucket=settings.tos_bucket) for o in page.get("Contents", [])
        ]
    expected = {url.split(f"/{settings.tos_bucket}/", 1)[1] for r in finished for url in r.images}
    assert len(expected) == 4 * PROMPTS
    assert set(stored) == expected


async def _logged(worker, text: str) -> bool:
    return text in worker.output()
