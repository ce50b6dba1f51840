"""Hosting images in an S3-compatible bucket (Volcengine TOS in production, SeaweedFS locally).

Object keys derive from the prompt id only (`<prefix><id>/<n>.<ext>`), so a retry overwrites instead of
duplicating; images of `imagegen generate`, which have no record, go under `<prefix>generate/`. Uploads
stream from the download with bounded memory: one part buffer of `UPLOAD_MULTIPART_THRESHOLD` bytes per
transfer, refilled in place, multipart above that size.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import aioboto3
from aiobotocore.config import AioConfig
from botocore.exceptions import BotoCoreError, ClientError
from botocore.loaders import create_loader

from imagegen.errors import FailureKind, StorageError
from imagegen.settings import Settings

from .download import ImageBody

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client
    from types_aiobotocore_s3.type_defs import CompletedPartTypeDef

ONE_OFF_FOLDER = "generate"
_ACCOUNT_CODES = {
    "InvalidAccessKeyId": "the access key is unknown; check TOS_ACCESS_KEY_ID",
    "SignatureDoesNotMatch": "the secret does not match the key; check TOS_ACCESS_KEY_SECRET",
    "NoSuchBucket": "the bucket does not exist; check TOS_BUCKET",
    "InvalidBucketName": "the bucket name is invalid; check TOS_BUCKET",
    "AccessDenied": "access denied; check the key's permissions on TOS_BUCKET",
    "AllAccessDisabled": "access to the bucket is disabled",
    "InvalidToken": "the credentials are invalid",
}


def storage_error(exc: Exception, action: str, bucket: str) -> StorageError:
    """Turn a botocore failure into a StorageError: credential and bucket problems are account-level."""
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in _ACCOUNT_CODES:
            return StorageError(
                f"{action} in bucket {bucket!r} failed: {code}: {_ACCOUNT_CODES[code]}",
                kind=FailureKind.ACCOUNT,
                status=status,
                detail=code,
            )
        if code in ("404", "NotFound") and action.startswith("checking"):
            return StorageError(
                f"bucket {bucket!r} not found; check TOS_BUCKET", kind=FailureKind.ACCOUNT, status=status
            )
        if code in ("403", "Forbidden"):
            return StorageError(
                f"{action} in bucket {bucket!r} was refused (HTTP 403); check TOS_ACCESS_KEY_ID, "
                "TOS_ACCESS_KEY_SECRET and TOS_BUCKET",
                kind=FailureKind.ACCOUNT,
                status=status,
            )
        return StorageError(
            f"{action} in bucket {bucket!r} failed: {code or 'error'} (HTTP {status})",
            kind=FailureKind.TRANSIENT,
            status=status,
            detail=code,
        )
    return StorageError(f"{action} in bucket {bucket!r} failed: {type(exc).__name__}", kind=FailureKind.TRANSIENT)


@asynccontextmanager
async def open_s3_client(settings: Settings) -> AsyncIterator[S3Client]:
    """The one S3 client of a process; closed when the block ends."""
    config = AioConfig(
        signature_version="s3v4",
        s3={"addressing_style": settings.tos_addressing_style},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        retries={"max_attempts": 2, "mode": "standard"},
        # Every transfer of the worker may be uploading at once; botocore's default pool of 10 would queue them.
        max_pool_connections=settings.store_concurrency + 4,
        parameter_validation=False,  # our own calls, checked by the type checker; saves CPU on each request
        connect_timeout=10,
        read_timeout=60,
    )
    session = aioboto3.Session()
    async with session.client(
        "s3",
        endpoint_url=settings.tos_endpoint or None,
        region_name=settings.tos_region,
        aws_access_key_id=settings.tos_access_key_id,
        aws_secret_access_key=settings.tos_access_key_secret.get_secret_value(),
        config=config,
    ) as client:
        _cache_endpoints(client)
        yield client


# Parameters botocore hands S3's endpoint rules although no rule reads them (checked against the rule set).
_UNREAD_ENDPOINT_PARAMS = ("Key", "Prefix", "CopySource")


class _EndpointsByBucket:
    """botocore resolves each request's endpoint with a rule engine behind a cache keyed by all parameters,
    including the object key, so with a new key per image every request misses the cache and pays about a
    third of a millisecond. The rules never read the key: leaving it out makes every request after the first
    a cache hit, with the same endpoint."""

    def __init__(self, provider: Any) -> None:
        self._provider = provider

    def resolve_endpoint(self, **params: Any) -> Any:
        for name in _UNREAD_ENDPOINT_PARAMS:
            params.pop(name, None)
        return self._provider.resolve_endpoint(**params)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._provider, name)


def _cache_endpoints(client: S3Client) -> None:
    resolver = getattr(client, "_ruleset_resolver", None)
    provider = getattr(resolver, "_provider", None)
    if resolver is None or provider is None or not hasattr(provider, "resolve_endpoint"):
        return  # another botocore layout: requests still work, only without the shortcut
    rules = json.dumps(create_loader().load_service_model("s3", "endpoint-rule-set-1")["rules"])
    if any(f'"ref": "{name}"' in rules for name in _UNREAD_ENDPOINT_PARAMS):
        return  # a newer rule set reads them after all
    resolver._provider = _EndpointsByBucket(provider)


class Storage:
    """The bucket where images are hosted; built around one shared S3 client."""

    def __init__(self, client: S3Client, settings: Settings) -> None:
        self._client = client
        self.bucket = settings.tos_bucket
        self._prefix = settings.tos_key_prefix
        self._public_base = settings.tos_public_base_url
        self._threshold = settings.upload_multipart_threshold

    def prompt_prefix(self, prompt_id: str) -> str:
        return f"{self._prefix}{prompt_id}/"

    def object_key(self, prompt_id: str, index: int, extension: str) -> str:
        return f"{self.prompt_prefix(prompt_id)}{index}.{extension}"

    def one_off_key(self, run_id: str, index: int, extension: str) -> str:
        """The key of image `index` of one `imagegen generate` run (`run_id`: its UTC time and a random part).

        A folder of its own that no prompt id (15 characters) can name, so no record's clean-up touches it."""
        return f"{self._prefix}{ONE_OFF_FOLDER}/{run_id}-{index}.{extension}"

    def public_url(self, key: str) -> str:
        return f"{self._public_base}/{key}"

    async def upload_image(self, key: str, image: ImageBody, on_upload: Callable[[], None] | None = None) -> int:
        """Stream one downloaded image into the bucket under `key`; returns the bytes stored. `on_upload` is
        called when the first bytes go to the bucket.

        Below the threshold one PUT; above it a multipart upload. The image passes through one part buffer
        (a BytesIO, which botocore and aiohttp send in small reads without copying it whole), refilled in place
        part after part: a transfer holds one part in memory whatever the image size.
        """
        part = io.BytesIO()
        try:
            filled = await image.read_into(part, self._threshold)
            part.seek(0)
            if on_upload is not None:
                on_upload()
            if filled < self._threshold:
                await self._client.put_object(
                    Bucket=self.bucket, Key=key, Body=part, ContentType=image.image_type.value
                )
                return filled
            return await self._upload_parts(key, image, part)
        except (ClientError, BotoCoreError) as exc:
            raise storage_error(exc, f"uploading {key}", self.bucket) from None
        finally:
            part.close()

    async def _upload_parts(self, key: str, image: ImageBody, part: io.BytesIO) -> int:
        created = await self._client.create_multipart_upload(
            Bucket=self.bucket, Key=key, ContentType=image.image_type.value
        )
        upload_id = created["UploadId"]
        parts: list[CompletedPartTypeDef] = []
        total, filled = 0, self._threshold
        try:
            while filled:
                number = len(parts) + 1
                answer = await self._client.upload_part(
                    Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=part
                )
                parts.append({"ETag": answer["ETag"], "PartNumber": number})
                total += filled
                part.seek(0)
                filled = await image.read_into(part, self._threshold)
                part.truncate(filled)  # the last part is shorter
                part.seek(0)
            await self._client.complete_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
        except BaseException:
            # Parts of an unfinished upload cost storage until aborted.
            with contextlib.suppress(ClientError, BotoCoreError):
                await asyncio.shield(
                    self._client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
                )
            raise
        return total

    async def exists(self, key: str) -> bool:
        try:
            await self._client.head_object(Bucket=self.bucket, Key=key)
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise storage_error(exc, f"checking {key}", self.bucket) from None
        except BotoCoreError as exc:
            raise storage_error(exc, f"checking {key}", self.bucket) from None

    async def remove_others(self, prompt_id: str, keep: Iterable[str]) -> list[str]:
        """Delete objects under the prompt's prefix that are not in `keep` (left by an earlier run)."""
        wanted = set(keep)
        stale: list[str] = []
        try:
            paginator = self._client.get_paginator("list_objects_v2")
            async for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prompt_prefix(prompt_id)):
                stale.extend(o["Key"] for o in page.get("Contents", []) if o["Key"] not in wanted)
            for key in stale:
                await self._client.delete_object(Bucket=self.bucket, Key=key)
        except (ClientError, BotoCoreError) as exc:
            raise storage_error(exc, f"cleaning {self.prompt_prefix(prompt_id)}", self.bucket) from None
        return stale

    async def check(self) -> None:
        """Raise StorageError unless the bucket is reachable with these credentials."""
        try:
            await self._client.head_bucket(Bucket=self.bucket)
        except (ClientError, BotoCoreError) as exc:
            raise storage_error(exc, "checking access", self.bucket) from None
