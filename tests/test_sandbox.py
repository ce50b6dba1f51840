"""The jimeng fake is only useful if it behaves as docs/jimeng-api.md says the real proxy does."""

from __future__ import annotations

import asyncio
import io
import json

import aiohttp
import pytest
from PIL import Image

from imagegen.clients.download import sniff_image_type
from imagegen.dev.jimeng_sandbox import PROXY_ERRORS, SandboxConfig, SandboxThread

KEY = "sandbox-test-key"


@pytest.fixture(scope="module")
def fake():
    with SandboxThread(SandboxConfig(api_key=KEY, huge_bytes=2 * 1024 * 1024)) as running:
        yield running


@pytest.fixture(autouse=True)
def fresh(fake):
    fake.sandbox.reset()


async def generate(fake, body, key: str | None = KEY, limit: float = 10):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{fake.base_url}/images/generations",
            json=body,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=limit),
        ) as response,
    ):
        text = await response.text()
        try:
            payload = json.loads(text)
        except ValueError:
            payload = {"raw": text}
        return response.status, payload, dict(response.headers)


async def test_success_returns_four_distinct_real_images(fake):
    status, payload, _ = await generate(fake, {"model": "jimeng-4.0", "prompt": "a cat", "ratio": "1:1"})
    assert status == 200
    urls = [item["url"] for item in payload["data"]]
    assert len(urls) == 4
    assert all("x-expires=" in u and "x-signature=" in u for u in urls)
    bodies, formats = [], []
    async with aiohttp.ClientSession() as session:
        for url in urls:
            async with session.get(url) as response:
                assert response.status == 200
                data = await response.read()
                image = Image.open(io.BytesIO(data))
                image.load()
                assert response.content_type == Image.MIME[str(image.format)]
                bodies.append(data)
                formats.append(image.format)
    assert len(set(bodies)) == 4
    assert set(formats) == {"PNG", "JPEG", "WEBP"}
    assert fake.sandbox.served_images("a cat") == bodies
    assert fake.sandbox.generations("a cat") == 1


@pytest.mark.parametrize(("key", "code"), [(None, -2000), ("wrong", -2002)])
async def test_auth_errors_come_as_http_200(fake, key, code):
    status, payload, _ = await generate(fake, {"prompt": "x"}, key=key)
    assert status == 200
    assert payload["code"] == code
    assert payload["data"] is None


@pytest.mark.parametrize("field", ["size", "width", "height"])
async def test_size_fields_are_rejected_with_minus_1000(fake, field):
    status, payload, _ = await generate(fake, {"prompt": "x", field: 1024})
    assert (status, payload["code"]) == (200, -1000)
    assert "ratio" in payload["message"]


@pytest.mark.parametrize("mode", sorted(PROXY_ERRORS))
async def test_every_proxy_error_code(fake, mode):
    prompt = f"p [[jimeng:{mode}]]"
    status, payload, _ = await generate(fake, {"prompt": prompt})
    assert status == 200
    assert payload == {"code": PROXY_ERRORS[mode][0], "message": PROXY_ERRORS[mode][1], "data": None}
    assert fake.sandbox.calls(prompt) == 1
    assert fake.sandbox.generations(prompt) == 0


async def test_moderation_and_risk_control_messages(fake):
    _, moderated, _ = await generate(fake, {"prompt": "[[jimeng:-2007-2038]]"})
    assert "错误码: 2038" in moderated["message"]
    _, shark, _ = await generate(fake, {"prompt": "[[jimeng:-2001-shark]]"})
    assert "shark check reject" in shark["message"]


@pytest.mark.parametrize("status", [401, 403, 429, 502, 503, 504])
async def test_gateway_http_errors_have_openai_bodies(fake, status):
    code, payload, headers = await generate(fake, {"prompt": f"[[jimeng:http-{status}]]"})
    assert code == status
    assert set(payload["error"]) == {"message", "type", "code"}
    if status == 429:
        assert headers["Retry-After"] == "2"


async def test_html_page_non_json_and_empty_data(fake):
    status, payload, _ = await generate(fake, {"prompt": "[[jimeng:html-502]]"})
    assert status == 502 and "<h1>502 Bad Gateway</h1>" in payload["raw"]
    status, payload, _ = await generate(fake, {"prompt": "[[jimeng:nonjson]]"})
    assert status == 200 and "raw" in payload
    status, payload, _ = await generate(fake, {"prompt": "[[jimeng:empty]]"})
    assert status == 200 and payload["data"] == []


async def test_dropped_and_hanging_connections(fake):
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await generate(fake, {"prompt": "[[jimeng:drop]]"})
    with pytest.raises(asyncio.TimeoutError):
        await generate(fake, {"prompt": "[[jimeng:hang]]"}, limit=0.3)


async def test_script_plays_outcomes_in_order_then_succeeds(fake):
    fake.sandbox.script("scripted", ["-2007", "http-502"])
    results = [await generate(fake, {"prompt": "scripted"}) for _ in range(3)]
    assert results[0][1]["code"] == -2007
    assert results[1][0] == 502
    assert len(results[2][1]["data"]) == 4
    assert fake.sandbox.calls("scripted") == 3
    assert fake.sandbox.generations("scripted") == 1


async def test_control_endpoints(fake):
    base = fake.base_url.removesuffix("/v1")
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{base}/_sandbox/script", json={"prompt": "c", "outcomes": ["-2009"]}) as r:
            assert r.status == 200
        async with session.post(f"{base}/_sandbox/script", json={"prompt": "c", "outcomes": ["bogus"]}) as r:
            assert r.status == 400
        await generate(fake, {"prompt": "c"})
        async with session.get(f"{base}/_sandbox/stats") as r:
            stats = await r.json()
    assert stats["calls"] == {"c": 1}
    assert stats["total_generations"] == 0


async def fetch_first_image(fake, prompt: str) -> str:
    _, payload, _ = await generate(fake, {"prompt": prompt})
    return str(payload["data"][0]["url"])


@pytest.mark.parametrize(("mode", "status"), [("img-403", 403), ("img-404", 404)])
async def test_image_link_errors(fake, mode, status):
    url = await fetch_first_image(fake, f"[[jimeng:{mode}]]")
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert response.status == status


async def test_each_link_fails_once_then_serves(fake):
    _, payload, _ = await generate(fake, {"prompt": "flaky cdn [[jimeng:img-500-once]]"})
    async with aiohttp.ClientSession() as session:
        for item in payload["data"]:
            async with session.get(item["url"]) as first:
                assert first.status == 500
            async with session.get(item["url"]) as second:
                assert second.status == 200
                assert sniff_image_type((await second.read())[:16]) is not None


async def test_generation_hook_runs_before_the_reply(fake):
    seen: list[str] = []
    fake.sandbox.on_generation = seen.append
    try:
        await generate(fake, {"prompt": "hooked"})
        await generate(fake, {"prompt": "refused [[jimeng:-2006]]"})
    finally:
        fake.sandbox.on_generation = None
    assert seen == ["hooked"]


async def test_links_expire(fake):
    url = await fetch_first_image(fake, "expiring")
    fake.sandbox.expire_links()
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert response.status == 403
        assert "expired" in await response.text()


async def test_not_an_image_huge_and_truncated_bodies(fake):
    async with aiohttp.ClientSession() as session:
        url = await fetch_first_image(fake, "[[jimeng:img-notimage]]")
        async with session.get(url) as response:
            assert response.content_type == "image/png"
            assert (await response.read()).startswith(b"<html>")
        url = await fetch_first_image(fake, "[[jimeng:img-huge]]")
        async with session.get(url) as response:
            assert response.content_length == 2 * 1024 * 1024
            assert len(await response.read()) == 2 * 1024 * 1024
        url = await fetch_first_image(fake, "[[jimeng:img-truncate]]")
        async with session.get(url) as response:
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()


async def test_models_list_requires_the_key(fake):
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{fake.base_url}/models", headers={"Authorization": f"Bearer {KEY}"}) as r:
            assert r.status == 200
            assert "jimeng-4.0" in [m["id"] for m in (await r.json())["data"]]
        async with session.get(f"{fake.base_url}/models") as r:
            assert r.status == 401


async def test_latency_is_applied(fake):
    fake.sandbox.config.latency = 0.2
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        _, payload, _ = await generate(fake, {"prompt": "slow one"})
        assert loop.time() - started >= 0.2
        assert len(payload["data"]) == 4
    finally:
        fake.sandbox.config.latency = 0.0


async def test_call_spans_record_each_counted_call(fake):
    fake.sandbox.config.latency = 0.2
    try:
        await asyncio.gather(generate(fake, {"prompt": "span a"}), generate(fake, {"prompt": "span b"}))
        await generate(fake, {"prompt": "[[jimeng:-2007]] span c"})
    finally:
        fake.sandbox.config.latency = 0.0
    spans = fake.sandbox.call_spans()
    assert len(spans) == 3
    assert all(end - start >= 0.2 for start, end in spans)
    assert spans[2][0] >= max(end for _, end in spans[:2])
    fake.sandbox.reset()
    assert fake.sandbox.call_spans() == []


async def test_shared_images_are_drawn_once_and_served_for_every_call(fake):
    fake.sandbox.config.distinct_images = False
    try:
        for prompt in ("a shared cat", "a shared dog"):
            status, payload, _ = await generate(fake, {"prompt": prompt})
            assert status == 200 and len(payload["data"]) == 4
        assert fake.sandbox.served_images("a shared cat") == fake.sandbox.served_images("a shared dog")
        assert len(set(fake.sandbox.served_images("a shared cat"))) == 4
    finally:
        fake.sandbox.config.distinct_images = True
