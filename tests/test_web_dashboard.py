"""The dashboard in a real browser (Debian's headless Chromium driven by Playwright) against `imagegen serve`,
a real worker and the real services: what an operator sees and what the buttons do."""

from __future__ import annotations

import re
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from playwright.async_api import Browser, Dialog, Page, async_playwright, expect

from imagegen.errors import FailureKind, JimengError
from imagegen.queue.accounts import AccountPool, AccountState, accounts_of
from imagegen.queue.keys import RedisKeys

from .conftest import JIMENG_KEY, RecordFactory, Stack, run_cli
from .test_pipeline import wait_until
from .test_spend import spend_of
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


@asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    assert CHROMIUM is not None
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            expect.set_options(timeout=SEEN_WITHIN_MS)
            yield browser
        finally:
            await browser.close()


@pytest.fixture
async def page(served: Served) -> AsyncIterator[Page]:
    async with chromium() as browser:
        page = await browser.new_page()
        await page.goto(served.url)
        # The API answers 401 without the token: the dashboard asks for it and keeps it.
        await expect(page.locator("#token-form")).to_be_visible()
        await page.fill("#token-input", TOKEN)
        await page.click("#token-form button[type=submit]")
        await expect(page.locator("#token-form")).to_be_hidden()
        yield page


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
    await expect(page.locator("#spend-today")).to_have_text("jimeng 2")  # paid calls today, no daily limit

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
    await expect(page.locator("#spend-today")).to_have_text("jimeng 5")
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


# Whether any label of the hour's chart overlaps a bar (each as the browser lays it out).
LABELS_OVERLAP_BARS = """() => {
  const boxes = (selector) => [...document.querySelectorAll(selector)].map((node) => node.getBBox());
  const meet = (a, b) => a.x < b.x + b.width && b.x < a.x + a.width && a.y < b.y + b.height && b.y < a.y + a.height;
  const bars = boxes("#chart rect");
  return bars.length > 0 && boxes("#chart text").some((label) => bars.some((bar) => meet(label, bar)));
}"""
ALL_LOADED = "(imgs) => imgs.length > 0 && imgs.every((img) => img.complete && img.naturalWidth > 0)"


@pytest.mark.timeout(300)
async def test_the_first_view_shows_the_latest_work_with_its_images_and_the_failure_marked(
    served: Served, stack: Stack, records: RecordFactory, start_worker, pocketbase
):
    sandbox = stack.jimeng.sandbox
    start_worker()
    done = [await records.create("a red kite over the sea"), await records.create("a blue kite over the dunes")]
    assert run_cli(stack, "add", *(r.id for r in done)).returncode == 0
    assert await wait_until(lambda: _all_done(pocketbase, [r.id for r in done]), deadline=60)
    refused = await records.create("a kite the moderation refuses")
    sandbox.script(refused.prompt, ["-2006"])
    assert run_cli(stack, "add", refused.id).returncode == 0
    assert await wait_until(lambda: _status_is(pocketbase, refused.id, "failed"), deadline=60)
    assert run_cli(stack, "pause", "--reason", "rotating the API key").returncode == 0
    held = await records.create("a kite held by the pause")
    assert run_cli(stack, "add", held.id).returncode == 0

    async with chromium() as browser:
        page = await browser.new_page()
        await page.goto(served.url)
        # The token as the dashboard keeps it (in the browser's local storage), so the first view needs no click.
        await page.evaluate("token => localStorage.setItem('imagegen.apiToken', token)", TOKEN)
        await page.reload()

        await expect(page.locator("#tabs button[data-state=recent]")).to_have_attribute("aria-pressed", "true")
        rows = page.locator("#task-rows tr")
        await expect(rows).to_have_count(4)
        # Newest first, across states: the held one was queued last, the refused one failed before it.
        order = await rows.evaluate_all("rows => rows.map((row) => row.dataset.id)")
        assert order[:2] == [held.id, refused.id] and sorted(order[2:]) == sorted(r.id for r in done)
        await expect(page.locator(f'#task-rows tr[data-id="{held.id}"] td:nth-child(3)')).to_have_text("queued")
        for record in done:
            await expect(page.locator(f'#task-rows tr[data-id="{record.id}"]')).to_contain_text(record.prompt)
            thumb = page.locator(f'#thumb-strip a[data-id="{record.id}"] img')
            await expect(thumb).to_have_count(1)
            await expect(thumb).to_have_attribute("loading", "lazy")
            assert (await thumb.get_attribute("src") or "").startswith(stack.settings().tos_public_base_url)
            assert (await thumb.bounding_box() or {"width": 999})["width"] <= 128  # a thumbnail, not the image
        await page.wait_for_function(
            f"() => ({ALL_LOADED})([...document.querySelectorAll('#thumb-strip img')])", timeout=SEEN_WITHIN_MS
        )
        # The failure stands out: its row marked, its status and its error in the list.
        failed_row = page.locator(f'#task-rows tr[data-id="{refused.id}"]')
        await expect(failed_row).to_have_class(re.compile(r"\brow-failed\b"))
        await expect(failed_row.locator("td:nth-child(3)")).to_have_text("failed")
        await expect(failed_row).to_contain_text("moderation")
        await expect(page.locator("#count-failed")).to_have_class(re.compile(r"\balert\b"))
        # So does the pause, with its reason.
        await expect(page.locator("#paused-banner")).to_be_visible()
        await expect(page.locator("#paused-reason")).to_have_text("rotating the API key")
        # The chart's labels stand clear of its bars (three jobs in the same minute reach the top).
        await expect(page.locator("#hour-figures")).to_contain_text("2 done, 1 failed")
        assert await page.evaluate(LABELS_OVERLAP_BARS) is False
        # Each state's own list is one click away.
        await page.click("#tabs button[data-state=failed]")
        await expect(rows).to_have_count(1)
        await expect(page.locator(f'#task-rows tr[data-id="{refused.id}"]')).to_be_visible()

        # A done job offers to generate it again (saying it costs a paid call), not Retry.
        await page.click("#banner-resume-btn")
        await expect(page.locator("#paused-banner")).to_be_hidden()
        await page.click("#tabs button[data-state=recent]")
        await page.click(f'#task-rows tr[data-id="{done[0].id}"]')
        await expect(page.locator("#task-prompt")).to_have_text(done[0].prompt)
        await expect(page.locator("#task-retry-btn")).to_be_hidden()
        regenerate = page.locator("#task-regenerate-btn")
        await expect(regenerate).to_be_visible()
        await expect(regenerate).to_contain_text("paid call")

        asked: list[str] = []

        async def accept(dialog: Dialog) -> None:
            asked.append(dialog.message)
            await dialog.accept()

        page.once("dialog", accept)
        await regenerate.click()
        assert await wait_until(lambda: _calls_at_least(sandbox, done[0].prompt, 2), deadline=60)
        assert "one more paid jimeng call" in asked[0]
        assert await wait_until(lambda: _all_done(pocketbase, [done[0].id]), deadline=60)
        await expect(page.locator("#task-images img")).to_have_count(4)


async def _all_done(pocketbase, ids: list[str]) -> bool:
    return all(record.status == "done" for record in [await pocketbase.get_record(i) for i in ids])


async def _status_is(pocketbase, prompt_id: str, status: str) -> bool:
    return bool((await pocketbase.get_record(prompt_id)).status == status)


async def _calls_at_least(sandbox, prompt: str, count: int) -> bool:
    return bool(sandbox.calls(prompt) >= count)


async def test_the_accounts_card_shows_an_account_set_aside_with_until_when(page: Page, stack: Stack, redis_client):
    settings = stack.settings()
    spend = spend_of(settings, redis_client)
    pool = AccountPool(redis_client, RedisKeys(settings.queue_name), accounts_of(settings.jimeng_keys()), spend)
    [account] = pool.accounts
    row = page.locator(f'#account-rows tr[data-fingerprint="{account.fingerprint}"]')
    await expect(row.locator("td:nth-child(4)")).to_have_text("healthy")
    await expect(row).not_to_have_class(re.compile(r"\baccount-aside\b"))

    await expect(row.locator("td:nth-child(6)")).to_have_text("–")  # no credits read yet

    empty = JimengError("error -2009: out of credits", kind=FailureKind.ACCOUNT, code=-2009)
    assert await pool.failed(account, empty) is AccountState.NO_CREDITS
    await pool.note_credits({account.fingerprint: 0})  # as a worker's credit watch reads them
    # The card follows without a reload: provider, label, fingerprint, the state with when it ends, calls, credits.
    await expect(row.locator("td")).to_have_text(
        ["jimeng", account.label, account.fingerprint, re.compile(r"^out of credits until .+"), "0", "0"]
    )
    midnight = spend.day_end(spend.day()) * 1000  # the day turns in JIMENG_DAILY_LIMIT_TZ (UTC here)
    until = await page.evaluate("(ms) => new Date(ms).toLocaleString()", midnight)
    await expect(row.locator("td:nth-child(4)")).to_have_text(f"out of credits until {until}")
    await expect(row.locator("td:nth-child(4)")).to_have_attribute("title", "error -2009: out of credits")
    await expect(row).to_have_class(re.compile(r"\baccount-aside\b"))
    await expect(page.locator("#accounts-summary")).to_have_text("1 in all, 1 set aside")
    assert JIMENG_KEY not in await page.content()
