"""Streaming the generated images from the API's short-lived links.

The real image type is read from the first bytes (PNG, JPEG, WebP), never from the URL, and the body is
handed on chunk by chunk with a size cap, so memory stays bounded whatever the image size.
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Protocol
from urllib.parse import urlsplit

import aiohttp

from imagegen.errors import DownloadError, FailureKind, LinkRefusedError, excerpt
from imagegen.models import ImageType

_HEAD_BYTES = 16


def sniff_image_type(head: bytes) -> ImageType | None:
    """The image type announced by a file's first bytes, or None when it is not PNG, JPEG or WebP."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return ImageType.PNG
    if head.startswith(b"\xff\xd8\xff"):
        return ImageType.JPEG
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return ImageType.WEBP
    return None


INLINE_PREFIX = "data:;base64,"


def inline_source(b64: str) -> str:
    """An image sent inline by the provider (base64), as the source a generation keeps in place of a link."""
    return INLINE_PREFIX + b64


def is_inline(source: str) -> bool:
    return source.startswith(INLINE_PREFIX)


def describe_link(url: str) -> str:
    """A link without its query string: signatures and expiry tokens stay out of logs."""
    if is_inline(url):
        return f"an inline image ({len(url) - len(INLINE_PREFIX)} base64 characters)"
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


class ImageBody(Protocol):
    """What an upload reads an image from: its sniffed type, then its bytes a part at a time."""

    image_type: ImageType

    async def read_into(self, part: io.BytesIO, size: int) -> int: ...


READ_CHUNK = 256 * 1024


class ImageDownload:
    """An image body being downloaded: uploads take it a part at a time with `read_into`."""

    def __init__(self, response: aiohttp.ClientResponse, url: str, max_bytes: int) -> None:
        self._response = response
        self._url = url
        self._max_bytes = max_bytes
        self._pending = b""
        self.declared_length = response.content_length
        self.bytes_read = 0
        self.image_type = ImageType.PNG

    async def _start(self) -> None:
        head = await self._read_raw(_HEAD_BYTES)
        found = sniff_image_type(head)
        if found is None:
            raise DownloadError(
                f"{describe_link(self._url)} did not serve an image (first bytes {head[:8]!r}, "
                f"Content-Type {self._response.content_type})",
                kind=FailureKind.TRANSIENT,
            )
        self.image_type = found
        self._pending = head

    async def _chunks(self, n: int) -> AsyncIterator[bytes]:
        """Up to n bytes from the network as they arrive, counted against the size cap."""
        wanted = n
        try:
            while wanted > 0:
                # Small reads: aiohttp lets its buffer grow to twice the largest read asked of it.
                chunk = await self._response.content.read(min(wanted, READ_CHUNK))
                if not chunk:
                    return
                self.bytes_read += len(chunk)
                if self.bytes_read > self._max_bytes:
                    raise DownloadError(
                        f"image at {describe_link(self._url)} is larger than DOWNLOAD_MAX_BYTES={self._max_bytes}",
                        kind=FailureKind.PERMANENT,
                    )
                wanted -= len(chunk)
                yield chunk
        except aiohttp.ClientPayloadError as exc:
            raise DownloadError(
                f"download of {describe_link(self._url)} was cut off after {self.bytes_read} bytes "
                f"({excerpt(str(exc), 80)})"
            ) from None
        except aiohttp.ClientError as exc:
            raise DownloadError(f"download of {describe_link(self._url)} failed: {type(exc).__name__}") from None

    def _check_whole(self, got: int, asked: int) -> None:
        """A short read is the end of the image only when the server said no more was coming."""
        if got < asked and self.declared_length is not None and self.bytes_read < self.declared_length:
            raise DownloadError(
                f"download of {describe_link(self._url)} was cut off at {self.bytes_read} of "
                f"{self.declared_length} bytes"
            )

    async def _read_raw(self, n: int) -> bytes:
        data = b"".join([chunk async for chunk in self._chunks(n)])
        self._check_whole(len(data), n)
        return data

    async def read_into(self, part: io.BytesIO, size: int) -> int:
        """Write the next `size` bytes of the image into `part` as they arrive (fewer only at the end) and
        return how many; each chunk is copied once. Uploads refill one part buffer this way."""
        head = self._pending[:size]
        part.write(head)
        self._pending = self._pending[len(head) :]
        asked, got = size - len(head), 0
        async for chunk in self._chunks(asked):
            part.write(chunk)
            got += len(chunk)
        self._check_whole(got, asked)
        return len(head) + got

    async def read_all(self) -> bytes:
        """The rest of the image in one piece, for a caller that buffers it whole."""
        rest = await self._read_raw(self._max_bytes + 1 - self.bytes_read)
        data, self._pending = self._pending + rest, b""
        return data


@asynccontextmanager
async def open_image(
    session: aiohttp.ClientSession, url: str, *, max_bytes: int, time_limit: float
) -> AsyncIterator[ImageDownload]:
    """Open a generated image link and yield its body, type already sniffed from the first bytes."""
    link = describe_link(url)
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=time_limit)) as response:
            if response.status in (403, 404, 410):
                raise LinkRefusedError(f"{link} answered HTTP {response.status}", status=response.status)
            if response.status != 200:
                raise DownloadError(f"{link} answered HTTP {response.status}", status=response.status)
            if response.content_length is not None and response.content_length > max_bytes:
                raise DownloadError(
                    f"image at {link} is {response.content_length} bytes, over DOWNLOAD_MAX_BYTES={max_bytes}",
                    kind=FailureKind.PERMANENT,
                )
            download = ImageDownload(response, url, max_bytes)
            await download._start()
            yield download
    except TimeoutError:
        raise DownloadError(f"download of {link} took longer than {time_limit:.0f} s") from None
    except aiohttp.ClientError as exc:
        raise DownloadError(f"download of {link} failed: {type(exc).__name__}") from None


class InlineImageBody:
    """An image that came inside the provider's answer: decoded when its transfer starts, one at a time."""

    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)
        self._offset = 0
        found = sniff_image_type(bytes(self._data[:_HEAD_BYTES]))
        if found is None:
            raise DownloadError(
                f"the inline image is not PNG, JPEG or WebP (first bytes {bytes(self._data[:8])!r})",
                kind=FailureKind.PERMANENT,
            )
        self.image_type = found

    async def read_into(self, part: io.BytesIO, size: int) -> int:
        chunk = self._data[self._offset : self._offset + size]
        part.write(chunk)
        self._offset += len(chunk)
        return len(chunk)


@asynccontextmanager
async def open_source(
    session: aiohttp.ClientSession, source: str, *, max_bytes: int, time_limit: float
) -> AsyncIterator[ImageBody]:
    """A generated image's body: downloaded from its link, or decoded from the inline base64 it came as."""
    if not is_inline(source):
        async with open_image(session, source, max_bytes=max_bytes, time_limit=time_limit) as download:
            yield download
        return
    try:
        data = base64.b64decode(source[len(INLINE_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        raise DownloadError("the inline image is not base64", kind=FailureKind.PERMANENT) from None
    if len(data) > max_bytes:
        raise DownloadError(
            f"the inline image is {len(data)} bytes, over DOWNLOAD_MAX_BYTES={max_bytes}", kind=FailureKind.PERMANENT
        )
    yield InlineImageBody(data)
