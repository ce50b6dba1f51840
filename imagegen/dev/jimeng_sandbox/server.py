"""A jimeng-compatible image API on this machine: the fake of the tests and the sandbox of the local stack.

`POST /v1/images/generations` answers like the OpenAI-compatible proxy (errors as HTTP 200 with a negative
`code`), `GET /img/<token>` serves the generated images until their links expire, `GET /v1/models` lists
models. Control endpoints under `/_sandbox/` (no auth) script outcomes and read the counters that tests use
to assert "generated exactly once".
"""

from __future__ import annotations

import asyncio
import random
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from imagegen.models import ImageType

from .modes import (
    EXPIRED_BODY,
    HTTP_ERRORS,
    PROXY_ERRORS,
    TRANSIENT_MODES,
    is_known,
    marker_mode,
    network_fault,
)
from .render import FORMAT_CYCLE, render_image
from .scripts import ANY_PROMPT, OutcomeScripts
from .site import serve_app
from .tally import PromptTally

# Where the sandbox process reads the bearer key it requires (kept out of its command line).
SANDBOX_KEY_ENV = "IMAGEGEN_SANDBOX_API_KEY"
_REJECTED_FIELDS = ("size", "width", "height")
RECEIVED_KEPT = 10_000


@dataclass
class SandboxConfig:
    api_key: str
    latency: float = 0.0
    jitter: float = 0.0
    image_latency: float = 0.0
    images_per_call: int = 4
    image_size: int = 256
    link_ttl: float = 3 * 3600
    retry_after: int = 2
    huge_bytes: int = 64 * 1024 * 1024
    fail_rate: float = 0.0
    seed: int = 0
    public_base: str | None = None
    # False: every call serves the same images, drawn once (benchmarks: the fake then costs next to no CPU).
    distinct_images: bool = True
    # More accounts besides `api_key`'s, each its own web session with its own credits and expiry.
    extra_keys: tuple[str, ...] = ()
    # Credits of each account a day (one per call with images); None: never runs out. `/token/receive`
    # brings an account back to this many.
    daily_credits: int | None = None


@dataclass
class SandboxAccount:
    """One jimeng account the sandbox knows: its session may expire and its credits run out."""

    credits: int | None
    expired: bool = False
    calls: int = 0


@dataclass
class HostedImage:
    prompt: str
    fmt: ImageType
    data: bytes
    expires: float
    mode: str
    failures_left: int = 0


class JimengSandbox:
    """State (images, scripts, counters) and the aiohttp application; safe to read from another thread."""

    def __init__(self, config: SandboxConfig) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._random = random.Random(config.seed)
        # Bounded: the local stack's sandbox runs for days.
        self._tally = PromptTally(RECEIVED_KEPT)
        self._images: dict[str, HostedImage] = {}
        self._scripts = OutcomeScripts(is_known, "sandbox")
        self._shared: list[bytes] | None = None
        # Called with the prompt in the server's thread once a paid generation is decided, before its reply leaves.
        self.on_generation: Callable[[str], None] | None = None
        # While set, generation calls wait before they are counted (a client that goes away meanwhile pays nothing).
        self.holding = False
        self._inflight = 0
        self._peak_inflight = 0
        self._call_starts: dict[str, list[float]] = {}
        self._call_spans: list[tuple[float, float]] = []
        self.base_url = ""
        self._accounts = self._new_accounts()
        self.app = web.Application()
        self.app.add_routes(
            [
                web.post("/v1/images/generations", self._generate),
                web.get("/v1/models", self._models),
                web.post("/token/check", self._token_check),
                web.post("/token/points", self._token_points),
                web.post("/token/receive", self._token_receive),
                web.get("/img/{token}", self._image),
                web.get("/_sandbox/stats", self._stats),
                web.post("/_sandbox/reset", self._reset),
                web.post("/_sandbox/script", self._script),
                web.post("/_sandbox/expire", self._expire),
            ]
        )

    # --- Python API, for tests in the same process ---
    def script(self, prompt: str, outcomes: list[str]) -> None:
        """Queue outcomes (e.g. ["-2007", "ok"]) for the next calls with this prompt ("*": any prompt)."""
        self._scripts.add(prompt, outcomes)

    def _new_accounts(self) -> dict[str, SandboxAccount]:
        keys = (self.config.api_key, *self.config.extra_keys)
        return {key: SandboxAccount(self.config.daily_credits) for key in keys}

    def expire_key(self, key: str) -> None:
        """The account's session ends: every call with its key answers -2002 from now on."""
        with self._lock:
            self._accounts[key].expired = True

    def add_account(self, key: str, credits: int | None = None) -> None:
        """Another account, with `credits` left today (None: never runs out)."""
        with self._lock:
            self._accounts[key] = SandboxAccount(credits)

    def set_credits(self, key: str, credits: int | None) -> None:
        with self._lock:
            self._accounts[key].credits = credits

    def credits_of(self, key: str) -> int | None:
        with self._lock:
            return self._accounts[key].credits

    def calls_by_key(self) -> dict[str, int]:
        """Generation calls each account received (refused ones too)."""
        with self._lock:
            return {key: account.calls for key, account in self._accounts.items()}

    def reset(self) -> None:
        with self._lock:
            self._accounts = self._new_accounts()
            self._tally.clear()
            self._images.clear()
            self._scripts.clear()
            self._call_starts.clear()
            self._call_spans.clear()
            self._peak_inflight = self._inflight
        self.on_generation = None
        self.holding = False

    def expire_links(self) -> None:
        with self._lock:
            for image in self._images.values():
                image.expires = 0.0

    def reset_peak(self) -> None:
        """Start measuring the most concurrent calls afresh (calls in flight count at once)."""
        with self._lock:
            self._peak_inflight = self._inflight

    def calls(self, prompt: str) -> int:
        """Generation calls received for this prompt, failed ones included."""
        with self._lock:
            return self._tally.calls[prompt]

    def call_starts(self, prompt: str) -> list[float]:
        """When each generation call for this prompt arrived (wall clock)."""
        with self._lock:
            return list(self._call_starts.get(prompt, []))

    def call_spans(self) -> list[tuple[float, float]]:
        """(start, end) wall-clock times of every counted generation call that has ended, in order of ending:
        how busy the API was kept."""
        with self._lock:
            return list(self._call_spans)

    def received(self, prompt: str | None = None) -> list[Any]:
        """The JSON bodies of the generation requests received (for `prompt`, or all; the latest RECEIVED_KEPT),
        refused ones too."""
        with self._lock:
            return self._tally.bodies(prompt)

    def generations(self, prompt: str) -> int:
        """Calls for this prompt that returned images: the paid ones."""
        with self._lock:
            return self._tally.made[prompt]

    def served_images(self, prompt: str) -> list[bytes]:
        """The image bytes of the latest successful generation for this prompt, in link order."""
        with self._lock:
            return list(self._tally.served.get(prompt, []))

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "calls": dict(self._tally.calls),
                "generations": dict(self._tally.made),
                "downloads": dict(self._tally.downloads),
                "total_calls": sum(self._tally.calls.values()),
                "total_generations": sum(self._tally.made.values()),
                "total_downloads": sum(self._tally.downloads.values()),
                "inflight": self._inflight,
                "peak_inflight": self._peak_inflight,
            }

    # --- the API ---
    def _choose(self, prompt: str) -> str:
        scripted = self._scripts.take(prompt)
        if scripted is not None:
            return scripted
        with self._lock:
            marked = marker_mode(prompt)
            if marked is not None:
                return marked
            if self.config.fail_rate and self._random.random() < self.config.fail_rate:
                return self._random.choice(TRANSIENT_MODES)
        return "ok"

    @staticmethod
    def _proxy_error(code: int, message: str) -> web.Response:
        return web.json_response({"code": code, "message": message, "data": None})

    def _keys_of(self, request: web.Request) -> list[str]:
        auth = request.headers.get("Authorization", "")
        return [key.strip() for key in auth.removeprefix("Bearer ").split(",") if key.strip()]

    def _account_of(self, request: web.Request) -> tuple[str, SandboxAccount | None]:
        """The account a call uses: given several keys, the proxy picks one at random, with no health check."""
        keys = self._keys_of(request)
        with self._lock:
            key = self._random.choice(keys) if keys else ""
            return key, self._accounts.get(key)

    def _check_request(self, request: web.Request, payload: Any) -> web.Response | SandboxAccount:
        """The refusal of a request, or the account it uses."""
        if not request.headers.get("Authorization", ""):
            return self._proxy_error(-2000, "缺少 Authorization 请求头 (missing Authorization)")
        _, account = self._account_of(request)
        if account is not None:
            with self._lock:
                account.calls += 1
        if account is None or account.expired:
            return self._proxy_error(-2002, "[登录失效]: login error (ret 1015), 请重新获取 sessionid")
        if account.credits is not None and account.credits <= 0:
            code, message = PROXY_ERRORS["-2009"]
            return self._proxy_error(code, message)
        if not isinstance(payload, dict):
            return self._proxy_error(-2000, "请求体必须是 JSON 对象")
        rejected = [f for f in _REJECTED_FIELDS if f in payload]
        if rejected:
            return self._proxy_error(-1000, f"不支持的参数: {', '.join(rejected)}, 请使用 ratio 和 resolution 参数")
        if not isinstance(payload.get("prompt"), str) or not payload["prompt"].strip():
            return self._proxy_error(-2000, "请求参数非法: prompt 不能为空")
        return account

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        try:
            payload = await request.json()
        except ValueError:
            payload = None
        with self._lock:
            self._tally.received.append(payload)
        account = self._check_request(request, payload)
        if isinstance(account, web.Response):
            return account
        prompt: str = payload["prompt"]
        while self.holding:  # noqa: ASYNC110 - set from the test's thread, where an asyncio.Event can't be
            await asyncio.sleep(0.01)
        started = time.time()
        with self._lock:
            self._tally.calls[prompt] += 1
            self._call_starts.setdefault(prompt, []).append(started)
            self._inflight += 1
            self._peak_inflight = max(self._peak_inflight, self._inflight)
        rendering: asyncio.Future[list[bytes]] | None = None
        try:
            mode = self._choose(prompt)
            delay = self.config.latency + self._random.uniform(0, self.config.jitter)
            if mode.startswith("slow:"):
                delay += float(mode[5:])
            if self._makes_images(mode) and not self.config.distinct_images:
                rendering = asyncio.get_running_loop().create_future()
                rendering.set_result(self._shared_set())
            elif self._makes_images(mode):
                # Drawn in a thread while the latency runs, like the real service's own work: the fake's event
                # loop never stalls on it, so other calls start and end on time.
                rendering = asyncio.ensure_future(asyncio.to_thread(self._render_set, prompt))
            if delay:
                await asyncio.sleep(delay)
            response = await self._play(request, prompt, mode, rendering)
            if self._makes_images(mode) and account.credits is not None:
                with self._lock:
                    account.credits -= 1
            return response
        finally:
            if rendering is not None and not rendering.done():
                rendering.cancel()
            with self._lock:
                self._inflight -= 1
                self._call_spans.append((started, time.time()))

    @staticmethod
    def _makes_images(mode: str) -> bool:
        return not (
            mode in PROXY_ERRORS or mode in HTTP_ERRORS or mode in ("html-502", "nonjson", "empty", "hang", "drop")
        )

    def _shared_set(self) -> list[bytes]:
        if self._shared is None or len(self._shared) != self.config.images_per_call:
            self._shared = self._render_set("the same image for every call")
        return self._shared

    def _render_set(self, prompt: str) -> list[bytes]:
        salt = secrets.token_hex(4)
        return [
            render_image(prompt, index, FORMAT_CYCLE[index % len(FORMAT_CYCLE)], self.config.image_size, salt)
            for index in range(self.config.images_per_call)
        ]

    async def _play(
        self, request: web.Request, prompt: str, mode: str, rendering: asyncio.Future[list[bytes]] | None
    ) -> web.StreamResponse:
        if mode in PROXY_ERRORS:
            code, message = PROXY_ERRORS[mode]
            return self._proxy_error(code, message)
        if mode in HTTP_ERRORS:
            status, kind = HTTP_ERRORS[mode]
            headers = {"Retry-After": str(self.config.retry_after)} if status == 429 else {}
            body = {"error": {"message": f"gateway: {kind.replace('_', ' ')}", "type": kind, "code": status}}
            return web.json_response(body, status=status, headers=headers)
        if mode == "nonjson":
            return web.Response(text="upstream error: please retry later", content_type="text/plain")
        if mode == "empty":
            return web.json_response({"created": int(time.time()), "data": []})
        fault = await network_fault(request, mode)
        if fault is not None:
            return fault
        assert rendering is not None
        images = await rendering
        return web.json_response({"created": int(time.time()), "data": self._new_images(request, prompt, mode, images)})

    def _new_images(self, request: web.Request, prompt: str, mode: str, images: list[bytes]) -> list[dict[str, str]]:
        base = self.config.public_base or f"{request.scheme}://{request.host}"
        expires = time.time() + self.config.link_ttl
        links, served = [], []
        for index, data in enumerate(images):
            fmt = FORMAT_CYCLE[index % len(FORMAT_CYCLE)]
            token = secrets.token_hex(12)
            failures = 1 if mode == "img-500-once" else 0
            with self._lock:
                self._images[token] = HostedImage(prompt, fmt, data, expires, mode, failures)
            served.append(data)
            # The second link carries a misleading extension: clients must sniff the bytes.
            extension = "png" if index == 1 else fmt.extension
            signature = secrets.token_hex(16)
            links.append({"url": f"{base}/img/{token}.{extension}?x-expires={int(expires)}&x-signature={signature}"})
        with self._lock:
            self._tally.made[prompt] += 1
            self._tally.served[prompt] = served
        if self.on_generation is not None:
            self.on_generation(prompt)
        return links

    async def _models(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {self.config.api_key}":
            return web.json_response({"error": {"message": "invalid api key", "type": "invalid_api_key"}}, status=401)
        models = ["jimeng-4.5", "jimeng-4.0", "jimeng-3.1", "jimeng-3.0"]
        return web.json_response({"object": "list", "data": [{"id": m, "object": "model"} for m in models]})

    async def _token_check(self, request: web.Request) -> web.Response:
        """Free: whether a key's session is live (`{"token": key}` -> `{"live": bool}`)."""
        try:
            body = await request.json()
            key = str(body["token"])
        except (ValueError, KeyError, TypeError):
            return self._proxy_error(-2000, "请求参数非法: token 不能为空")
        with self._lock:
            account = self._accounts.get(key)
            return web.json_response({"live": account is not None and not account.expired})

    async def _token_points(self, request: web.Request) -> web.Response:
        """Free: each key's credits, one `{"token", "points"}` per key in Authorization."""
        answer = []
        with self._lock:
            for key in self._keys_of(request):
                account = self._accounts.get(key)
                live = account is not None and not account.expired
                points = (account.credits if account.credits is not None else 100) if live and account else 0
                answer.append({"token": key, "points": {"totalCredit": points}})
        return web.json_response(answer)

    async def _token_receive(self, request: web.Request) -> web.Response:
        """Claims the day's free credits for each key in Authorization."""
        answer = []
        with self._lock:
            for key in self._keys_of(request):
                account = self._accounts.get(key)
                success = account is not None and not account.expired
                if success and account is not None and account.credits is not None:
                    account.credits = max(account.credits, self.config.daily_credits or 0)
                answer.append({"token": key, "success": success})
        return web.json_response(answer)

    async def _image(self, request: web.Request) -> web.StreamResponse:
        token = request.match_info["token"].split(".", 1)[0]
        failing = False
        with self._lock:
            image = self._images.get(token)
            if image is not None:
                self._tally.downloads[image.prompt] += 1
                failing = image.failures_left > 0
                image.failures_left -= int(failing)
        if self.config.image_latency:
            await asyncio.sleep(self.config.image_latency)
        if failing:
            return web.Response(status=500, text="Internal Server Error")
        if image is None or image.mode == "img-404":
            return web.Response(status=404, text="Not Found")
        if image.expires <= time.time() or image.mode == "img-403":
            return web.Response(status=403, text=EXPIRED_BODY, content_type="application/xml")
        if image.mode == "img-notimage":
            return web.Response(body=b"<html><body>captcha required</body></html>", content_type="image/png")
        if image.mode in ("img-huge", "img-truncate"):
            return await self._stream_bad_image(request, image)
        return web.Response(body=image.data, content_type=image.fmt.value)

    async def _stream_bad_image(self, request: web.Request, image: HostedImage) -> web.StreamResponse:
        huge = image.mode == "img-huge"
        response = web.StreamResponse(headers={"Content-Type": image.fmt.value})
        response.content_length = self.config.huge_bytes if huge else len(image.data) + 4096
        await response.prepare(request)
        if not huge:
            await response.write(image.data[: len(image.data) // 2])
            assert request.transport is not None
            request.transport.close()
            return response
        await response.write(image.data[:16])
        chunk = bytes(64 * 1024)
        sent = 16
        while sent < self.config.huge_bytes:
            piece = chunk[: self.config.huge_bytes - sent]
            await response.write(piece)
            sent += len(piece)
        await response.write_eof()
        return response

    # --- control endpoints ---
    async def _stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats())

    async def _reset(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"ok": True})

    async def _expire(self, request: web.Request) -> web.Response:
        self.expire_links()
        return web.json_response({"ok": True})

    async def _script(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
            self.script(str(body.get("prompt", ANY_PROMPT)), [str(o) for o in body["outcomes"]])
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            return web.json_response({"error": str(exc) or "need {prompt, outcomes}"}, status=400)
        return web.json_response({"ok": True})


async def start_site(sandbox: JimengSandbox, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Serve the sandbox; returns the runner (to clean up) and the bound port."""
    runner, bound = await serve_app(sandbox.app, host, port)
    sandbox.base_url = f"http://{host}:{bound}/v1"
    return runner, bound
