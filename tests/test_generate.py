"""`imagegen generate` as a user runs it: a real subprocess, one paid call, the links or the hosted images."""

from __future__ import annotations

import json
import re
from urllib.parse import urlsplit

from imagegen.clients.download import sniff_image_type
from imagegen.clients.storage import open_s3_client
from imagegen.dev.localstack import free_port
from imagegen.settings import Settings

from .conftest import Stack, run_cli
from .test_cli import assert_no_secret
from .test_pipeline import bucket_keys, fetch

ONE_OFF_KEY = re.compile(r"imagegen/generate/\d{8}T\d{6}Z-[0-9a-f]{8}-[0-3]\.(png|jpg|webp)")


def assert_error_line(stderr: str, *words: str) -> str:
    """The error is stderr's last line, one line, no traceback; returns it."""
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("imagegen: ")
    for word in words:
        assert word in last, last
    return last


async def test_generate_prints_the_apis_links_without_pocketbase_or_redis(stack: Stack, settings: Settings, http):
    dead = f"http://127.0.0.1:{free_port()}"
    result = run_cli(
        stack,
        "generate",
        "a red kite over the dunes",
        "--ratio",
        "16:9",
        "--negative",
        "blurry",
        # nothing listens there: the command needs neither
        POCKETBASE_URL=dead,
        POCKETBASE_EMAIL="",
        REDIS_PORT=str(free_port()),
    )
    assert result.returncode == 0, result.stderr
    links = result.stdout.splitlines()
    assert len(links) == 4
    fake = urlsplit(stack.jimeng.base_url).netloc
    served = stack.jimeng.sandbox.served_images("a red kite over the dunes")
    for link, original in zip(links, served, strict=True):
        assert urlsplit(link).netloc == fake
        status, _, body = await fetch(http, link)
        assert status == 200 and body == original
    [body] = stack.jimeng.sandbox.received()
    assert (body["model"], body["ratio"], body["resolution"]) == ("jimeng-4.0", "16:9", "2k")
    assert body["negative_prompt"] == "blurry"
    [announced] = result.stderr.splitlines()
    assert "spends a jimeng credit" in announced and "16:9" in announced
    assert await bucket_keys(settings) == []
    assert_no_secret(result.stdout, result.stderr)


async def test_generate_upload_hosts_the_images_and_prints_their_urls(stack: Stack, settings: Settings, http):
    result = run_cli(stack, "generate", "a lighthouse at dusk", "--upload", "--resolution", "4K")
    assert result.returncode == 0, result.stderr
    urls = result.stdout.splitlines()
    assert len(urls) == 4
    keys = await bucket_keys(settings)
    assert len(keys) == 4 and all(ONE_OFF_KEY.fullmatch(key) for key in keys), keys
    assert sorted(url.removeprefix(f"{settings.tos_public_base_url}/") for url in urls) == keys
    served = stack.jimeng.sandbox.served_images("a lighthouse at dusk")
    async with open_s3_client(settings) as s3:
        for url, original in zip(urls, served, strict=True):
            kind = sniff_image_type(original[:16])
            assert kind is not None
            key = url.removeprefix(f"{settings.tos_public_base_url}/")
            assert key.endswith("." + kind.extension)
            head = await s3.head_object(Bucket=settings.tos_bucket, Key=key)
            assert head["ContentType"] == kind.value
            status, content_type, body = await fetch(http, url)
            assert (status, content_type, body) == (200, kind.value, original)
    assert stack.jimeng.sandbox.received()[0]["resolution"] == "4k"
    assert stack.jimeng.sandbox.generations("a lighthouse at dusk") == 1


async def test_generate_json_describes_the_hosted_images(stack: Stack, settings: Settings, http):
    result = run_cli(stack, "generate", "a paper boat", "--upload", "--json", "--model", "jimeng-4.5")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["model"], report["ratio"], report["resolution"]) == ("jimeng-4.5", "1:1", "2k")
    assert report["prompt"] == "a paper boat" and report["uploaded"] is True
    assert len(report["links"]) == 4
    assert [image["url"] for image in report["images"]] == report["urls"]
    assert sorted(image["key"] for image in report["images"]) == await bucket_keys(settings)
    for image in report["images"]:
        status, content_type, body = await fetch(http, image["url"])
        assert (status, content_type, len(body)) == (200, image["content_type"], image["size"])


async def test_generate_refuses_a_bad_ratio_before_any_call(stack: Stack):
    result = run_cli(stack, "generate", "a kite", "--ratio", "5:5")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.strip() == (
        "imagegen: --ratio '5:5': must be one of 1:1, 4:3, 3:4, 16:9, 9:16, 3:2, 2:3, 21:9"
    )
    assert stack.jimeng.sandbox.received() == []


async def test_generate_reports_an_api_error_code_in_one_line(stack: Stack, settings: Settings):
    stack.jimeng.sandbox.script("a forbidden kite", ["-2006"])
    result = run_cli(stack, "generate", "a forbidden kite", "--upload")
    assert result.returncode == 3
    assert result.stdout == ""
    assert_error_line(result.stderr, "jimeng: error -2006", "content moderation")
    assert len(result.stderr.strip().splitlines()) == 2  # the credit notice, then the error
    assert len(stack.jimeng.sandbox.received()) == 1
    assert await bucket_keys(settings) == []


async def test_generate_needs_the_api_key_and_nothing_else(stack: Stack):
    result = run_cli(stack, "generate", "a kite", JIMENG_API_KEY="")
    assert result.returncode == 2
    assert result.stderr.strip() == "imagegen: JIMENG_API_KEY not set - add it to the environment or .env"
    assert stack.jimeng.sandbox.received() == []


async def test_generate_upload_checks_the_bucket_before_paying(stack: Stack):
    result = run_cli(stack, "generate", "a kite", "--upload", TOS_ENDPOINT=f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 3
    assert result.stdout == ""
    assert_error_line(result.stderr, "storage:", "imagegen-test")
    assert len(result.stderr.strip().splitlines()) == 1
    assert stack.jimeng.sandbox.received() == []
