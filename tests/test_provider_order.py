"""Providers in order (IMAGE_PROVIDERS): with every jimeng account dead the queue goes on through Ark, and Ark's
own answers (links, inline images, groups, partial successes) end as stored images on a done record."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from imagegen.clients.download import sniff_image_type
from imagegen.dev.ark_sandbox import ArkSandboxConfig, ArkSandboxThread
from imagegen.errors import ConfigError
from imagegen.settings import Settings, load_settings

from .conftest import JIMENG_KEY, RecordFactory, Stack, queue_state, run_cli, wait_for_records
from .test_pipeline import enqueue, worker_running

ARK_KEY = "ark-test-key-5e6f"


@pytest.fixture(scope="module")
def ark() -> Iterator[ArkSandboxThread]:
    with ArkSandboxThread(ArkSandboxConfig(api_key=ARK_KEY)) as running:
        yield running


@pytest.fixture(autouse=True)
def fresh_ark(ark: ArkSandboxThread) -> None:
    ark.sandbox.reset()


def with_ark(stack: Stack, ark: ArkSandboxThread, **more: object) -> Settings:
    values: dict[str, object] = {"image_providers": "jimeng,ark", "ark_api_key": ARK_KEY, "ark_base_url": ark.base_url}
    return stack.settings(**(values | more))


async def stored_types(stack: Stack, urls: list[str], http) -> list[str]:
    found = []
    for url in urls:
        async with http.get(url) as response:
            assert response.status == 200, url
            kind = sniff_image_type((await response.read())[:16])
            found.append(kind.value if kind else "not an image")
    return found


async def test_with_every_jimeng_account_dead_the_prompts_go_to_ark(
    stack: Stack, ark: ArkSandboxThread, records: RecordFactory, pocketbase, redis_client, http
):
    stack.jimeng.sandbox.expire_key(JIMENG_KEY)
    settings = with_ark(stack, ark, queue_concurrency=2, jimeng_account_concurrency=1)
    created = await records.many(6, prefix="a fallback meadow")
    await enqueue(settings, *[r.id for r in created])
    async with worker_running(settings):
        finished = await wait_for_records(pocketbase, [r.id for r in created], deadline=90)
    assert [r.status for r in finished] == ["done"] * 6
    # jimeng: one failed call set its only account aside; Ark made every image, each prompt paid once there.
    assert sum(stack.jimeng.sandbox.calls_by_key().values()) == 1
    assert [ark.sandbox.calls(r.prompt) for r in created] == [1] * 6
    assert await queue_state(settings, redis_client).paused() is None
    for record in finished:
        assert record.images == [record.image_url]
        assert "not an image" not in await stored_types(stack, record.images, http)
        assert record.image_url.startswith(settings.tos_public_base_url)
    body = ark.sandbox.received(created[0].prompt)[0]
    assert body["watermark"] is False and body["response_format"] == "url"


async def test_inline_images_of_a_group_are_stored_one_by_one(
    stack: Stack, ark: ArkSandboxThread, records: RecordFactory, pocketbase, http
):
    settings = with_ark(stack, ark, image_providers="ark", ark_response_format="b64_json", ark_max_images=4)
    record = await records.create("three lanterns [[ark:images=3]]")
    await enqueue(settings, record.id)
    async with worker_running(settings):
        [done] = await wait_for_records(pocketbase, [record.id], deadline=60)
    assert done.status == "done" and len(done.images) == 3
    assert ark.sandbox.calls(record.prompt) == 1
    served = ark.sandbox.served_images(record.prompt)
    for url, original in zip(done.images, served, strict=True):
        async with http.get(url) as response:
            assert await response.read() == original
    assert stack.jimeng.sandbox.stats()["total_calls"] == 0


async def test_a_partial_success_is_done_with_the_delivered_images_and_says_how_many_were_blocked(
    stack: Stack, ark: ArkSandboxThread, records: RecordFactory, pocketbase
):
    settings = with_ark(stack, ark, image_providers="ark", ark_max_images=4)
    record = await records.create("four kites [[ark:images=4]] [[ark:blocked=2]]")
    await enqueue(settings, record.id)
    async with worker_running(settings):
        [done] = await wait_for_records(pocketbase, [record.id], deadline=60)
    assert done.status == "done" and len(done.images) == 3
    # The fake blocks position 2 (counting from 0): the third image.
    assert done.error.startswith("1 of 4 images blocked by content moderation: image 3: OutputImageSensitiveContent")
    assert ark.sandbox.calls(record.prompt) == 1


def test_ark_in_the_providers_needs_its_key(stack: Stack, monkeypatch):
    monkeypatch.setenv("IMAGE_PROVIDERS", "jimeng,dalle")
    with pytest.raises(ConfigError, match="IMAGE_PROVIDERS"):
        load_settings(None)
    result = run_cli(stack, "status", IMAGE_PROVIDERS="ark")
    assert result.returncode == 2
    assert "IMAGE_PROVIDERS names ark but ARK_API_KEY is empty" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_covers_ark_when_it_is_a_provider(stack: Stack, ark: ArkSandboxThread):
    result = run_cli(stack, "check", IMAGE_PROVIDERS="jimeng,ark", ARK_API_KEY=ARK_KEY, ARK_BASE_URL=ark.base_url)
    assert result.returncode == 0, result.stdout
    assert "ARK_API_KEY accepted and model doubao-seedream-4-0-250828 not refused" in result.stdout
    refused = run_cli(
        stack, "check", IMAGE_PROVIDERS="jimeng,ark", ARK_API_KEY="ark-wrong-key-0000", ARK_BASE_URL=ark.base_url
    )
    assert refused.returncode == 3
    line = next(line for line in refused.stdout.splitlines() if line.startswith("ark"))
    assert "FAIL" in line and "ark-wrong-key-0000" not in refused.stdout
    assert not any(line.startswith("ark") for line in run_cli(stack, "check").stdout.splitlines())
