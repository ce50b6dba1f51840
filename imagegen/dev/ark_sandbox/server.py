"""A Volcengine Ark image API on this machine, faithful to docs/ark-api.md: the fake of the Ark tests.

`POST /api/v3/images/generations` checks the bearer key, the model (404 `ModelNotOpen` for one not
activated), the prompt and every parameter the way Ark does, then draws real JPEG images of the requested
`size` (one, or a group of up to `max_images`) and answers them as links it serves under `/ark-img/` until
they expire, or as base64. Outcomes are scripted by markers in the prompt or by `script()` (see `modes`).
Counters (calls and images per prompt) and the latest request bodies are read from the test's thread.
"""

from __future__ import annotations

import asyncio
import base64
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from imagegen.dev.jimeng_sandbox.modes import EXPIRED_BODY, network_fault, slow_delay
from imagegen.dev.jimeng_sandbox.render import render_image
from imagegen.dev.jimeng_sandbox.scripts import OutcomeScripts
from imagegen.dev.jimeng_sandbox.site import AppThread, serve_app
from imagegen.dev.jimeng_sandbox.tally import PromptTally
from imagegen.models import ImageType

from .modes import ERRORS, count_marker, is_known, markers, outcome_marker

API_PATH = "/api/v3"
# The environment variable that gives the sandbox process its key (kept off command lines).
ARK_SANDBOX_KEY_ENV = "IMAGEGEN_ARK_SANDBOX_API_KEY"
RECEIVED_KEPT = 1000
# Images kept to serve by link, oldest dropped first (a long-running fake stays bounded).
HOSTED_KEPT = 500
_WXH = re.compile(r"(\d{2,5})x(\d{2,5})")
_LEVELS = {"1K": 1024, "2K": 2048, "4K": 4096}
# The pixels a `WxH` may have: 4.5 models refuse under 2560x1440 (ark-api.md); the 4.0 floor of 1280x720 and
# the 4096x4096 cap of both are from the same reference's parameter table (unconfirmed in ark-api.md).
_MAX_PIXELS = 4096 * 4096
_MIN_PIXELS_40 = 1280 * 720
_MIN_PIXELS_45 = 2560 * 1440


@dataclass
class ArkSandboxConfig:
    api_key: str
    # Models activated for the account; any other model id answers 404 ModelNotOpen.
    models: tuple[str, ...] = ("doubao-seedream-4-0-250828", "doubao-seedream-4-5-251128")
    latency: float = 0.0
    link_ttl: float = 24 * 3600
    # Sent with every 429; None sends none.
    retry_after: int | None = 2
    public_base: str | None = None


@dataclass
class _HostedImage:
    prompt: str
    data: bytes
    expires: float


@dataclass
class _Request:
    """A generation request that passed Ark's checks."""

    model: str
    prompt: str
    size: tuple[int, int]
    response_format: str
    watermark: bool
    max_images: int  # 1 when sequential_image_generation is disabled
    marks: list[str] = field(default_factory=list)


class _Refused(Exception):
    """A request Ark would refuse: the error row's code and a message."""

    def __init__(self, code: str, message: str = "") -> None:
        super().__init__(code)
        self.code = code
        self.message = message


class ArkSandbox:
    """State (images, scripts, counters) and the aiohttp application; safe to read from another thread."""

    def __init__(self, config: ArkSandboxConfig) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._tally = PromptTally(RECEIVED_KEPT)
        self._hosted: dict[str, _HostedImage] = {}
        self._scripts = OutcomeScripts(is_known, "Ark sandbox")
        self.base_url = ""
        self.app = web.Application()
        self.app.add_routes(
            [
                web.post(f"{API_PATH}/images/generations", self._generate),
                web.get("/ark-img/{token}", self._image),
            ]
        )

    # --- Python API, for tests in the same process ---
    def script(self, prompt: str, outcomes: list[str]) -> None:
        """Queue outcomes (e.g. ["ServerOverloaded", "ok"]) for the next calls with this prompt ("*": any)."""
        self._scripts.add(prompt, outcomes)

    def reset(self) -> None:
        with self._lock:
            self._tally.clear()
            self._hosted.clear()
        self._scripts.clear()

    def expire_links(self) -> None:
        with self._lock:
            for image in self._hosted.values():
                image.expires = 0.0

    def calls(self, prompt: str) -> int:
        """Generation calls for this prompt that passed the checks of key, model and parameters."""
        with self._lock:
            return self._tally.calls[prompt]

    def images_made(self, prompt: str) -> int:
        """Images delivered (and billed) for this prompt, blocked ones not counted."""
        with self._lock:
            return self._tally.made[prompt]

    def downloads(self, prompt: str) -> int:
        with self._lock:
            return self._tally.downloads[prompt]

    def received(self, prompt: str | None = None) -> list[Any]:
        """The JSON bodies of the latest generation requests (for `prompt`, or all), refused ones too."""
        with self._lock:
            return self._tally.bodies(prompt)

    def served_images(self, prompt: str) -> list[bytes]:
        """The image bytes of the latest call for this prompt that delivered images, in `data[]` order."""
        with self._lock:
            return list(self._tally.served.get(prompt, []))

    # --- the API ---
    @staticmethod
    def _error(code: str, message: str = "", headers: dict[str, str] | None = None) -> web.Response:
        status, default = ERRORS[code]
        body = {"error": {"code": code, "message": message or default, "param": "", "type": "BadRequest"}}
        return web.json_response(body, status=status, headers=headers)

    def _check(self, request: web.Request, payload: Any) -> _Request:
        """The request as Ark reads it, or _Refused: key first, then the model, then the parameters."""
        if request.headers.get("Authorization") != f"Bearer {self.config.api_key}":
            raise _Refused("AuthenticationError")
        if not isinstance(payload, dict):
            raise _Refused("InvalidParameter", "The request body must be a JSON object.")
        model = payload.get("model")
        if not isinstance(model, str) or not model:
            raise _Refused("MissingParameter", "The request is missing the required parameter `model`.")
        if model not in self.config.models:
            code = "InvalidEndpointOrModel.NotFound" if model.startswith("ep-") else "ModelNotOpen"
            raise _Refused(code, f"{ERRORS[code][1]} (model {model})")
        prompt = payload.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise _Refused("MissingParameter", "The request is missing the required parameter `prompt`.")
        response_format = payload.get("response_format", "url")
        if response_format not in ("url", "b64_json"):
            raise _Refused("InvalidParameter", "The parameter `response_format` must be url or b64_json.")
        watermark = payload.get("watermark", True)
        if not isinstance(watermark, bool):
            raise _Refused("InvalidParameter", "The parameter `watermark` must be a boolean.")
        return _Request(
            model=model,
            prompt=prompt,
            size=self._size(model, payload.get("size", "2048x2048")),
            response_format=response_format,
            watermark=watermark,
            max_images=self._max_images(payload),
            marks=markers(prompt),
        )

    @staticmethod
    def _size(model: str, size: Any) -> tuple[int, int]:
        newer = "seedream-4-5" in model
        if isinstance(size, str) and size.upper() in _LEVELS and not (newer and size.upper() == "1K"):
            side = _LEVELS[size.upper()]
            return side, side  # the prompt decides the shape; this fake draws squares
        found = _WXH.fullmatch(size) if isinstance(size, str) else None
        if found:
            width, height = int(found[1]), int(found[2])
            pixels = width * height
            if (
                _MIN_PIXELS_45 if newer else _MIN_PIXELS_40
            ) <= pixels <= _MAX_PIXELS and 1 / 16 <= width / height <= 16:
                return width, height
        raise _Refused(
            "InvalidParameter.size", f"The parameter `size` specified in the request is not valid: {size!r}."
        )

    @staticmethod
    def _max_images(payload: dict[str, Any]) -> int:
        mode = payload.get("sequential_image_generation", "disabled")
        if mode == "disabled":
            return 1
        options = payload.get("sequential_image_generation_options") or {}
        cap = options.get("max_images", 15) if isinstance(options, dict) else None
        if mode != "auto" or not isinstance(cap, int) or isinstance(cap, bool) or not 1 <= cap <= 15:
            raise _Refused(
                "InvalidParameter", "sequential_image_generation must be disabled, or auto with max_images 1-15."
            )
        return cap

    def _choose(self, asked: _Request) -> str:
        return self._scripts.take(asked.prompt) or outcome_marker(asked.marks) or "ok"

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        try:
            payload: Any = await request.json()
        except ValueError:
            payload = None
        with self._lock:
            self._tally.received.append(payload)
        try:
            asked = self._check(request, payload)
        except _Refused as refused:
            return self._error(refused.code, refused.message)
        with self._lock:
            self._tally.calls[asked.prompt] += 1
        mode = self._choose(asked)
        delay = self.config.latency + (slow_delay(mode) or 0.0)
        if delay:
            await asyncio.sleep(delay)
        if mode in ERRORS:
            retry = self.config.retry_after
            headers = {"Retry-After": str(retry)} if ERRORS[mode][0] == 429 and retry is not None else None
            return self._error(mode, headers=headers)
        fault = await network_fault(request, mode)
        if fault is not None:
            return fault
        return web.json_response(await self._success(request, asked))

    async def _success(self, request: web.Request, asked: _Request) -> dict[str, Any]:
        wanted = count_marker(asked.marks, "images")
        count = min(wanted[0], asked.max_images) if wanted and asked.max_images > 1 else asked.max_images
        blocked = set(count_marker(asked.marks, "blocked") or [])
        salt = secrets.token_hex(4)
        made = [index for index in range(count) if index not in blocked]
        drawn = await asyncio.to_thread(
            lambda: [render_image(asked.prompt, index, ImageType.JPEG, asked.size, salt) for index in made]
        )
        images = dict(zip(made, drawn, strict=True))
        size = f"{asked.size[0]}x{asked.size[1]}"
        data = [self._item(request, asked, images.get(index), size) for index in range(count)]
        with self._lock:
            self._tally.made[asked.prompt] += len(drawn)
            if drawn:
                self._tally.served[asked.prompt] = drawn
        tokens = len(drawn) * asked.size[0] * asked.size[1] // 256
        return {
            "model": asked.model,
            "created": int(time.time()),
            "data": data,
            "usage": {"generated_images": len(drawn), "output_tokens": tokens, "total_tokens": tokens},
        }

    def _item(self, request: web.Request, asked: _Request, image: bytes | None, size: str) -> dict[str, Any]:
        if image is None:
            code = "OutputImageSensitiveContentDetected"
            return {"error": {"code": code, "message": ERRORS[code][1]}}
        if asked.response_format == "b64_json":
            return {"b64_json": base64.b64encode(image).decode("ascii"), "size": size}
        token = secrets.token_hex(16)
        expires = time.time() + self.config.link_ttl
        with self._lock:
            self._hosted[token] = _HostedImage(asked.prompt, image, expires)
            if len(self._hosted) > HOSTED_KEPT:
                del self._hosted[next(iter(self._hosted))]
        base = self.config.public_base or f"{request.scheme}://{request.host}"
        signature = secrets.token_hex(16)
        query = f"X-Tos-Expires={int(self.config.link_ttl)}&X-Tos-Signature={signature}"
        return {"url": f"{base}/ark-img/{token}.jpeg?{query}", "size": size}

    async def _image(self, request: web.Request) -> web.Response:
        token = request.match_info["token"].split(".", 1)[0]
        with self._lock:
            image = self._hosted.get(token)
            if image is not None:
                self._tally.downloads[image.prompt] += 1
        if image is None:
            return web.Response(status=404, text="Not Found")
        if image.expires <= time.time():
            return web.Response(status=403, text=EXPIRED_BODY, content_type="application/xml")
        return web.Response(body=image.data, content_type=ImageType.JPEG.value)


async def start_site(sandbox: ArkSandbox, host: str, port: int) -> web.AppRunner:
    """Serve the sandbox on host:port (0: a free port); its `base_url` is then the ARK_BASE_URL to use."""
    runner, bound = await serve_app(sandbox.app, host, port)
    sandbox.base_url = f"http://{host}:{bound}{API_PATH}"
    return runner


class ArkSandboxThread(AppThread):
    """`with ArkSandboxThread(config) as fake:` serves on 127.0.0.1 and a free port; `fake.base_url` is the
    ARK_BASE_URL to use, `fake.sandbox` the state (counters, scripts, received bodies)."""

    def __init__(self, config: ArkSandboxConfig, host: str = "127.0.0.1", port: int = 0) -> None:
        self.sandbox = ArkSandbox(config)
        super().__init__(self._serve, "Ark sandbox", host, port)

    async def _serve(self, host: str, port: int) -> web.AppRunner:
        return await start_site(self.sandbox, host, port)

    @property
    def base_url(self) -> str:
        return self.sandbox.base_url
