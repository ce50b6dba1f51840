"""Metrics and stages against the real stack: a worker's /metrics counts what its jobs did, `imagegen serve`'s
/metrics shows the queue as it is, and `inspect` shows where a job is and how long each stage took."""

from __future__ import annotations

import json
import re
import socket
import subprocess

import aiohttp
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from imagegen.clients.storage import open_s3_client
from imagegen.dev.localstack import free_port
from imagegen.ops.control import open_control
from imagegen.web import create_app

from .conftest import BIN, SECRETS, RecordFactory, Stack, run_cli, wait_for_records
from .test_pipeline import enqueue, wait_until, worker_running

TOKEN = "metrics-token-5c1e0a"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Every sample of a Prometheus text page, by name and labels (the page must parse)."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def scrape(http: aiohttp.ClientSession, url: str) -> Samples:
    async with http.get(url, headers=AUTH) as response:
        text = await response.text()
        assert response.status == 200, text
        assert response.content_type == "text/plain"
    for secret in (*SECRETS, TOKEN):
        assert secret not in text
    return parse(text)


async def stored_bytes(stack: Stack) -> tuple[int, int]:
    """Objects in the bucket and their total size."""
    async with open_s3_client(stack.settings()) as s3:
        listing = await s3.list_objects_v2(Bucket=stack.settings().tos_bucket)
        sizes = [item["Size"] for item in listing.get("Contents", [])]
    return len(sizes), sum(sizes)


async def test_metrics_of_a_worker_and_of_the_queue_count_what_happened(
    stack: Stack, records: RecordFactory, start_worker, http: aiohttp.ClientSession
):
    stack.jimeng.sandbox.config.latency = 0.2
    done_first = await records.create("a lantern on a pier")
    done_second = await records.create("a fox in the snow")
    moderated = await records.create("a blocked picture [[jimeng:-2006]]")
    flaky = await records.create("a windmill at dusk")
    stack.jimeng.sandbox.script(flaky.prompt, ["http-503", "ok"])
    ids = [done_first.id, done_second.id, moderated.id, flaky.id]
    port = free_port()
    worker = start_worker(WORKER_METRICS_PORT=str(port), API_TOKEN=TOKEN)
    base = f"http://127.0.0.1:{port}"

    async def healthy() -> bool:
        try:
            async with http.get(f"{base}/healthz", headers=AUTH) as response:
                return response.status == 200 and (await response.json())["ok"]
        except aiohttp.ClientError:
            return False

    assert await wait_until(healthy, deadline=30), worker.output()
    async with http.get(f"{base}/metrics") as response:
        assert response.status == 401  # API_TOKEN is set: the worker's endpoint wants it too
    assert run_cli(stack, "add", *ids).returncode == 0

    found = await wait_for_records(records.client, ids, ("done", "failed"))
    assert [r.status for r in found] == ["done", "done", "failed", "done"], worker.output()

    async def all_counted() -> Samples | None:
        samples = await scrape(http, f"{base}/metrics")
        ended = value(samples, "imagegen_jobs_total", outcome="done") + value(
            samples, "imagegen_jobs_total", outcome="failed"
        )
        return samples if ended == 4 else None

    samples = await wait_until(all_counted, deadline=20)
    assert samples, worker.output()
    assert value(samples, "imagegen_jobs_total", outcome="done") == 3
    assert value(samples, "imagegen_jobs_total", outcome="failed") == 1
    assert value(samples, "imagegen_job_retries_total", reason="failed_attempt") == 1
    # Five paid calls: three gave images, one was moderated and the flaky one's first failed, with their codes.
    calls = stack.jimeng.sandbox.stats()["total_calls"]
    assert calls == 5
    assert value(samples, "imagegen_jimeng_calls_total", result="images") == 3
    assert value(samples, "imagegen_jimeng_calls_total", result="moderated") == 1
    assert value(samples, "imagegen_jimeng_calls_total", result="failed") == 1
    assert value(samples, "imagegen_jimeng_errors_total", code="-2006") == 1
    assert value(samples, "imagegen_jimeng_errors_total", code="http_503") == 1
    # Every run that made a call was timed in `generating`; images and bytes are those in the bucket.
    assert value(samples, "imagegen_stage_duration_seconds_count", stage="generating") == calls
    assert value(samples, "imagegen_stage_duration_seconds_count", stage="saving") == 4
    objects, size = await stored_bytes(stack)
    assert value(samples, "imagegen_images_stored_total") == objects == 12
    assert value(samples, "imagegen_uploaded_bytes_total") == size
    assert all(value(samples, "imagegen_jobs_in_progress", stage=s) == 0 for s in ("queued", "generating"))

    # The queue as `imagegen serve` reports it, across workers, from Redis and PocketBase.
    app = create_app(stack.settings(api_token=TOKEN))
    async with TestClient(TestServer(app)) as client:
        refused = await client.get("/metrics")
        assert refused.status == 401
        page = await client.get("/metrics", headers=AUTH)
        queue = parse(await page.text())
        assert value(queue, "imagegen_queue_jobs_finished_total", outcome="done") == 3
        assert value(queue, "imagegen_queue_jobs_finished_total", outcome="failed") == 1
        assert value(queue, "imagegen_records", status="done") == 3
        assert value(queue, "imagegen_records", status="failed") == 1
        assert value(queue, "imagegen_records_up") == 1
        assert value(queue, "imagegen_queue_jobs", state="queued") == 0
        assert value(queue, "imagegen_queue_paused") == 0
        assert value(queue, "imagegen_workers") == 1
        assert (await client.post("/api/queue/pause", json={"reason": "checking metrics"}, headers=AUTH)).status == 200
        queue = parse(await (await client.get("/metrics", headers=AUTH)).text())
        assert value(queue, "imagegen_queue_paused") == 1
        assert value(queue, "imagegen_queue_pause_source", source="manual") == 1


async def test_inspect_shows_the_stage_a_job_is_in_and_the_time_each_stage_took(stack: Stack, records: RecordFactory):
    settings = stack.settings()
    stack.jimeng.sandbox.config.latency = 0.3
    record = await records.create("a heron in the reeds")
    flaky = await records.create("a tram in the rain")
    stack.jimeng.sandbox.script(flaky.prompt, ["-2007", "ok"])
    async with open_control(settings) as control, worker_running(settings):
        stack.jimeng.sandbox.holding = True
        try:
            await enqueue(settings, record.id)

            async def generating() -> bool:
                report = await control.inspect(record.id)
                return report.stage is not None and report.stage.stage.value == "generating"

            assert await wait_until(generating, deadline=15)
        finally:
            stack.jimeng.sandbox.holding = False
        await enqueue(settings, flaky.id)
        await wait_for_records(records.client, [record.id, flaky.id])
        report = (await control.inspect(record.id)).to_json()
        retried = (await control.inspect(flaky.id)).to_json()

    assert report["stage"] == "done"
    spent = {timing["stage"]: timing["seconds"] for timing in report["stages"]}
    assert list(spent) == ["queued", "generating", "downloading", "uploading", "saving"]
    assert spent["generating"] >= 0.3
    # Past the queue, the stages cover the run's time and no more.
    assert sum(spent.values()) - spent["queued"] <= report["duration_seconds"] + 0.5
    # Two runs, two calls of 0.3 s each: the timings add up over the job's runs.
    assert retried["stage"] == "done" and retried["tries"] == 2
    assert {t["stage"]: t["seconds"] for t in retried["stages"]}["generating"] >= 0.6

    shown = run_cli(stack, "inspect", record.id)
    assert "stage:     done" in shown.stdout
    assert re.search(r"timings: .*generating \d+\.\ds", shown.stdout), shown.stdout
    as_json = json.loads(run_cli(stack, "inspect", "--json", record.id).stdout)
    assert as_json["stage"] == "done" and [t["stage"] for t in as_json["stages"]] == list(spent)

    # A new job of the prompt starts its timings afresh, and says it is queued until a worker takes it.
    assert run_cli(stack, "add", "--force", record.id).returncode == 0
    queued = json.loads(run_cli(stack, "inspect", "--json", record.id).stdout)
    assert queued["state"] == "queued" and queued["stage"] == "queued" and queued["stages"] == []


def test_a_worker_metrics_port_it_cannot_use_stops_it_with_one_line(stack: Stack):
    def worker(**env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "arq"), "imagegen.WorkerSettings"],
            cwd=stack.workdir,
            env=stack.process_env(**env),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    exposed = worker(WORKER_METRICS_PORT=str(free_port()), WORKER_METRICS_HOST="0.0.0.0")
    assert exposed.returncode == 2
    assert "refusing to listen on '0.0.0.0' without API_TOKEN" in exposed.stderr
    assert "WORKER_METRICS_HOST" in exposed.stderr and "Traceback" not in exposed.stderr + exposed.stdout

    past = worker(WORKER_METRICS_PORT="65535", WORKER_INDEX="1")
    assert past.returncode == 2
    assert "WORKER_METRICS_PORT=65535 + WORKER_INDEX=1 is port 65536" in past.stderr
    assert "Traceback" not in past.stderr + past.stdout

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = worker(WORKER_METRICS_PORT=str(port - 2), WORKER_INDEX="2")
    assert busy.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port} for the worker's metrics" in busy.stderr
    assert "Traceback" not in busy.stderr + busy.stdout
