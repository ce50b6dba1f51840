"""The PocketBase and storage clients against the real servers."""

from __future__ import annotations

import aiohttp
import pytest

from imagegen.clients.pocketbase import PocketBaseClient
from imagegen.clients.storage import Storage, open_s3_client
from imagegen.errors import FailureKind, PocketBaseError, RecordNotFound, StorageError
from imagegen.models import RecordStatus
from imagegen.ops.control import open_control

from .conftest import RecordFactory, Stack, queue_state
from .test_pipeline import bucket_keys, enqueue, run_queue, wait_until, worker_running

MIB = 1024 * 1024


async def test_expired_token_triggers_one_fresh_login(pocketbase: PocketBaseClient, records: RecordFactory):
    record = await records.create("token test")
    pocketbase._token = "expired-or-forged-token"
    assert (await pocketbase.get_record(record.id)).prompt == "token test"
    assert pocketbase._token != "expired-or-forged-token"


async def test_paging_walks_every_pending_record_once(pocketbase: PocketBaseClient, records: RecordFactory):
    created = await records.many(7)
    failed, done = await records.create("failed one"), await records.create("done one")
    await pocketbase.set_status(failed.id, RecordStatus.FAILED, "boom")
    await pocketbase.set_done(done.id, ["http://example.invalid/a.png"])
    seen = [r.id async for r in pocketbase.iter_records(pocketbase.pending_filter(), page_size=3)]
    assert sorted(seen) == sorted(r.id for r in created)


async def test_unknown_record_and_wrong_password(stack: Stack, settings, http: aiohttp.ClientSession, pocketbase):
    with pytest.raises(RecordNotFound):
        await pocketbase.get_record("aaaaaaaaaaaaaaa")
    wrong = PocketBaseClient(http, stack.settings(pocketbase_password="not-the-password"))
    with pytest.raises(PocketBaseError) as caught:
        await wrong.get_record("aaaaaaaaaaaaaaa")
    assert caught.value.kind is FailureKind.ACCOUNT
    assert "not-the-password" not in str(caught.value)


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ({"tos_access_key_secret": "wrong-secret"}, "SignatureDoesNotMatch"),
        ({"tos_access_key_id": "nobody"}, "InvalidAccessKeyId"),
        ({"tos_bucket": "missing-bucket"}, "NoSuchBucket"),
    ],
)
async def test_storage_credential_and_bucket_errors_are_account_level(stack: Stack, override, words):
    settings = stack.settings(**override)
    async with open_s3_client(settings) as s3:
        storage = Storage(s3, settings)
        with pytest.raises(StorageError) as caught:
            await storage.remove_others("aaaaaaaaaaaaaaa", [])
    assert caught.value.kind is FailureKind.ACCOUNT
    assert words in str(caught.value)
    assert "wrong-secret" not in str(caught.value)


async def test_wrong_storage_secret_pauses_the_queue_and_keeps_the_generation(
    stack: Stack, records: RecordFactory, pocketbase, redis_client
):
    # One paid call at a time; the second prompt's call may run while the first stores its images.
    settings = stack.settings(tos_access_key_secret="wrong-secret", queue_concurrency=1)
    record = await records.create("an orchard")
    second = await records.create("a second orchard")
    await enqueue(settings, record.id, second.id)
    async with worker_running(settings):
        state = queue_state(settings, redis_client)
        paused = await wait_until(state.paused)
        waiting = await wait_until(lambda: _status_is(pocketbase, record.id, "queued"))
    assert paused is not None
    assert "TOS_ACCESS_KEY_SECRET" in paused.reason
    assert waiting.error.startswith("waiting: queue paused")
    # No prompt paid twice: the first once, the second at most once (a call that ran while the first stored).
    assert stack.jimeng.sandbox.generations(record.prompt) == 1
    assert stack.jimeng.sandbox.stats()["total_calls"] <= 2

    # Fixed settings and a resume: both finish, each with its one generation (a paid one is reused).
    async with open_control(stack.settings()) as control:
        await control.resume()
    await run_queue(stack.settings())
    for prompt_id in (record.id, second.id):
        assert (await pocketbase.get_record(prompt_id)).status == "done"
    assert stack.jimeng.sandbox.generations(record.prompt) == 1
    assert stack.jimeng.sandbox.generations(second.prompt) == 1


async def _status_is(pocketbase, prompt_id: str, status: str):
    record = await pocketbase.get_record(prompt_id)
    return record if record.status == status and record.error else None


async def test_large_images_stream_as_multipart_uploads(
    stack: Stack, records: RecordFactory, pocketbase, http, sandbox_config
):
    settings = stack.settings(upload_multipart_threshold=5 * MIB, download_max_bytes=64 * MIB)
    sandbox_config.huge_bytes = 12 * MIB
    record = await records.create("a very detailed panorama [[jimeng:img-huge]]")
    await enqueue(settings, record.id)
    await run_queue(settings)
    done = await pocketbase.get_record(record.id)
    assert done.status == "done", done.error
    async with http.get(done.image_url) as response:
        body = await response.read()
    assert len(body) == 12 * MIB
    assert body[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(await bucket_keys(settings)) == 4
