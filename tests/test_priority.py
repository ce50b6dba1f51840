"""Priorities: higher runs first, first in first out within one priority, on one worker and across workers; a
retry keeps its priority; `add --priority` overrides a record's field; one job per prompt whatever the priority;
`status`, `inspect` and the deferred listing read priority-shifted scores right."""

from __future__ import annotations

import json
import logging
import re
import time

import pytest
from arq.constants import in_progress_key_prefix

from imagegen.models import PromptRecord
from imagegen.ops.control import Control, open_control
from imagegen.ops.listing import TaskState, list_tasks
from imagegen.queue.beats import WorkerBeat
from imagegen.queue.keys import RedisKeys
from imagegen.queue.priority import BAND, PRIORITY_MAX, PRIORITY_MIN, check_priority, due_ms, priority_of, queue_score
from imagegen.worker.arqworker import ShiftedDelayFilter
from imagegen.worker.intake import Intake

from .conftest import RecordFactory, Stack, after_target, run_cli, wait_for_records
from .test_pipeline import wait_until
from .test_web_api import open_api

# --- the encoding, without services ------------------------------------------------------------------------


def test_scores_sort_by_priority_then_time_and_give_both_back():
    now = 1_795_000_000_000
    scores = [queue_score(now + dt, p) for p, dt in ((5, 0), (5, 1), (0, -86_400_000), (-3, 0), (PRIORITY_MAX, 10))]
    assert sorted(scores) == [scores[4], scores[0], scores[1], scores[2], scores[3]]
    for priority in (PRIORITY_MIN, -1, 0, 7, PRIORITY_MAX):
        score = queue_score(now, priority)
        assert score < 0 and abs(score) < 2**53  # due at once, and exact as a double
        assert (priority_of(float(score)), due_ms(float(score))) == (priority, now)
    # arq's own scores (a deferred retry: now + defer) are plain times
    assert (priority_of(now + 5000), due_ms(now + 5000)) == (None, now + 5000)
    assert time.time() * 1000 * 2 < BAND  # every score of ours negative for decades to come


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, 0), ("", 0), (0, 0), (7, 7), (-1000, -1000), (1000, 1000), (3.0, 3), (" -12 ", -12), ("+4", 4)],
)
def test_priority_values_that_count(value: object, expected: int):
    assert check_priority(value) == expected


@pytest.mark.parametrize("value", [1001, -1001, 2.5, "high", "1e3", True, [1], {"p": 1}])
def test_priority_values_that_do_not(value: object):
    with pytest.raises(ValueError, match="whole number from -1000 to 1000"):
        check_priority(value)


def test_arqs_start_line_shows_the_real_delay_not_the_shift():
    def shown(extra: str) -> str:
        record = logging.LogRecord("arq.worker", logging.INFO, "", 0, "%6.2fs → %s(%s)%s", (1.0, "r", "a", extra), None)
        ShiftedDelayFilter().filter(record)
        return record.getMessage()

    shift = 1001 * BAND / 1000
    assert shown(f" delayed={shift + 0.5:0.2f}s").endswith("(a)")
    assert shown(f" try=2 delayed={shift + 3.25:0.2f}s").endswith("(a) try=2 delayed=3.25s")
    assert shown(" delayed=4.00s").endswith("(a) delayed=4.00s")  # a plain score: left as it was


# --- queueing and reading, against Redis and PocketBase ------------------------------------------------------


async def create(records: RecordFactory, prompt: str, priority: object = None) -> PromptRecord:
    record = await records.create(prompt)
    if priority is not None:
        await records.client.update_record(record.id, {"priority": priority})
    return record


async def queue_score_of(redis_client, settings, prompt_id: str) -> float:
    score: float | None = await redis_client.zscore(settings.queue_name, prompt_id)
    assert score is not None, f"{prompt_id} is not in the queue"
    return score


async def test_add_priority_overrides_the_field_and_a_prompt_is_queued_once(
    stack: Stack, records: RecordFactory, redis_client, settings
):
    record = await create(records, "an overridden lighthouse", 7)
    result = run_cli(stack, "add", "--priority", "-5", record.id)
    assert result.returncode == 0, result.stderr
    assert after_target(stack, result).splitlines()[0] == f"{record.id}  queued"
    assert priority_of(await queue_score_of(redis_client, settings, record.id)) == -5
    inspected = json.loads(run_cli(stack, "inspect", "--json", record.id).stdout)
    assert (inspected["state"], inspected["priority"]) == ("queued", -5)
    assert "priority:  -5" in run_cli(stack, "inspect", record.id).stdout

    # The same id again, with another priority or none: still one job, with the priority it was queued with.
    for again in (["--priority", "900"], []):
        result = run_cli(stack, "add", *again, record.id)
        assert after_target(stack, result).splitlines()[0] == f"{record.id}  already queued"
    assert await redis_client.zcard(settings.queue_name) == 1
    assert priority_of(await queue_score_of(redis_client, settings, record.id)) == -5

    # Without the option, the record's own field counts.
    own = await create(records, "a lighthouse with its own priority", 7)
    assert run_cli(stack, "add", own.id).returncode == 0
    assert priority_of(await queue_score_of(redis_client, settings, own.id)) == 7
    assert json.loads(run_cli(stack, "status", "--json").stdout)["jobs"]["queued"] == 2


@pytest.mark.parametrize("value", ["1001", "-1001", "2.5", "high", ""])
async def test_a_bad_priority_is_one_line_and_exit_2(
    stack: Stack, records: RecordFactory, redis_client, settings, value
):
    record = await records.create("a lighthouse asked for too much")
    result = run_cli(stack, "add", "--priority", value, record.id)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == (
        f"imagegen: invalid --priority {value!r}: must be a whole number from -1000 to 1000 (higher runs first)\n"
    )
    assert await redis_client.zcard(settings.queue_name) == 0


async def test_a_record_whose_priority_is_no_priority_is_queued_at_0_with_a_warning(
    stack: Stack, records: RecordFactory, redis_client, settings
):
    bad = await create(records, "a lighthouse far too eager", 5000)
    fine = await create(records, "a lighthouse with a fair priority", -20)
    result = run_cli(stack, "add-pending", "--json")
    outcomes = {r["id"]: r for r in json.loads(result.stdout)["results"]}
    assert outcomes[bad.id]["outcome"] == "queued"
    assert outcomes[bad.id]["detail"] == (
        f"record {bad.id} has priority=5000, which must be a whole number from -1000 to 1000 (higher runs first); "
        "queued at priority 0"
    )
    assert outcomes[fine.id] == {"id": fine.id, "outcome": "queued", "detail": ""}
    assert priority_of(await queue_score_of(redis_client, settings, bad.id)) == 0
    assert priority_of(await queue_score_of(redis_client, settings, fine.id)) == -20


async def test_a_retry_that_comes_due_goes_back_to_its_priority(
    stack: Stack, records: RecordFactory, redis_client, settings
):
    low, high, high_later, running = [
        await create(records, f"a retried lighthouse {n}", p) for n, p in enumerate((0, 10, 10, 10))
    ]
    async with open_control(settings) as control:
        for record in (low, high, high_later, running):
            assert (await control.enqueue(record.id)).outcome.value == "queued"
        keys = RedisKeys(settings.queue_name)
        assert await redis_client.get(keys.priority(high.id)) == b"10"
        intake = Intake(control.redis, keys, settings.queue_name, 0.5)
        now = int(await server_ms(redis_client))
        # What arq does to a job that raised Retry(defer=60): its score becomes the plain time it is due.
        await redis_client.zadd(settings.queue_name, {high.id: now + 60_000})
        # A running job's score is arq's to change, even a plain one come due; its worker's heartbeat lists it.
        await redis_client.set(in_progress_key_prefix + running.id, b"1")
        await redis_client.zadd(settings.queue_name, {running.id: now - 1})
        beat = WorkerBeat(
            id="host:1", queue=settings.queue_name, started=now / 1000, running=[running.id], seen=now / 1000
        )
        await control.state.heartbeat(beat, ttl=60)

        status = await control.status(records=False)
        assert (status.jobs.queued, status.jobs.deferred, status.jobs.in_progress) == (2, 1, 1)
        report = await control.inspect(high.id)
        assert (report.state.value, report.priority) == ("deferred", 10)
        assert report.scheduled_for is not None and report.scheduled_for.timestamp() == pytest.approx(now / 1000 + 60)
        deferred = await list_tasks(control, TaskState.DEFERRED, page=1, per_page=10)
        assert [(item.id, item.scheduled_for) for item in deferred.items] == [(high.id, (now + 60_000) / 1000)]

        assert await intake.pick(10, now) == [high_later.id.encode(), low.id.encode()]
        # Due: back in the band of priority 10, behind the job of that priority that was due first.
        assert await intake.pick(10, now + 60_001) == [high_later.id.encode(), high.id.encode(), low.id.encode()]
        assert await redis_client.zscore(settings.queue_name, high.id) == queue_score(now + 60_000, 10)
        assert await redis_client.zscore(settings.queue_name, running.id) == now - 1
        assert await control_counts(control) == (3, 0)


async def server_ms(redis_client) -> int:
    seconds, micros = await redis_client.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def control_counts(control: Control) -> tuple[int, int]:
    status = await control.status(records=False)
    return status.jobs.queued, status.jobs.deferred


async def test_the_web_api_takes_a_priority_and_refuses_one_out_of_range(stack: Stack, records: RecordFactory):
    record = await create(records, "a lighthouse queued over the web", 3)
    async with open_api(stack) as api:
        status, body = await api.call("POST", "/api/tasks", body={"ids": [record.id], "priority": 1001})
        assert status == 400 and "priority" in body["error"]
        status, body = await api.call("POST", "/api/tasks", body={"ids": [record.id], "priority": 40})
        assert status == 200 and body["counts"] == {"queued": 1}
        status, task = await api.call("GET", f"/api/tasks/{record.id}")
        assert (status, task["priority"], task["state"]) == (200, 40, "queued")


# --- real workers --------------------------------------------------------------------------------------------


async def fill_the_worker(stack: Stack, records: RecordFactory, control: Control, redis_client) -> list[PromptRecord]:
    """Two jobs hold a QUEUE_CONCURRENCY=1 worker: one in a call the fake holds, one ready behind it; what is
    queued now waits in the queue until the held call is let go."""
    sandbox = stack.jimeng.sandbox
    sandbox.holding = True
    fillers = [await records.create(f"a filler lighthouse {n}") for n in range(2)]
    for filler in fillers:
        assert (await control.enqueue(filler.id)).outcome.value == "queued"

    async def full() -> bool:
        running = await redis_client.exists(*(in_progress_key_prefix + f.id for f in fillers))
        return running == 2 and len(sandbox.received()) == 1

    assert await wait_until(full, deadline=30)
    return fillers


def call_order(stack: Stack, created: list[PromptRecord]) -> list[str]:
    """The records in the order their first generation call started."""
    starts = {record.id: stack.jimeng.sandbox.call_starts(record.prompt)[0] for record in created}
    return sorted(starts, key=lambda prompt_id: starts[prompt_id])


@pytest.mark.timeout(120)
async def test_priorities_order_a_backlog_on_one_slot(
    stack: Stack, records: RecordFactory, pocketbase, redis_client, settings, start_worker, sandbox_config
):
    worker = await one_slot_worker(start_worker, sandbox_config)
    async with open_control(settings) as control:
        fillers = await fill_the_worker(stack, records, control, redis_client)
        # (name, the record's field, the priority `add` asks for): queued in this order, one after another.
        plan = [
            ("none", None, None),
            ("five", 5, None),
            ("minus three", -3, None),
            ("five again", 5, None),
            ("zero", 0, None),
            ("top by override", 1, 1000),
            ("bottom", -1000, None),
            ("five by override", -7, 5),
        ]
        backlog = {}
        for name, field, override in plan:
            record = await create(records, f"a backlog lighthouse: {name}", field)
            assert (await control.enqueue(record.id, priority=override)).outcome.value == "queued"
            backlog[name] = record
        stack.jimeng.sandbox.holding = False
        every = [*fillers, *backlog.values()]
        finished = await wait_for_records(pocketbase, [r.id for r in every], deadline=90)
    assert [r.status for r in finished] == ["done"] * len(every)
    expected = ["top by override", "five", "five again", "five by override", "none", "zero", "minus three", "bottom"]
    order = call_order(stack, every)
    assert set(order[:2]) == {f.id for f in fillers}
    assert order[2:] == [backlog[name].id for name in expected]
    assert all(stack.jimeng.sandbox.generations(r.prompt) == 1 for r in every)
    # arq's start line of each job, with no delay of decades (the shift) in it
    assert worker.output().count(":generate_images(") >= len(every)
    assert re.search(r"delayed=\d{6,}", worker.output()) is None


@pytest.mark.timeout(120)
async def test_a_retried_high_priority_job_runs_again_before_lower_priorities(
    stack: Stack, records: RecordFactory, pocketbase, redis_client, settings, start_worker, sandbox_config
):
    worker = await one_slot_worker(start_worker, sandbox_config)
    async with open_control(settings) as control:
        fillers = await fill_the_worker(stack, records, control, redis_client)
        urgent = await create(records, "an urgent lighthouse that fails once", 50)
        stack.jimeng.sandbox.script(urgent.prompt, ["-2001", "ok"])
        lows = [await create(records, f"a patient lighthouse {n}") for n in range(5)]
        for record in (urgent, *lows):
            assert (await control.enqueue(record.id)).outcome.value == "queued"
        stack.jimeng.sandbox.holding = False
        every = [*fillers, urgent, *lows]
        finished = await wait_for_records(pocketbase, [r.id for r in every], deadline=90)
    assert [r.status for r in finished] == ["done"] * len(every)
    first, second = stack.jimeng.sandbox.call_starts(urgent.prompt)
    starts = sorted(stack.jimeng.sandbox.call_starts(r.prompt)[0] for r in lows)
    assert first < starts[0]
    # Its backoff (QUEUE_BACKOFF=0.2 s) ends while the first patient ones run; then it goes first again. Had
    # it lost its priority, it would have run after all of them.
    assert second < starts[-2]
    assert "attempt 1 of 3 failed" in worker.output()


@pytest.mark.timeout(150)
async def test_high_priority_goes_first_across_two_workers(
    stack: Stack, records: RecordFactory, pocketbase, start_worker, sandbox_config
):
    sandbox_config.latency = 0.2
    lows = [await records.create(f"a common lighthouse {n}") for n in range(10)]
    assert after_target(stack, run_cli(stack, "add-pending")).strip() == "10 queued"
    highs = [await records.create(f"an important lighthouse {n}") for n in range(2)]
    result = run_cli(stack, "add", "--priority", "50", *(r.id for r in highs))
    assert result.returncode == 0, result.stderr
    workers = [start_worker(QUEUE_CONCURRENCY="1") for _ in range(2)]
    finished = await wait_for_records(pocketbase, [r.id for r in [*lows, *highs]], deadline=120)
    assert [r.status for r in finished] == ["done"] * 12
    order = call_order(stack, [*lows, *highs])
    # Each worker holds two jobs at a time: whichever looks first takes the two important ones.
    assert {r.id for r in highs} <= set(order[:4])
    assert all("job done" in w.output() for w in workers)


async def one_slot_worker(start_worker, sandbox_config):
    """A worker process with one generation slot, ready, and calls of 0.3 s."""
    sandbox_config.latency = 0.3
    worker = start_worker(QUEUE_CONCURRENCY="1")
    assert await wait_until(lambda: _ready(worker), deadline=30)
    return worker


async def _ready(worker) -> bool:
    return "worker ready" in worker.output()
