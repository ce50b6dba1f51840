"""The official Volcengine Ark image API (Seedream models), as a provider behind `provider`.

One synchronous `POST {ARK_BASE_URL}/images/generations` per call. Unlike the jimeng proxy, Ark answers with
real HTTP statuses and `{"error": {"code", "message"}}`; a successful answer may still carry images blocked by
moderation (a partial success), and its links last 24 hours. `parse_generation` turns any answer into a
`ProviderResult` or the `ArkError` it really is, judged by `error.code` first (a 429 may mean a spending cap
is reached, which waiting does not cure) and by the status when the code is unknown.

Sizes: Ark takes `WxH`, not a ratio. `SIZES` maps our ratio and resolution to a size every 4.x model accepts
(2K: the documented presets; 1K and 4K: the same shapes, sides multiples of 16, at the fewest pixels 4.5
models take and at the most 4096x4096 allows). Ark bills per image whatever its size, so a 1K image costs
as much as a 2K one.
"""

from __future__ import annotations

import json
import time
from typing import Any

import aiohttp
from pydantic import BaseModel, ValidationError

from imagegen.choices import Choices, is_ark_model
from imagegen.errors import ArkError, ConfigError, FailureKind, excerpt
from imagegen.settings import Settings

from .jimeng import parse_retry_after
from .provider import ImageFailure, ImageLink, ImageSource, InlineImage, ProviderResult, transport_failure

TRANSIENT = FailureKind.TRANSIENT
PERMANENT = FailureKind.PERMANENT
ACCOUNT = FailureKind.ACCOUNT

PROVIDER = "ark"
# How long Ark's image links stay valid (counted from when the call was sent, so never overstated).
LINK_LIFETIME = 24 * 3600

SIZES: dict[str, dict[str, tuple[int, int]]] = {
    "1k": {
        "1:1": (1920, 1920),
        "4:3": (2240, 1680),
        "3:4": (1680, 2240),
        "16:9": (2592, 1456),
        "9:16": (1456, 2592),
        "3:2": (2352, 1568),
        "2:3": (1568, 2352),
        "21:9": (2944, 1264),
    },
    "2k": {
        "1:1": (2048, 2048),
        "4:3": (2304, 1728),
        "3:4": (1728, 2304),
        "16:9": (2848, 1600),
        "9:16": (1600, 2848),
        "3:2": (2496, 1664),
        "2:3": (1664, 2496),
        "21:9": (3136, 1344),
    },
    "4k": {
        "1:1": (4096, 4096),
        "4:3": (4672, 3504),
        "3:4": (3504, 4672),
        "16:9": (5440, 3056),
        "9:16": (3056, 5440),
        "3:2": (4992, 3328),
        "2:3": (3328, 4992),
        "21:9": (6240, 2672),
    },
}


def ark_size(ratio: str, resolution: str) -> str:
    """The `size` Ark is sent for our ratio and resolution, e.g. `2848x1600` for 16:9 at 2k."""
    width, height = SIZES[resolution.lower()][ratio]
    return f"{width}x{height}"


# error.code -> what it means; `{model}` is the model asked for. A code not listed is looked up without its
# last `.part` (`InvalidParameter.size` is `InvalidParameter`), then judged by its HTTP status.
_CODES: dict[str, tuple[FailureKind, str]] = {
    "MissingParameter": (PERMANENT, "the request lacks a required parameter"),
    "InvalidParameter": (PERMANENT, "Ark refused a parameter of the request (prompt, size or model {model})"),
    "InputTextSensitiveContentDetected": (PERMANENT, "the prompt was blocked by content moderation; change it"),
    "InputImageSensitiveContentDetected": (PERMANENT, "the reference image was blocked by content moderation"),
    "OutputImageSensitiveContentDetected": (
        PERMANENT,
        "the generated image was blocked by content moderation; change the prompt",
    ),
    "AuthenticationError": (ACCOUNT, "the API key was refused; check ARK_API_KEY"),
    "AccountOverdueError": (ACCOUNT, "the Ark account is overdue; settle its balance in the Volcengine console"),
    "OperationDenied.ServiceOverdue": (ACCOUNT, "the Ark service is suspended for an overdue balance; settle it"),
    "AccessDenied": (ACCOUNT, "the key may not use model {model}; grant it access in the Ark console"),
    "ModelNotOpen": (ACCOUNT, "model {model} is not activated for this account; activate it in the Ark console"),
    "InvalidEndpointOrModel.NotFound": (ACCOUNT, "there is no model or endpoint {model}"),
    "InvalidEndpointOrModel.ModelIDAccessDisabled": (ACCOUNT, "access to model {model} is disabled for this account"),
    "ModelAccountIpmRateLimitExceeded": (TRANSIENT, "the account's images per minute for {model} are used up"),
    "ModelAccountRpmRateLimitExceeded": (TRANSIENT, "the account's requests per minute for {model} are used up"),
    "RateLimitExceeded.EndpointRPMExceeded": (TRANSIENT, "the endpoint's requests per minute are used up"),
    "AccountRateLimitExceeded": (TRANSIENT, "the account's rate limit is reached"),
    "RequestBurstTooFast": (TRANSIENT, "requests rose too fast; Ark asks to ramp up slowly"),
    "ServerOverloaded": (TRANSIENT, "Ark is overloaded"),
    "InternalServiceError": (TRANSIENT, "Ark failed internally"),
    "QuotaExceeded": (ACCOUNT, "the account's quota is used up; top it up in the Ark console"),
    "SetLimitExceeded": (ACCOUNT, "the spending limit set in the Ark console is reached; raise it there"),
}
# Codes about the model asked for: when that model is a record's own (not ARK_MODEL), only that record fails.
_MODEL_CODES = ("ModelNotOpen", "InvalidEndpointOrModel.NotFound", "InvalidEndpointOrModel.ModelIDAccessDisabled")
_MODERATION = "SensitiveContentDetected"


def _known_code(code: str) -> str | None:
    while code:
        if code in _CODES:
            return code
        code = code.rpartition(".")[0]
    return None


def _by_status(status: int) -> tuple[FailureKind, str]:
    if status in (401, 403):
        return ACCOUNT, "Ark refused the key or the account; check ARK_API_KEY"
    if status == 404:
        return ACCOUNT, "Ark does not know model {model} or the URL; check ARK_MODEL and ARK_BASE_URL"
    if status in (408, 429) or status >= 500:
        return TRANSIENT, "Ark is unavailable or limiting requests"
    if 400 <= status < 500:
        return PERMANENT, "Ark refused the request"
    return TRANSIENT, "Ark answered an unexpected status"


def classify_error(status: int, code: str, model: str, *, own_model: bool = True) -> tuple[FailureKind, str]:
    """What an error answer means in plain words, and whether to retry, fail the prompt or stop the queue.

    `own_model` False: the model was a record's own choice, so a model Ark won't serve fails that record only."""
    known = _known_code(code)
    kind, meaning = _CODES[known] if known else _by_status(status)
    if known in _MODEL_CODES and own_model:
        meaning += "; check ARK_MODEL"
    elif known in _MODEL_CODES:
        kind, meaning = PERMANENT, meaning + " (the record's own model: only this record fails)"
    return kind, meaning.format(model=model)


def _error_fields(body: str) -> tuple[str, str]:
    """`error.code` and `error.message` of an error body ("" and the body itself when it has none)."""
    try:
        payload = json.loads(body)
    except ValueError:
        return "", body
    error = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(error, dict):
        return "", body
    return str(error.get("code") or ""), str(error.get("message") or "")


def error_answer(status: int, body: str, retry_after: float | None, model: str, *, own_model: bool) -> ArkError:
    """The ArkError of an answer with an error status."""
    code, message = _error_fields(body)
    kind, meaning = classify_error(status, code, model, own_model=own_model)
    detail = excerpt(message)
    moderated = _MODERATION in code
    return ArkError(
        f"HTTP {status}{' ' + code if code else ''}: {meaning} ({excerpt(message, 160)})",
        kind=kind,
        status=status,
        code=code,
        detail=detail,
        retry_after=retry_after if kind is TRANSIENT else None,
        moderated=moderated,
        # Ark bills generated images only: an error answer cost nothing, unless an image was made and then
        # blocked (whether those are billed is not documented).
        paid=None if code.startswith("OutputImage") else False,
    )


class _ItemError(BaseModel):
    code: str = ""
    message: str = ""


class _Item(BaseModel):
    url: str | None = None
    b64_json: str | None = None
    size: str = ""
    error: _ItemError | None = None


class _Usage(BaseModel):
    generated_images: int | None = None


class _Answer(BaseModel):
    model: str = ""
    created: int = 0
    data: list[_Item]
    usage: _Usage | None = None


def _unexpected(what: str, body: str) -> ArkError:
    return ArkError(f"Ark answered {what} ({excerpt(body, 120)})", kind=TRANSIENT, status=200)


def parse_generation(
    status: int,
    body: str,
    *,
    model: str,
    sent_at: float,
    retry_after: float | None = None,
    own_model: bool = True,
) -> ProviderResult:
    """Judge one answer of `POST /images/generations`: the images (and the refused ones), or its ArkError.

    `sent_at` (epoch seconds) is when the call left: links are valid LINK_LIFETIME from then."""
    if status != 200:
        raise error_answer(status, body, retry_after, model, own_model=own_model)
    try:
        answer = _Answer.model_validate_json(body)
    except ValidationError:
        if _error_fields(body)[0]:  # an error sent with 200: its code still says what it is
            raise error_answer(status, body, retry_after, model, own_model=own_model) from None
        raise _unexpected("with a body that is not a generation", body) from None
    images: list[ImageSource] = []
    failures: list[ImageFailure] = []
    for index, item in enumerate(answer.data):
        if item.url:
            images.append(ImageLink.lasting(item.url, LINK_LIFETIME, since=sent_at, size=item.size))
        elif item.b64_json:
            images.append(InlineImage(item.b64_json, size=item.size))
        elif item.error is not None:
            failures.append(ImageFailure(index, item.error.code, excerpt(item.error.message)))
        else:
            failures.append(ImageFailure(index, "NoImage", "the item carries neither an image nor an error"))
    billed = answer.usage.generated_images if answer.usage else None
    if images:
        return ProviderResult(PROVIDER, answer.model or model, tuple(images), tuple(failures), billed)
    if failures and all(_MODERATION in failure.code for failure in failures):
        first = failures[0]
        raise ArkError(
            f"every image was blocked by content moderation ({first.code}: {excerpt(first.message, 120)}); "
            "change the prompt",
            kind=PERMANENT,
            status=status,
            code=first.code,
            detail=first.message,
            moderated=True,
            paid=None if billed is None else billed > 0,
        )
    raise _unexpected("no images", body)


class ArkClient:
    """Asks Ark for images; one shared aiohttp session, the key only ever in the Authorization header."""

    name = PROVIDER

    def __init__(self, session: aiohttp.ClientSession, settings: Settings) -> None:
        if settings.ark_api_key is None:
            raise ConfigError("ARK_API_KEY not set - add it to the environment or .env")
        self._session = session
        self._url = f"{settings.ark_base_url}/images/generations"
        self._key = settings.ark_api_key
        self._model = settings.ark_model
        self._watermark = settings.ark_watermark
        self._response_format = settings.ark_response_format
        self._max_images = settings.ark_max_images
        self._defaults = settings.default_choices
        self._timeout = aiohttp.ClientTimeout(total=settings.ark_timeout)

    def model_for(self, choices: Choices) -> str:
        """The record's model when it is an Ark id, else ARK_MODEL (a jimeng model name means "the default")."""
        return choices.model if is_ark_model(choices.model) else self._model

    def request_body(self, prompt: str, choices: Choices | None = None) -> dict[str, Any]:
        """The JSON body of a generation call. Ark has no negative prompt field: callers keep it out."""
        chosen = choices or self._defaults
        body: dict[str, Any] = {
            "model": self.model_for(chosen),
            "prompt": prompt,
            "size": ark_size(chosen.ratio, chosen.resolution),
            "response_format": self._response_format,
            # Ark marks images "AI生成" unless told otherwise, so the choice is always sent.
            "watermark": self._watermark,
        }
        if self._max_images == 1:
            body["sequential_image_generation"] = "disabled"
        else:
            body["sequential_image_generation"] = "auto"
            body["sequential_image_generation_options"] = {"max_images": self._max_images}
        return body

    async def generate(self, prompt: str, negative_prompt: str = "", choices: Choices | None = None) -> ProviderResult:
        """One paid call (one image, or up to ARK_MAX_IMAGES as a group); raises ArkError, classified.

        `negative_prompt` is not sent: Ark has no such parameter."""
        body = self.request_body(prompt, choices)
        sent_at = time.time()
        status, text, retry_after = await self._post(body)
        return parse_generation(
            status,
            text,
            model=body["model"],
            sent_at=sent_at,
            retry_after=retry_after,
            own_model=body["model"] == self._model,
        )

    async def check(self) -> str:
        """Checks ARK_API_KEY and ARK_MODEL without paying, and says what it verified in one line.

        Ark has no free route that names a key's models, so this sends a generation request without a prompt:
        it can't make an image, so nothing is billed. A refused key (401), account (403) or model (404) raises
        ArkError naming it; the expected `MissingParameter` means the key was accepted and the model not
        refused. Whether Ark judges the model before the missing prompt is not documented."""
        status, text, retry_after = await self._post({"model": self._model})
        code, _ = _error_fields(text)
        if status == 400 and code in ("MissingParameter", "InvalidParameter"):
            return f"ARK_API_KEY accepted and model {self._model} not refused (a request that can't bill)"
        if status == 200:
            return f"ARK_API_KEY accepted and model {self._model} answered (unexpectedly, with images)"
        raise error_answer(status, text, retry_after, self._model, own_model=True)

    async def _post(self, body: dict[str, Any]) -> tuple[int, str, float | None]:
        """Status, text (the key scrubbed out) and Retry-After of one call; transport failures as ArkError."""
        key = self._key.get_secret_value()
        try:
            async with self._session.post(
                self._url, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=self._timeout
            ) as response:
                text = await response.text(errors="replace")
                return response.status, text.replace(key, "***"), parse_retry_after(response.headers.get("Retry-After"))
        except (TimeoutError, aiohttp.ClientError) as exc:
            message, reached = transport_failure(exc, self._url, f"ARK_TIMEOUT ({self._timeout.total:.0f} s)")
            raise ArkError(message, kind=TRANSIENT, reached=reached) from exc
