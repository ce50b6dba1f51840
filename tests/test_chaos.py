"""The chaos run: 300 prompts through a flaky API, flaky storage and a flaky record store, with one of two
worker processes killed mid-run. Every record must end done, no prompt paid for twice, no stray object."""

from __future__ import annotations

import signal
from collections import Counter

from imagegen.models import RecordStatus
from imagegen.storage import open_s3_client

from .conftest import RecordFactory, Stack, run_cli, wait_for_records
from .faultproxy import FaultProxy
from .test_pipeline import wait_until

PROMPTS = 300


async def test_chaos_run_ends_with_every_record_done_and_nothing_paid_twice(
    stack: Stack, records: RecordFactory, pocketbase, start_worker
):
    settings = stack.settings()
    created = await records.many(PROMPTS, prefix="chaos")
    sandbox = stack.jimeng.sandbox
    sandbox.config.fail_rate = 0.3
    sandbox.config.latency = 0.05
    try:
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
            }
            victim, survivor = start_worker(**flaky), start_worker(**flaky)
            assert run_cli(stack, "add-pending").stdout.strip() == f"{PROMPTS} queued"

            async def a_third_done():
                done = await pocketbase.count(pocketbase.status_filter(RecordStatus.DONE))
                return done >= PROMPTS // 3

            assert await wait_until(a_third_done, deadline=180)
            victim.process.send_signal(signal.SIGKILL)
            victim.process.wait()
            finished = await wait_for_records(pocketbase, [r.id for r in created], deadline=300)
            faults = pb_proxy.faulted_total + s3_proxy.faulted_total
            assert survivor.process.poll() is None
    finally:
        sandbox.config.fail_rate = 0.0
        sandbox.config.latency = 0.0

    statuses = Counter(r.status for r in finished)
    assert statuses == {"done": PROMPTS}, [(r.id, r.status, r.error) for r in finished if r.status != "done"]
    assert faults > 50
    stats = sandbox.stats()
    assert stats["total_calls"] > PROMPTS * 1.2
    paid_twice = [r.id for r in created if sandbox.generations(r.prompt) != 1]
    assert paid_twice == []

    async with open_s3_client(settings) as s3:
        paginator = s3.get_paginator("list_objects_v2")
        keys = [
            o["Key"] async for page in paginator.paginate(Bucket=settings.tos_bucket) for o in page.get("Contents", [])
        ]
    expected = {url.split(f"/{settings.tos_bucket}/", 1)[1] for r in finished for url in r.images}
    assert len(expected) == 4 * PROMPTS
    assert set(keys) == expected
