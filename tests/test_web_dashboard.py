"""The dashboard in a real browser (Debian's headless Chromium driven by Playwright) against `imagegen serve`,
a real worker and the real services: what an operator sees and what the buttons do."""

from __future__ import annotations

import re
import shutil
from collections.abc import AsyncIterator

import pytest
from playwright.async_api import Dialog, Page, async_playwright, expect

from .conftest import RecordFactory, Stack, run_cli
from .test_pipeline import wait_until
from .test_web_serve import TOKEN, Served, served

__all__ = ["served"]  # the fixture, used here by name

CHROMIUM = shutil.which("chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SEEN_WITHIN_MS = 30_000

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (make setup installs it with apt-get)"
)


@pytest.fixture
async def page(served: Served) -> AsyncIterator[Page]:
    assert CHROMIUM is not None
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page()
            expect.set_options(timeout=SEEN_WITHIN_MS)
            await page.goto(served.url)
            # The API answers 401 without the token: the dashboard asks for it and keeps it.
            await expect(page.locator("#token-form")).to_be_visible()
            await page.fill("#token-input", TOKEN)
            await page.click("#token-form button[type=submit]")
            await expect(page.locator("#token-form")).to_be_hidden()
            yield page
        finally:
            await browser.close()


async def count(page: Page, name: str, value: int) -> None:
    await expect(page.locator(f"#count-{name}")).to_have_text(str(value))


@pytest.mark.timeout(300)
async def test_dashboard_counts_thumbnails_pause_resume_and_retry(
    page: Page, stack: Stack, records: RecordFactory, start_worker, pocketbase
):
    sandbox = stack.jimeng.sandbox
    start_worker()
    first, second = await records.create("a red kite"), await records.create("a blue kite")
    await records.create("still pending")
    await count(page, "pending", 3)
    assert run_cli(stack, "add", first.id, second.id).returncode == 0

    # Counts follow the work without a reload.
    await count(page, "done", 2)
    await count(page, "pending", 1)
    await expect(page.locator("#workers")).to_have_text("1")
    await expect(page.locator("#hour-figures")).to_contain_text("2 done, 0 failed")
    await expect(page.locator("#spend-today")).to_have_text("2")  # jimeng calls today, no daily limit

    # A done job's view: its prompt and four thumbnails that really load from the S3 server.
    await page.click("#tabs button[data-state=done]")
    await page.click(f'#task-rows tr[data-id="{first.id}"]')
    await expect(page.locator("#task-prompt")).to_have_text("a red kite")
    # Each stage it went through, with its time.
    stages = page.locator("#task-stages tr td:first-child")
    await expect(stages).to_have_text(["queued", "generating", "downloading", "uploading", "saving"])
    await expect(page.locator("#task-facts")).to_contain_text("done since")
    await expect(page.locator("#task-images img")).to_have_count(4)
    for src in await page.locator("#task-images img").evaluate_all("imgs => imgs.map(i => i.src)"):
        assert src.startswith(stack.settings().tos_public_base_url)
    await page.wait_for_function(
        "() => [...document.querySelectorAll('#task-images img')].every(i => i.complete && i.naturalWidth > 0)"
    )

    # Pause asks for a reason, shows the banner, and no new generation starts.
    async def give_reason(dialog: Dialog) -> None:
        await dialog.accept("rotating the API key")

    page.once("dialog", give_reason)
    await page.click("#pause-btn")
    banner = page.locator("#paused-banner")
    await expect(banner).to_be_visible()
    await expect(banner).to_contain_text("rotating the API key")
    held = await records.create("a kite held by the pause")
    assert run_cli(stack, "add", held.id).returncode == 0
    # The worker has taken the job and holds it before its paid call, waiting for a resume.
    await expect(page.locator("#jobs-waiting")).to_have_text("1")
    assert sandbox.calls(held.prompt) == 0
    assert (await pocketbase.get_record(held.id)).status == "queued"

    # Resume clears the banner and the held job runs.
    await page.click("#banner-resume-btn")
    await expect(banner).to_be_hidden()
    await count(page, "done", 3)
    assert sandbox.calls(held.prompt) == 1

    # A job refused by moderation fails at once; Retry in its view brings it to done.
    refused = await records.create("a kite the moderation refuses once")
    sandbox.script(refused.prompt, ["-2006"])
    assert run_cli(stack, "add", refused.id).returncode == 0
    await count(page, "failed", 1)
    await page.click("#tabs button[data-state=failed]")
    await page.click(f'#task-rows tr[data-id="{refused.id}"]')
    await expect(page.locator("#task-error")).to_contain_text("moderation")
    await page.click("#task-retry-btn")
    await count(page, "failed", 0)
    await count(page, "done", 4)
    await expect(page.locator("#task-images img")).to_have_count(4)
    assert await wait_until(lambda: _done(pocketbase, refused.id), deadline=10)
    await expect(page.locator("#hour-figures")).to_contain_text("4 done, 1 failed")
    # Five calls in all today: four delivered images, one refused by moderation.
    await expect(page.locator("#spend-today")).to_have_text("5")
    await expect(page.locator("#spend-today")).to_have_attribute(
        "title", re.compile(r"4 images, 1 moderated, 0 failed$")
    )


async def _done(pocketbase, prompt_id: str) -> bool:
    record = await pocketbase.get_record(prompt_id)
    return bool(record.status == "done")


async def test_search_narrows_the_list_by_prompt_text(page: Page, records: RecordFactory):
    await records.many(3, prefix="a lighthouse")
    kite = await records.create("a kite over the dunes")
    await page.click("#tabs button[data-state=pending]")
    await expect(page.locator("#task-rows tr")).to_have_count(4)
    await page.fill("#search", "dunes")
    await expect(page.locator("#task-rows tr")).to_have_count(1)
    await expect(page.locator(f'#task-rows tr[data-id="{kite.id}"]')).to_be_visible()
