"""The jimeng text-to-image API (an OpenAI-compatible proxy).

Its trap: errors arrive as HTTP 200 with `{"code": <negative>, "message": ..., "data": null}`, so a reply is
judged by its body, never by its status alone. `parse_generation` turns any reply into image links or a
`JimengError` whose `kind` says whether to retry, fail the prompt or stop the queue.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
from pydantic import BaseModel, SecretStr, ValidationError

from imagegen.choices import Choices
from imagegen.errors import FailureKind, JimengError, excerpt
from imagegen.settings import Settings

TRANSIENT = FailureKind.TRANSIENT
PERMANENT = FailureKind.PERMANENT
ACCOUNT = FailureKind.ACCOUNT


class _ImageLink(BaseModel):
    url: str


class _Generation(BaseModel):
    created: int
    data: list[_ImageLink]


@dataclass(frozen=True)
class Generation:
    """A paid generation: the image links, which expire within hours of `created`."""

    created: float
    urls: list[str]


def _risk_control(message: str) -> bool:
    return "shark check reject" in message or "错误码: -4" in message


def _moderated(message: str) -> bool:
    return "错误码: 2038" in message


def classify_code(code: int, message: str) -> tuple[FailureKind, str]:
    """What a proxy error code means, in plain words, and what to do about it."""
    if code == -2001 and _risk_control(message):
        return ACCOUNT, "the account was rejected by jimeng's risk control; stop and check the account"
    if code == -2007 and _moderated(message):
        return PERMANENT, "the prompt was blocked by content moderation (2038); change the prompt"
    known: dict[int, tuple[FailureKind, str]] = {
        -1000: (PERMANENT, "the request was rejected as invalid"),
        -2000: (PERMANENT, "the request parameters were invalid"),
        -2001: (TRANSIENT, "the request to jimeng failed upstream"),
        -2002: (ACCOUNT, "the API key's session has expired; renew JIMENG_API_KEY"),
        -2006: (PERMANENT, "the prompt was blocked by content moderation; change the prompt"),
        -2007: (TRANSIENT, "the generation failed upstream"),
        -2009: (ACCOUNT, "the account has run out of credits; top it up"),
    }
    return known.get(code, (TRANSIENT, "the API answered an unknown error code"))


def _http_error(status: int, body: str, retry_after: float | None) -> JimengError:
    message = body
    try:
        payload = json.loads(body)
        if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
            message = str(payload["error"].get("message", body))
        elif isinstance(payload, dict) and "message" in payload:
            message = str(payload["message"])
    except ValueError:
        pass
    detail = excerpt(message)
    if status in (401, 403):
        return JimengError(
            f"HTTP {status}: the API refused the key; check JIMENG_API_KEY ({detail})",
            kind=ACCOUNT,
            status=status,
            detail=detail,
        )
    if status == 429:
        return JimengError(
            f"HTTP 429: rate limited ({detail})",
            kind=TRANSIENT,
            status=status,
            detail=detail,
            retry_after=retry_after,
        )
    if status >= 500 or status == 408:
        return JimengError(f"HTTP {status}: the API is unavailable ({detail})", kind=TRANSIENT, status=status)
    return JimengError(f"HTTP {status}: the API rejected the request ({detail})", kind=PERMANENT, status=status)


def parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def parse_generation(status: int, body: str, retry_after: float | None = None) -> Generation:
    """Judge one reply of `POST /images/generations`: image links, or the JimengError it really is."""
    if status != 200:
        raise _http_error(status, body, retry_after)
    try:
        payload: Any = json.loads(body)
    except ValueError:
        raise JimengError(
            f"the API answered with a non-JSON body ({excerpt(body, 120)})", kind=TRANSIENT, status=status
        ) from None
    if isinstance(payload, dict) and isinstance(payload.get("code"), int) and payload["code"] != 0:
        code = payload["code"]
        message = str(payload.get("message", ""))
        kind, meaning = classify_code(code, message)
        raise JimengError(
            f"error {code}: {meaning} ({excerpt(message, 160)})",
            kind=kind,
            status=status,
            code=code,
            detail=excerpt(message),
            moderated=code == -2006 or (code == -2007 and _moderated(message)),
        )
    try:
        parsed = _Generation.model_validate(payload)
    except ValidationError:
        raise JimengError(
            f"the API answered with an unexpected body ({excerpt(body, 120)})", kind=TRANSIENT, status=status
        ) from None
    urls = [item.url for item in parsed.data if item.url]
    if not urls:
        raise JimengError("the API returned no images (data: [])", kind=TRANSIENT, status=status)
    return Generation(created=float(parsed.created or time.time()), urls=urls)


class JimengClient:
    """Asks the API for images; one shared aiohttp session, the key only ever in the Authorization header."""

    def __init__(self, session: aiohttp.ClientSession, settings: Settings) -> None:
        self._session = session
        self._url = f"{settings.jimeng_api_url}/images/generations"
        keys = settings.jimeng_keys()
        self._key = keys[0] if keys else settings.jimeng_api_key
        self._defaults = settings.default_choices
        self._timeout = aiohttp.ClientTimeout(total=settings.jimeng_timeout_seconds)

    def request_body(self, prompt: str, negative_prompt: str = "", choices: Choices | None = None) -> dict[str, str]:
        chosen = choices or self._defaults
        body = {
            "model": chosen.model,
            "prompt": prompt,
            "ratio": chosen.ratio,
            "resolution": chosen.resolution,
            "response_format": "url",
        }
        if negative_prompt:
            body["negative_prompt"] = negative_prompt
        return body

    async def generate(
        self, prompt: str, negative_prompt: str = "", choices: Choices | None = None, *, key: SecretStr | None = None
    ) -> Generation:
        """One paid generation call (with the settings' model, ratio and resolution unless `choices` are
        given) with one account's `key` (default: the first of JIMENG_API_KEY); raises JimengError classified
        as transient, permanent or account."""
        headers = {"Authorization": f"Bearer {(key or self._key).get_secret_value()}"}
        try:
            async with self._session.post(
                self._url,
                json=self.request_body(prompt, negative_prompt, choices),
                headers=headers,
                timeout=self._timeout,
            ) as response:
                body = await response.text(errors="replace")
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
                return parse_generation(response.status, body, retry_after)
        except TimeoutError:
            raise JimengError(
                f"no answer within JIMENG_TIMEOUT ({self._timeout.total:.0f} s)", kind=TRANSIENT
            ) from None
        except aiohttp.ClientConnectorError as exc:
            # The connection was never made (refused, DNS, TLS handshake): the request did not leave.
            raise JimengError(
                f"could not connect to {self._url} ({type(exc).__name__}: {excerpt(str(exc), 120)})",
                kind=TRANSIENT,
                reached=False,
            ) from None
        except aiohttp.ClientError as exc:
            raise JimengError(
                f"connection to {self._url} failed ({type(exc).__name__}: {excerpt(str(exc), 120)})",
                kind=TRANSIENT,
            ) from None


def proxy_root(api_url: str) -> str:
    """The proxy's own routes (`/token/...`) sit beside `/v1`, at its root."""
    return api_url.rstrip("/").removesuffix("/v1")


def read_points(value: object) -> int | None:
    """An account's credits from `/token/points`, whose shape is not settled: a number, or an object with a
    total among its fields; None when no number can be read."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return int(value)
    if isinstance(value, dict):
        for name in ("totalCredit", "total_credit", "total", "credits", "points", "balance"):
            if name in value and (found := read_points(value[name])) is not None:
                return found
    return None


class AccountRoutes:
    """The proxy's free account routes: is a session live, how many credits, claim the day's free ones.

    None of them spends a credit. A proxy without them answers 404, which reads as "not known" (None)."""

    def __init__(self, session: aiohttp.ClientSession, settings: Settings) -> None:
        self._session = session
        self._root = proxy_root(settings.jimeng_api_url)
        self._timeout = aiohttp.ClientTimeout(total=30)

    async def _post(self, route: str, key: SecretStr | None, body: dict[str, str] | None = None) -> Any:
        headers = {"Authorization": f"Bearer {key.get_secret_value()}"} if key is not None else {}
        try:
            async with self._session.post(
                f"{self._root}{route}", json=body or {}, headers=headers, timeout=self._timeout
            ) as response:
                if response.status != 200:
                    return None
                return await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None

    async def live(self, key: SecretStr) -> bool | None:
        """`/token/check`: whether the key's session is live; None when the proxy can't say."""
        answer = await self._post("/token/check", None, {"token": key.get_secret_value()})
        found = answer.get("live") if isinstance(answer, dict) else None
        return found if isinstance(found, bool) else None

    async def points(self, key: SecretStr) -> int | None:
        """`/token/points` for one key: its credits, or None when the proxy can't say."""
        answer = await self._post("/token/points", key)
        entries = answer if isinstance(answer, list) else [answer]
        for entry in entries:
            if isinstance(entry, dict) and "points" in entry:
                return read_points(entry["points"])
        return None

    async def receive(self, key: SecretStr) -> bool | None:
        """`/token/receive` for one key: whether the day's free credits were claimed; None when not known."""
        answer = await self._post("/token/receive", key)
        entries = answer if isinstance(answer, list) else [answer]
        for entry in entries:
            if isinstance(entry, dict) and isinstance(entry.get("success"), bool):
                return bool(entry["success"])
        return None
