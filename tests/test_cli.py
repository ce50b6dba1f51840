"""The `imagegen` command as a user runs it: a real subprocess against the real services."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
from arq.jobs import Job

from imagegen.queue.keys import RedisKeys

from .conftest import BIN, SECRETS, RecordFactory, Stack, after_target, queue_state, run_cli, wait_for_records
from .test_pipeline import run_queue, wait_until


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in text


def assert_one_clean_line(text: str) -> None:
    assert len(text.strip().splitlines()) == 1, text
    assert "Traceback" not in text


async def test_add_reports_each_id(stack: Stack, records: RecordFactory):
    record = await records.create("a kite over the dunes")
    missing = "zzzzzzzzzzzzzzz"
    result = run_cli(stack, "add", record.id, missing, "not-an-id")
    lines = after_target(stack, result).splitlines()
    assert f"{record.id}  queued" in lines
    assert any(line.startswith(f"{missing}  not found") for line in lines)
    assert any(line.startswith("not-an-id  invalid id") for line in lines)
    assert result.returncode == 1
    assert_no_secret(result.stdout, result.stderr)

    again = run_cli(stack, "add", record.id)
    assert after_target(stack, again).splitlines()[0] == f"{record.id}  already queued"
    assert again.returncode == 0


async def test_add_marks_the_record_queued(stack: Stack, records: RecordFactory, pocketbase):
    record = await records.create("a red umbrella")
    assert run_cli(stack, "add", record.id).returncode == 0
    assert (await pocketbase.get_record(record.id)).status == "queued"


async def test_add_pending_queues_only_pending_records(stack: Stack, records: RecordFactory, pocketbase):
    pending = await records.many(3)
    failed = await records.create("failed before")
    done = await records.create("done before")
    await pocketbase.update_record(failed.id, {"status": "failed", "error": "earlier"})
    await pocketbase.update_record(done.id, {"status": "done", "imageUrl": "http://example.invalid/x.png"})

    result = run_cli(stack, "add-pending", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["counts"] == {"queued": 3}
    assert sorted(r["id"] for r in report["results"]) == sorted(r.id for r in pending)

    second = run_cli(stack, "add-pending")
    assert after_target(stack, second).strip() == "3 already queued"


async def test_add_done_record_needs_force(stack: Stack, records: RecordFactory, settings):
    record = await records.create("a glass of water")
    run_cli(stack, "add", record.id)
    await run_queue(settings)

    result = run_cli(stack, "add", record.id)
    assert after_target(stack, result).startswith(f"{record.id}  already done: {settings.tos_public_base_url}/")
    assert result.returncode == 0
    forced = run_cli(stack, "add", "--force", record.id)
    assert after_target(stack, forced).splitlines()[0] == f"{record.id}  queued"


async def test_dry_run_only_says_what_would_be_queued(stack: Stack, records: RecordFactory, pocketbase):
    created = await records.many(3)
    dry = run_cli(stack, "add-pending", "--dry-run", "--each")
    assert dry.returncode == 0
    assert sorted(after_target(stack, dry).splitlines()[:3]) == sorted(f"{r.id}  would queue" for r in created)
    assert dry.stdout.splitlines()[-1] == "3 would queue"
    assert [(await pocketbase.get_record(r.id)).status for r in created] == [""] * 3
    assert json.loads(run_cli(stack, "status", "--json").stdout)["jobs"]["queued"] == 0
    assert after_target(stack, run_cli(stack, "add-pending")).strip() == "3 queued"


async def test_retry_failed_requeues_failed_records(stack: Stack, records: RecordFactory, pocketbase, settings):
    record = await records.create("try again")
    await pocketbase.update_record(record.id, {"status": "failed", "error": "earlier"})
    result = run_cli(stack, "retry-failed", "--json")
    assert json.loads(result.stdout)["counts"] == {"queued": 1}
    # The queue says it is queued; the record keeps its last run's outcome until a worker takes it.
    report = json.loads(run_cli(stack, "inspect", record.id, "--json").stdout)
    assert (report["state"], report["record"]["status"]) == ("queued", "failed")
    assert after_target(stack, run_cli(stack, "retry-failed")).strip() == "1 already queued"
    assert after_target(stack, run_cli(stack, "add-pending")).strip() == "nothing to queue"
    await run_queue(settings)
    done = await pocketbase.get_record(record.id)
    assert (done.status, done.error) == ("done", "")


async def test_retry_failed_runs_a_failed_rerun_again_with_all_its_attempts(
    stack: Stack, records: RecordFactory, pocketbase, settings, redis_client
):
    # A forced re-run that failed: the record still holds the first run's image URL.
    record = await records.create("a re-run that failed")
    await pocketbase.update_record(
        record.id, {"status": "failed", "error": "earlier", "imageUrl": "http://example.invalid/0.png"}
    )
    await redis_client.set(RedisKeys(settings.queue_name).attempts(record.id), 3)
    result = run_cli(stack, "retry-failed", "--json")
    assert json.loads(result.stdout)["counts"] == {"queued": 1}
    await run_queue(settings)
    done = await pocketbase.get_record(record.id)
    assert done.status == "done"
    assert done.image_url.startswith(settings.tos_public_base_url)
    report = json.loads(run_cli(stack, "inspect", record.id, "--json").stdout)
    assert report["tries"] == 1


async def test_attempts_given_back_never_go_below_zero(settings, redis_client, stack: Stack):
    state = queue_state(settings, redis_client)
    await state.give_back_attempt("aaaaaaaaaaaaaaa")
    assert await state.attempts("aaaaaaaaaaaaaaa") == 0
    assert await state.begin_attempt("aaaaaaaaaaaaaaa") == 1


async def test_inspect_follows_a_job_from_queued_to_done(stack: Stack, records: RecordFactory, settings):
    record = await records.create("a snail on a leaf")
    unknown = run_cli(stack, "inspect", record.id, "--json")
    assert json.loads(unknown.stdout)["state"] == "unknown"

    run_cli(stack, "add", record.id)
    queued = json.loads(run_cli(stack, "inspect", record.id, "--json").stdout)
    assert queued["state"] == "queued"
    assert queued["record"]["status"] == "queued"

    await run_queue(settings)
    done = json.loads(run_cli(stack, "inspect", record.id, "--json").stdout)
    assert done["state"] == "done"
    assert done["tries"] == 1
    assert done["duration_seconds"] > 0
    assert len(done["record"]["images"]) == 4
    text = run_cli(stack, "inspect", record.id)
    assert "state:     done" in text.stdout
    assert done["record"]["imageUrl"] in text.stdout


async def test_inspect_failed_job_shows_the_error(stack: Stack, records: RecordFactory, settings, redis_client):
    record = await records.create("forbidden [[jimeng:-2006]]")
    run_cli(stack, "add", record.id)
    worker = await run_queue(settings)
    report = json.loads(run_cli(stack, "inspect", record.id, "--json").stdout)
    assert report["state"] == "failed"
    assert "moderation" in report["error"]
    assert report["record"]["status"] == "failed"
    # arq's own view agrees: a failed job, counted as one.
    assert worker.jobs_failed == 1
    assert worker.jobs_complete == 0
    result = await Job(record.id, redis_client).result_info()
    assert result is not None
    assert result.success is False


async def test_inspect_shows_the_job_when_pocketbase_is_down(stack: Stack, records: RecordFactory, settings):
    record = await records.create("inspected during an outage")
    run_cli(stack, "add", record.id)
    result = run_cli(stack, "inspect", record.id, "--json", POCKETBASE_URL="http://127.0.0.1:1")
    assert result.returncode == 3
    report = json.loads(result.stdout)
    assert report["state"] == "queued"
    assert report["record"] is None
    assert "cannot reach http://127.0.0.1:1" in report["record_unavailable"]
    assert_one_clean_line(result.stderr)


async def test_a_failed_rerun_leaves_no_image_urls_on_the_failed_record(
    stack: Stack, records: RecordFactory, settings, pocketbase
):
    record = await records.create("a rerun that will be refused")
    run_cli(stack, "add", record.id)
    await run_queue(settings)
    assert (await pocketbase.get_record(record.id)).status == "done"
    stack.jimeng.sandbox.script(record.prompt, ["-2006"])
    run_cli(stack, "add", "--force", record.id)
    await run_queue(settings)
    failed = await pocketbase.get_record(record.id)
    assert failed.status == "failed"
    assert (failed.image_url, failed.images) == ("", [])
    assert "moderation" in failed.error
    # So `add` and `inspect` agree: not done, queued again.
    assert after_target(stack, run_cli(stack, "add", record.id)).splitlines()[0] == f"{record.id}  queued"


def test_deployments_sharing_one_redis_keep_their_own_pause(stack: Stack):
    assert run_cli(stack, "pause", "--reason", "staging only", QUEUE_NAME="staging:queue").returncode == 0
    production = json.loads(run_cli(stack, "status", "--json").stdout)
    staging = json.loads(run_cli(stack, "status", "--json", QUEUE_NAME="staging:queue").stdout)
    assert production["paused"] is None
    assert staging["paused"]["reason"] == "staging only"


async def test_status_lists_only_the_workers_of_its_own_queue(stack: Stack, start_worker, settings, redis_client):
    start_worker()
    assert await wait_until(lambda: _workers(settings, redis_client, 1))
    assert len(json.loads(run_cli(stack, "status", "--json").stdout)["workers"]) == 1
    assert json.loads(run_cli(stack, "status", "--json", QUEUE_NAME="staging:queue").stdout)["workers"] == []


async def test_every_command_says_which_redis_queue_and_collection_it_read(
    stack: Stack, records: RecordFactory, settings
):
    record = await records.create("a kite with a named target")
    redis_only = f"target: Redis 127.0.0.1:{settings.redis_port}/0, queue imagegen:queue"
    with_records = f"{redis_only}; PocketBase {settings.pocketbase_url}, collection prompts"
    text_commands: list[tuple[tuple[str, ...], str]] = [
        (("status",), with_records),
        (("add", record.id), with_records),
        (("add-pending",), with_records),
        (("retry-failed",), with_records),
        (("inspect", record.id), with_records),
        (("check",), with_records),
        (("pause",), redis_only),
        (("resume",), redis_only),
        (("spend",), redis_only),
    ]
    for args, first in text_commands:
        result = run_cli(stack, *args)
        assert result.stdout.splitlines()[0] == first, (args, result.stdout, result.stderr)
        assert_no_secret(result.stdout, result.stderr)
    # --json stays one document: the target is a field of it.
    json_commands: list[tuple[tuple[str, ...], set[str]]] = [
        (("status", "--json"), {"pocketbase", "collection"}),
        (("add-pending", "--json"), {"pocketbase", "collection"}),
        (("inspect", record.id, "--json"), {"pocketbase", "collection"}),
        (("check", "--json"), {"pocketbase", "collection"}),
        (("spend", "--json"), set()),
    ]
    for command, fields in json_commands:
        target = json.loads(run_cli(stack, *command).stdout)["target"]
        assert target == {
            "redis": f"127.0.0.1:{settings.redis_port}/0",
            "queue": "imagegen:queue",
            **({"pocketbase": settings.pocketbase_url, "collection": "prompts"} if fields else {}),
        }, command


async def test_status_warns_when_no_worker_ever_used_its_queue(stack: Stack, start_worker, settings, redis_client):
    never = run_cli(stack, "status")
    warning = "warning:   no worker has ever used queue imagegen:queue on this Redis"
    assert warning in never.stdout
    assert "workers:   0 live\n" in never.stdout
    assert json.loads(run_cli(stack, "status", "--json").stdout)["warnings"] == [
        never.stdout.split("warning:   ")[1].strip()
    ]

    worker = start_worker()
    assert await wait_until(lambda: _workers(settings, redis_client, 1))
    assert "warning:" not in run_cli(stack, "status").stdout
    assert worker.stop() == 0
    assert await wait_until(lambda: _workers(settings, redis_client, 0))
    after = run_cli(stack, "status")
    assert "workers:   0 live (the last one seen " in after.stdout
    assert "warning:" not in after.stdout
    # Another queue on the same Redis has still never seen a worker.
    staging = run_cli(stack, "status", QUEUE_NAME="staging:queue")
    assert "warning:   no worker has ever used queue staging:queue on this Redis" in staging.stdout


async def _workers(settings, redis_client, count: int) -> bool:
    return len(await queue_state(settings, redis_client).workers()) == count


async def test_inspect_unknown_and_invalid_ids(stack: Stack):
    unknown = run_cli(stack, "inspect", "aaaaaaaaaaaaaaa")
    assert unknown.returncode == 0
    assert "state:     unknown" in unknown.stdout
    assert "record:    not found in PocketBase" in unknown.stdout
    invalid = run_cli(stack, "inspect", "../etc/passwd")
    assert invalid.returncode == 2
    assert_one_clean_line(invalid.stderr)
    assert "15 characters" in invalid.stderr


def test_check_reports_every_service_ok(stack: Stack):
    result = run_cli(stack, "check")
    assert result.returncode == 0, result.stdout
    lines = after_target(stack, result).splitlines()
    assert [line.split()[0] for line in lines[:4]] == ["redis", "pocketbase", "storage", "jimeng"]
    assert all(line.split()[1] == "ok" for line in lines[:4])
    assert f"at {stack.env['TOS_ENDPOINT']}" in lines[2]
    # the collection the local stack made has every field imagegen uses
    assert lines[4] == "collection  ok   every field imagegen writes takes what it writes"
    # The test stack's 20 s JIMENG_TIMEOUT is below the sane floor: said, with what to set.
    assert lines[5:] == [
        "warning:    JIMENG_TIMEOUT=20000 ms gives a generation only 20 s; real ones take up to minutes, so slow "
        "calls are abandoned (and may still be billed) and retried - set JIMENG_TIMEOUT=600000"
    ]
    assert_no_secret(result.stdout, result.stderr)


def test_env_files_are_read_in_order_and_the_environment_wins(stack: Stack, tmp_path):
    first, second = tmp_path / "first.env", tmp_path / "second.env"
    first.write_text("QUEUE_NAME=from-first\nPOCKETBASE_COLLECTION=nowhere\n")
    second.write_text("QUEUE_NAME=from-second\n")
    env = {k: v for k, v in stack.env.items() if k not in ("QUEUE_NAME", "POCKETBASE_COLLECTION")}
    result = run_cli_env(stack, env, "--env-file", str(first), "--env-file", str(second), "check", "--json")
    checks = {c["service"]: c for c in json.loads(result.stdout)["services"]}
    assert "jobs in from-second" in checks["redis"]["detail"]
    assert "collection 'nowhere' not found" in checks["pocketbase"]["detail"]
    overridden = run_cli_env(
        stack, {**env, "QUEUE_NAME": "from-env"}, "--env-file", str(first), "--env-file", str(second), "check", "--json"
    )
    redis_check = next(c for c in json.loads(overridden.stdout)["services"] if c["service"] == "redis")
    assert "jobs in from-env" in redis_check["detail"]


def test_a_missing_env_file_is_an_error(stack: Stack, tmp_path):
    result = run_cli(stack, "--env-file", str(tmp_path / "typo.env"), "status")
    assert result.returncode == 2
    assert_one_clean_line(result.stderr)
    assert "typo.env' not found" in result.stderr


def test_commands_without_pocketbase_credentials_name_them_and_exit_2(stack: Stack):
    result = run_cli(stack, "add-pending", POCKETBASE_EMAIL="", POCKETBASE_PASSWORD="")
    assert result.returncode == 2
    assert_one_clean_line(result.stderr)
    assert "POCKETBASE_EMAIL, POCKETBASE_PASSWORD not set" in result.stderr
    status = run_cli(stack, "status", "--json", POCKETBASE_EMAIL="")
    assert status.returncode == 2
    report = json.loads(status.stdout)
    assert report["jobs"]["queued"] == 0
    assert "POCKETBASE_EMAIL not set" in report["records_error"]


def test_a_wrong_redis_password_is_a_settings_error(stack: Stack):
    result = run_cli(stack, "add", "aaaaaaaaaaaaaaa", REDIS_PASSWORD="not-the-password")
    assert result.returncode == 2
    assert_one_clean_line(result.stderr)
    assert "refused the password in REDIS_PASSWORD" in result.stderr
    assert "not-the-password" not in result.stderr
    missing = run_cli(stack, "status", REDIS_PASSWORD="")
    assert missing.returncode == 2
    assert "refused no password (REDIS_PASSWORD is empty)" in missing.stderr


async def test_a_worker_with_a_wrong_redis_password_stops_with_one_dated_line(stack: Stack, start_worker):
    worker = start_worker(REDIS_PASSWORD="not-the-password")
    assert worker.process.wait(30) == 2
    output = worker.output()
    errors = [line for line in output.splitlines() if "| ERROR" in line]
    assert len(errors) == 1, output
    assert re.match(rf"\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{{3}} \| ERROR +\| {worker.process.pid} \|", errors[0])
    assert "refused the password in REDIS_PASSWORD" in errors[0]
    assert "Traceback" not in output
    assert "not-the-password" not in output


@pytest.mark.parametrize(
    ("env", "service", "words"),
    [
        ({"REDIS_PORT": "1"}, "redis", "cannot connect"),
        ({"POCKETBASE_PASSWORD": "wrong-password"}, "pocketbase", "check POCKETBASE_EMAIL and POCKETBASE_PASSWORD"),
        ({"POCKETBASE_URL": "http://127.0.0.1:1"}, "pocketbase", "cannot reach"),
        ({"TOS_ACCESS_KEY_SECRET": "wrong-secret"}, "storage", "TOS_ACCESS_KEY"),
        ({"TOS_ACCESS_KEY_ID": "nobody"}, "storage", "TOS_ACCESS_KEY"),
        ({"TOS_BUCKET": "no-such-bucket"}, "storage", "TOS_BUCKET"),
        ({"JIMENG_API_URL": "http://127.0.0.1:1/v1"}, "jimeng", "cannot reach"),
    ],
)
def test_check_names_the_broken_service(stack: Stack, env, service, words):
    result = run_cli(stack, "check", "--json", **env)
    assert result.returncode == 3
    checks = {c["service"]: c for c in json.loads(result.stdout)["services"]}
    assert not checks[service]["ok"]
    assert words in checks[service]["detail"]
    assert all(c["ok"] for name, c in checks.items() if name != service)
    assert_no_secret(result.stdout, result.stderr, "wrong-secret", "wrong-password")


def test_redis_down_gives_one_line_and_exit_3(stack: Stack):
    result = run_cli(stack, "add", "aaaaaaaaaaaaaaa", REDIS_PORT="1")
    assert result.returncode == 3
    assert_one_clean_line(result.stderr)
    assert "cannot reach Redis at 127.0.0.1:1" in result.stderr


def test_pocketbase_down_gives_one_line_and_exit_3(stack: Stack):
    result = run_cli(stack, "add-pending", POCKETBASE_URL="http://127.0.0.1:1")
    assert result.returncode == 3
    assert_one_clean_line(result.stderr)
    assert "cannot reach http://127.0.0.1:1" in result.stderr


def test_wrong_pocketbase_password_gives_one_line(stack: Stack):
    result = run_cli(stack, "add", "aaaaaaaaaaaaaaa", POCKETBASE_PASSWORD="nope-nope-nope")
    assert result.returncode == 3
    assert_one_clean_line(result.stderr)
    assert "login as" in result.stderr
    assert "nope-nope-nope" not in result.stderr


@pytest.mark.parametrize(
    ("name", "value"), [("QUEUE_CONCURRENCY", "lots"), ("JIMENG_RESOLUTION", "8k"), ("TOS_ADDRESSING_STYLE", "x")]
)
def test_invalid_env_value_gives_one_line_and_exit_2(stack: Stack, name, value):
    result = run_cli(stack, "add-pending", **{name: value})
    assert result.returncode == 2
    assert_one_clean_line(result.stderr)
    assert name in result.stderr


def run_cli_env(stack: Stack, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """`imagegen ...` with exactly these settings in its environment."""
    process_env = {k: v for k, v in stack.process_env().items() if k not in stack.env}
    return subprocess.run(
        [str(BIN / "imagegen"), *args],
        cwd=stack.workdir,
        env={**process_env, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_invalid_value_in_dot_env_file_is_named(stack: Stack, tmp_path):
    env_file = tmp_path / "custom.env"
    env_file.write_text("JIMENG_RATIO=7:7\n")
    result = run_cli(stack, "--env-file", str(env_file), "check")
    assert result.returncode == 2
    assert "JIMENG_RATIO" in result.stderr
    assert_one_clean_line(result.stderr)


async def test_worker_refuses_a_job_timeout_that_cannot_hold_a_paid_call(stack: Stack, start_worker):
    worker = start_worker(QUEUE_JOB_TIMEOUT="10", JIMENG_TIMEOUT="14000")
    assert worker.process.wait(30) == 2
    output = worker.output()
    assert "QUEUE_JOB_TIMEOUT=10 can't hold JIMENG_TIMEOUT=14000" in output
    assert len(output.strip().splitlines()) == 1
    assert "Traceback" not in output


def test_status_shows_what_redis_holds_when_pocketbase_is_down(stack: Stack):
    assert run_cli(stack, "pause", "--reason", "checking").returncode == 0
    result = run_cli(stack, "status", "--json", POCKETBASE_URL="http://127.0.0.1:1")
    assert result.returncode == 3
    report = json.loads(result.stdout)
    assert report["paused"]["reason"] == "checking"
    assert report["records"] is None
    assert "cannot reach http://127.0.0.1:1" in report["records_error"]
    assert_one_clean_line(result.stderr)


async def test_worker_refuses_to_start_without_settings(stack: Stack, start_worker):
    worker = start_worker(JIMENG_API_KEY="")
    assert worker.process.wait(30) == 2
    output = worker.output()
    assert "JIMENG_API_KEY not set" in output
    assert "Traceback" not in output


async def test_records_done_by_a_worker_process(stack: Stack, records: RecordFactory, pocketbase, start_worker):
    created = await records.many(3, prefix="a paper crane")
    worker = start_worker()
    assert run_cli(stack, "add", *[r.id for r in created]).returncode == 0
    finished = await wait_for_records(pocketbase, [r.id for r in created])
    assert [r.status for r in finished] == ["done"] * 3
    assert worker.stop() == 0
    log = worker.output()
    for record in created:
        assert f"{record.id} | job done: 4 images" in log
    assert_no_secret(log)


async def test_worker_waits_for_redis_with_one_clear_line(stack: Stack, start_worker):
    worker = start_worker(REDIS_PORT="1")

    async def said_so():
        return "cannot reach Redis at 127.0.0.1:1" in worker.output()

    from .test_pipeline import wait_until

    assert await wait_until(said_so)
    assert worker.process.poll() is None
    worker.stop()
    assert "Traceback" not in worker.output()
    assert_no_secret(worker.output())
