"""Another site's page against `imagegen serve` in a real browser (headless Chromium): with no API_TOKEN (the
one-machine setup the README suggests), a page the operator happens to open tries every write, as the simple
requests a page may send without asking and as JSON fetches, and a DNS-rebinding name tries to read. Nothing
changes in Redis or PocketBase and nothing is read."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import requests
from aiohttp import web
from playwright.async_api import Browser, async_playwright

from imagegen.dev.localstack import free_port
from imagegen.models import RecordStatus

from .conftest import RecordFactory, Stack, run_cli
from .test_web_dashboard import CHROMIUM, CHROMIUM_ARGS
from .test_web_serve import Served, start_serving

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (make setup installs it with apt-get)"
)

# The attacking page: each write as a no-cors simple request (text/plain, a form's encoding, no body at all),
# as a beacon, and as a JSON fetch (which needs a CORS preflight first); it sets its title when all are sent.
ATTACK_PAGE = """<!doctype html><html><head><title>working</title></head><body><script>
const target = TARGET;
const writes = WRITES;
async function attempt(path, body) {
  const url = target + path;
  const tries = [
    () => fetch(url, {method: "POST", mode: "no-cors", headers: {"Content-Type": "text/plain"}, body}),
    () => fetch(url, {method: "POST", mode: "no-cors",
                      headers: {"Content-Type": "application/x-www-form-urlencoded"}, body}),
    () => fetch(url, {method: "POST", mode: "no-cors"}),
    () => fetch(url, {method: "POST", headers: {"Content-Type": "application/json"}, body}),
    () => fetch(url, {method: "POST", credentials: "include", headers: {"Content-Type": "application/json"}, body}),
    () => navigator.sendBeacon(url, body),
  ];
  for (const one of tries) {
    try { await one(); } catch (_) {}
  }
}
(async () => {
  for (const [path, body] of writes) await attempt(path, JSON.stringify(body));
  let read = "nothing";
  try { read = await (await fetch(target + "/api/tasks?state=pending")).text(); } catch (_) {}
  document.body.dataset.read = read;
  document.title = "done";
})();
</script></body></html>"""


async def serve_attack_page(port: int, target: str, writes: list[tuple[str, object]]) -> web.AppRunner:
    page = ATTACK_PAGE.replace("TARGET", json.dumps(target)).replace("WRITES", json.dumps(writes))

    async def index(request: web.Request) -> web.Response:
        return web.Response(text=page, content_type="text/html")

    app = web.Application()
    app.router.add_get("/", index)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


@pytest.fixture
def open_server(stack: Stack, tmp_path: Path) -> Iterator[Served]:
    # No API_TOKEN: on loopback every caller may use the API, so only the cross-site rules stand in the way.
    server = start_serving(stack, tmp_path / "serve.log")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    assert CHROMIUM is not None
    async with async_playwright() as playwright:
        # evil.example resolves to this machine, as a DNS-rebinding attacker makes it resolve.
        args = [*CHROMIUM_ARGS, "--host-resolver-rules=MAP evil.example 127.0.0.1"]
        launched = await playwright.chromium.launch(executable_path=CHROMIUM, args=args)
        try:
            yield launched
        finally:
            await launched.close()


def queue_summary(served: Served) -> dict[str, object]:
    answer = requests.get(f"{served.url}/api/queue", timeout=10)
    assert answer.status_code == 200
    summary: dict[str, object] = answer.json()
    return summary


async def run_attack(browser: Browser, target: str, writes: list[tuple[str, object]], origin_host: str) -> str:
    port = free_port()
    runner = await serve_attack_page(port, target, writes)
    try:
        page = await browser.new_page()
        await page.goto(f"http://{origin_host}:{port}/")
        await page.wait_for_function("document.title === 'done'", timeout=60_000)
        read = await page.evaluate("document.body.dataset.read")
        await page.close()
        return str(read)
    finally:
        await runner.cleanup()


@pytest.mark.timeout(180)
async def test_another_sites_page_changes_nothing(
    open_server: Served, browser: Browser, stack: Stack, records: RecordFactory, pocketbase
):
    pending = await records.create("a pending prompt no other site may queue")
    done = await records.create("a done prompt no other site may pay for again")
    await pocketbase.update_record(done.id, {"status": "done", "imageUrl": "https://cdn.example/done.png"})
    failed = await records.create("a failed prompt no other site may retry")
    await pocketbase.update_record(failed.id, {"status": "failed", "error": "moderation"})
    writes: list[tuple[str, object]] = [
        ("/api/queue/pause", {"reason": "paused by another site"}),
        ("/api/tasks/enqueue-pending", {}),
        ("/api/tasks", {"ids": [done.id, pending.id], "force": True}),
        ("/api/tasks/retry-failed", {}),
        (f"/api/tasks/{failed.id}/retry", {}),
    ]
    # From a cross-site origin (localhost vs 127.0.0.1 are different sites to a browser) and from a same-site
    # one (another port of the same address): both are another origin.
    for origin_host in ("localhost", "127.0.0.1"):
        read = await run_attack(browser, open_server.url, writes, origin_host)
        assert pending.prompt not in read  # the answer of a cross-origin read never reaches the page
    summary = queue_summary(open_server)
    assert summary["paused"] is None
    assert summary["jobs"] == {"queued": 0, "deferred": 0, "in_progress": 0, "waiting": 0}
    statuses = {r.id: r.status for r in [await pocketbase.get_record(i) for i in (pending.id, done.id, failed.id)]}
    assert statuses == {pending.id: RecordStatus.PENDING, done.id: RecordStatus.DONE, failed.id: RecordStatus.FAILED}
    assert stack.jimeng.sandbox.stats()["calls"] == {}

    # A pause the operator set is not lifted by another site either.
    assert run_cli(stack, "pause", "--reason", "the operator's own pause").returncode == 0
    await run_attack(browser, open_server.url, [("/api/queue/resume", {})], "localhost")
    paused = queue_summary(open_server)["paused"]
    assert isinstance(paused, dict) and paused["reason"] == "the operator's own pause"


@pytest.mark.timeout(120)
async def test_a_rebound_host_name_reads_nothing(open_server: Served, browser: Browser, records: RecordFactory):
    record = await records.create("a prompt a rebinding page wants to read")
    port = open_server.url.rsplit(":", 1)[1]
    page = await browser.new_page()
    for path in ("/", "/api/queue", "/api/tasks?state=pending", f"/api/tasks/{record.id}"):
        response = await page.goto(f"http://evil.example:{port}{path}")
        assert response is not None
        assert response.status == 421, path
        assert record.prompt not in await page.content()
    # The same server by its own name still answers the browser.
    response = await page.goto(f"http://localhost:{port}/api/tasks?state=pending")
    assert response is not None and response.status == 200
    assert record.prompt in await page.content()
