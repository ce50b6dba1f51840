"""The seam between the pipeline and an image provider (jimeng, Ark): what a generation call returns.

A provider's `generate` answers a `ProviderResult`: the images it made, each an `ImageLink` (a URL that
expires) or an `InlineImage` (base64 bytes in the answer, decoded only when asked, one at a time, so a
caller can stream each into an upload without holding every decoded image), and the images it was asked
for but refused (`ImageFailure`: blocked by moderation within an otherwise successful call). A call that
delivers nothing raises a `ProviderError` (see `errors`) whose `kind` says whether to retry, fail the prompt
or stop the queue, with `retry_after`, `reached` and `paid`.
"""

from __future__ import annotations

import base64
import binascii
import time
from dataclasses import dataclass
from typing import Protocol

import aiohttp

from imagegen.choices import Choices
from imagegen.errors import excerpt


@dataclass(frozen=True)
class ImageLink:
    """An image to download from `url` before `expires_at` (epoch seconds)."""

    url: str
    expires_at: float
    size: str = ""  # "WxH" when the provider says

    @classmethod
    def lasting(cls, url: str, seconds: float, *, since: float | None = None, size: str = "") -> ImageLink:
        """A link valid for `seconds` from `since` (default now)."""
        return cls(url, (time.time() if since is None else since) + seconds, size)

    def seconds_left(self, now: float | None = None) -> float:
        return self.expires_at - (time.time() if now is None else now)


@dataclass(frozen=True)
class InlineImage:
    """An image sent in the answer itself, as base64 text; `decode()` makes the bytes when they are needed."""

    b64: str
    size: str = ""  # "WxH" when the provider says

    def decode(self) -> bytes:
        """The image bytes; ValueError when the text is not base64."""
        try:
            return base64.b64decode(self.b64, validate=True)
        except binascii.Error as exc:
            raise ValueError(f"the inline image is not base64 ({exc})") from None


ImageSource = ImageLink | InlineImage


@dataclass(frozen=True)
class ImageFailure:
    """One image of a call that the provider did not deliver (e.g. blocked by moderation), by its position."""

    index: int
    code: str
    message: str


@dataclass(frozen=True)
class ProviderResult:
    """What one successful call delivered: at least one image, and the images it refused, if any.

    `billed_images` is the provider's own count of the images it charged for, when it reports one."""

    provider: str
    model: str
    images: tuple[ImageSource, ...]
    failures: tuple[ImageFailure, ...] = ()
    billed_images: int | None = None

    @property
    def partial(self) -> bool:
        """Some of the images were refused while others were delivered."""
        return bool(self.failures)


def transport_failure(exc: TimeoutError | aiohttp.ClientError, url: str, timeout: str) -> tuple[str, bool]:
    """What a call that got no answer means: one line, and whether the request can have reached the provider.

    `timeout` names the setting and its value ("ARK_TIMEOUT (600 s)"). A connection never made (refused, DNS,
    TLS handshake) did not leave this host: no call, nothing paid. A timeout or a connection dropped mid-call
    may have been paid."""
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout}", True
    what = f"{type(exc).__name__}: {excerpt(str(exc), 120)}"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"could not connect to {url} ({what})", False
    return f"connection to {url} failed ({what})", True


class Provider(Protocol):
    """An image API behind the seam: one paid call per `generate`, errors classified by the provider."""

    @property
    def name(self) -> str: ...

    async def generate(self, prompt: str, negative_prompt: str, choices: Choices) -> ProviderResult:
        """One generation call; raises a `ProviderError` (transient, permanent or account) when no image came."""
        ...
