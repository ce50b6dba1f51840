"""The whole product as a user runs it: `imagegen add-pending` and `arq imagegen.WorkerSettings` processes."""

from __future__ import annotations

import hashlib

import aiohttp
import pytest

from .conftest import SECRETS, RecordFactory, Stack, after_target, run_cli, wait_for_records


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.timeout(300)
async def test_twenty_records_end_with_hosted_images_equal_to_what_the_api_served(
    stack: Stack, records: RecordFactory, pocketbase, start_worker, http: aiohttp.ClientSession
):
    created = await records.many(20, prefix="a hand-drawn map of an island")
    worker = start_worker()

    result = run_cli(stack, "add-pending")
    assert result.returncode == 0, result.stderr
    assert after_target(stack, result).strip() == "20 queued"

    finished = await wait_for_records(pocketbase, [r.id for r in created], deadline=120)
    assert [r.status for r in finished] == ["done"] * 20
    base = stack.settings().tos_public_base_url
    for record in finished:
        assert record.error == ""
        assert len(record.images) == 4
        assert record.image_url == record.images[0]
        served = stack.jimeng.sandbox.served_images(record.prompt)
        hosted = []
        for url in record.images:
            assert url.startswith(f"{base}/imagegen/{record.id}/")
            async with http.get(url) as response:
                assert response.status == 200
                hosted.append(await response.read())
        assert [digest(b) for b in hosted] == [digest(b) for b in served]
        assert stack.jimeng.sandbox.generations(record.prompt) == 1

    assert after_target(stack, run_cli(stack, "add-pending")).strip() == "nothing to queue"
    assert worker.stop() == 0
    log = worker.output()
    assert log.count("job done: 4 images") == 20
    for secret in SECRETS:
        assert secret not in log


@pytest.mark.timeout(300)
async def test_two_worker_processes_share_the_queue_without_double_generation(
    stack: Stack, records: RecordFactory, pocketbase, start_worker, sandbox_config
):
    # Generations take a while, so whichever worker starts first can't take the whole queue alone.
    sandbox_config.latency = 0.5
    created = await records.many(12, prefix="a lantern festival")
    first, second = start_worker(QUEUE_CONCURRENCY="2"), start_worker(QUEUE_CONCURRENCY="2")
    assert run_cli(stack, "add-pending").returncode == 0

    finished = await wait_for_records(pocketbase, [r.id for r in created], deadline=120)
    assert [r.status for r in finished] == ["done"] * 12
    assert stack.jimeng.sandbox.stats()["total_generations"] == 12
    first.stop(), second.stop()
    jobs_per_worker = [w.output().count("job done") for w in (first, second)]
    assert sum(jobs_per_worker) == 12
    assert all(jobs_per_worker), jobs_per_worker
