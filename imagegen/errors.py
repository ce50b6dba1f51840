"""Every error imagegen raises, in one tree.

    ImagegenError                      base: one readable line, `kind` says what to do about it
    ├── ConfigError                    a setting is missing or invalid (kind = account)
    ├── InvalidPromptId                a prompt id that is not 15 chars of [a-z0-9] (permanent)
    ├── InvalidRequest                 a web API request that can't be served as sent (bad JSON, bad paging)
    ├── PromptRejected                 the prompt can't be sent: empty, too long, a bad model/ratio/resolution
    ├── QueuePaused                    the queue was paused before this job could generate (wait, no attempt used)
    │   └── DailyLimitReached          today's JIMENG_DAILY_LIMIT is used up: no call made (the queue pauses)
    ├── JobInterrupted                 the worker is stopping before this job's paid call (back to the queue)
    ├── LeaseLost                      another run of the same prompt holds its lease: stop, pay nothing
    ├── ServiceDown                    a shared service stayed down past this job's budget (no attempt used)
    ├── JobTimeout                     the job used up its time budget (transient, uses an attempt)
    ├── InternalError                  anything unexpected, caught at the job boundary (transient)
    └── ServiceError                   a call to an outside service failed; keeps service/status/detail
        ├── ProviderError              an image provider's call: `retry_after`, whether it reached it or was paid
        │   ├── JimengError            the jimeng proxy (with the proxy's `code` when it sent one)
        │   └── ArkError               the official Volcengine Ark API (with its `error.code` when it sent one)
        ├── DownloadError              fetching the generated image bytes
        │   └── LinkRefusedError       the image link answered 403/404/410 (expired only when old enough)
        ├── StorageError               the S3-compatible bucket
        ├── PocketBaseError            the record store
        │   ├── RecordNotFound         no record with that id (permanent)
        │   └── RealtimeError          the realtime stream broke its protocol (transient: reconnect)
        └── QueueError                 Redis, which holds the queue

Transient errors of PocketBase, the bucket and Redis are *outages*: the job waits for the service in place
(see `outages`) instead of spending an attempt.

`PromptFailed` stands outside the tree: it is raised to arq only, so that arq counts a failed prompt as a
failed job (`j_failed`, `result_info().success`) while `imagegen inspect` still reads the outcome it carries.

`FailureKind` is the split that drives retries:
- TRANSIENT: try the same job again later (timeouts, dropped connections, 5xx, 429, empty results);
- PERMANENT: this prompt can't succeed as it is (moderation, bad request, empty prompt): fail it now;
- ACCOUNT: the account or configuration is wrong (expired key, no credits, bad S3 credentials):
  every job would fail the same way, so the queue must stop.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, TypedDict, Unpack


class FailureKind(StrEnum):
    TRANSIENT = "transient"
    PERMANENT = "permanent"
    ACCOUNT = "account"


class ImagegenError(Exception):
    """Base of every expected failure; `str()` is one line fit for a log or a CLI message."""

    kind: FailureKind = FailureKind.PERMANENT

    def __init__(self, message: str, *, kind: FailureKind | None = None) -> None:
        super().__init__(message)
        self.message = message
        if kind is not None:
            self.kind = kind

    def __str__(self) -> str:
        return self.message


class ConfigError(ImagegenError):
    """A setting is missing or invalid; the message names the variable and the fix."""

    kind = FailureKind.ACCOUNT


class InvalidPromptId(ImagegenError):
    kind = FailureKind.PERMANENT


class InvalidRequest(ImagegenError):
    """A web API request that can't be served as sent: bad JSON, a bad field, an unknown state, paging out of range."""

    kind = FailureKind.PERMANENT


class PromptRejected(ImagegenError):
    """The prompt can't be sent as it is: empty, too long, or with a model, ratio or resolution the API won't take."""

    kind = FailureKind.PERMANENT


class QueuePaused(ImagegenError):
    """Raised before a paid call when the queue is paused; the job waits and loses no attempt."""

    kind = FailureKind.TRANSIENT


class DailyLimitReached(QueuePaused):
    """Today's JIMENG_DAILY_LIMIT of paid calls is used up; nothing was called. `until` (epoch seconds) is the
    start of the next day in JIMENG_DAILY_LIMIT_TZ, when calls may start again."""

    def __init__(self, message: str, *, until: float) -> None:
        super().__init__(message)
        self.until = until


class AccountsUnavailable(ImagegenError):
    """No jimeng account can take a call: each is expired, out of credits, refused or cooling (`accounts`).
    `until` is when the first one comes back (epoch seconds; 0: only a replaced key brings one back)."""

    kind = FailureKind.ACCOUNT

    def __init__(self, message: str, *, until: float) -> None:
        super().__init__(message)
        self.until = until


class JobInterrupted(ImagegenError):
    """The worker is stopping and this job has not reached its paid call: it goes back to the queue."""

    kind = FailureKind.TRANSIENT


class LeaseLost(ImagegenError):
    """Another run of the same prompt holds its lease; this run must stop without paying or deleting."""

    kind = FailureKind.TRANSIENT


class ServiceDown(ImagegenError):
    """A shared service (PocketBase, the bucket, Redis) stayed down longer than this job can wait."""

    kind = FailureKind.TRANSIENT

    def __init__(self, message: str, *, service: str) -> None:
        super().__init__(message)
        self.service = service


class JobTimeout(ImagegenError):
    """The job's own deadline (below arq's QUEUE_JOB_TIMEOUT) passed; an attempt is used."""

    kind = FailureKind.TRANSIENT


class InternalError(ImagegenError):
    """Something unexpected (a bug, an unmapped library error) reached the job boundary."""

    kind = FailureKind.TRANSIENT


class ServiceError(ImagegenError):
    """A call to an outside service failed.

    `service` names it ("jimeng", "pocketbase", ...), `status` is the HTTP status when there was one and
    `detail` an excerpt of what the service said, already free of secrets.
    """

    service = "service"

    def __init__(
        self,
        message: str,
        *,
        kind: FailureKind | None = None,
        status: int | None = None,
        detail: str = "",
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, kind=kind)
        self.status = status
        self.detail = detail
        self.retry_after = retry_after

    def __str__(self) -> str:
        return f"{self.service}: {self.message}"


class ProviderError(ServiceError):
    """A call to an image provider failed (see `provider`).

    `reached` is False only when the request can't have left this host (the connection was never made): no
    call, nothing paid. `moderated`: content moderation refused it, a call made all the same. `paid` is False
    when the provider's answer says nothing was billed, None when that can't be known (a timeout, a dropped
    connection, a provider that does not say)."""

    def __init__(
        self,
        message: str,
        *,
        kind: FailureKind | None = None,
        status: int | None = None,
        detail: str = "",
        retry_after: float | None = None,
        moderated: bool = False,
        reached: bool = True,
        paid: bool | None = None,
    ) -> None:
        super().__init__(message, kind=kind, status=status, detail=detail, retry_after=retry_after)
        self.moderated = moderated
        self.reached = reached
        self.paid = paid if reached else False


class ProviderFields(TypedDict, total=False):
    """ProviderError's keyword arguments, which its subclasses pass on."""

    kind: FailureKind | None
    status: int | None
    detail: str
    retry_after: float | None
    moderated: bool
    reached: bool
    paid: bool | None


class JimengError(ProviderError):
    """The jimeng proxy's answer or the call to it failed; `code` is the proxy's (negative) code if it sent one.

    Refused by content moderation (-2006, or -2007 with 2038) is `moderated`: a call made, and counted."""

    service = "jimeng"

    def __init__(self, message: str, *, code: int | None = None, **fields: Unpack[ProviderFields]) -> None:
        super().__init__(message, **fields)
        self.code = code


class ArkError(ProviderError):
    """The Ark API's answer or the call to it failed; `code` is its `error.code` (`ModelNotOpen`, ...) if any."""

    service = "ark"

    def __init__(self, message: str, *, code: str = "", **fields: Unpack[ProviderFields]) -> None:
        super().__init__(message, **fields)
        self.code = code


class DownloadError(ServiceError):
    service = "image download"
    kind = FailureKind.TRANSIENT


class LinkRefusedError(DownloadError):
    """The generated image link answered 403/404/410: expired when the generation is old, else refused."""


class StorageError(ServiceError):
    service = "storage"


class PocketBaseError(ServiceError):
    service = "pocketbase"


class RecordNotFound(PocketBaseError):
    kind = FailureKind.PERMANENT


class RealtimeError(PocketBaseError):
    """The realtime stream answered or ended outside its protocol (`watch` reconnects)."""

    kind = FailureKind.TRANSIENT


class QueueError(ServiceError):
    service = "redis"
    kind = FailureKind.TRANSIENT


class PromptFailed(Exception):
    """A job whose prompt ended `failed`, raised to arq with the outcome (a plain dict, so it pickles)."""

    def __init__(self, outcome: dict[str, Any]) -> None:
        super().__init__(outcome)
        self.outcome = outcome

    def __str__(self) -> str:
        return str(self.outcome.get("error") or "the prompt failed")


def excerpt(text: str, limit: int = 200) -> str:
    """One line of at most `limit` characters of a service's answer, for error messages."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"
