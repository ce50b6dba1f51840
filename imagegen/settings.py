"""Settings from the environment and `.env`, built once at an entry point and passed down.

Variable names are the attribute names in upper case (`REDIS_HOST` -> `redis_host`), the same names the
BullMQ system used, so existing `.env` files keep working. `load_settings()` turns a validation failure
into one `ConfigError` line naming the variable.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, PrivateAttr, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from imagegen.choices import Choices, check_ark_model, check_model, check_ratio, check_resolution
from imagegen.errors import ConfigError
from imagegen.models import RecordStatus

MIB = 1024 * 1024
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_HOST_NAME = re.compile(rf"^(?:{_LABEL}\.)*{_LABEL}$|^[0-9a-f:.]+$")
_FIELD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
PROVIDERS = ("jimeng", "ark")
SECRET_FIELDS = (
    "redis_password",
    "redis_url",
    "jimeng_api_key",
    "ark_api_key",
    "tos_access_key_secret",
    "pocketbase_password",
    "api_token",
)
# Seconds a job keeps, below arq's QUEUE_JOB_TIMEOUT, to record its outcome after its own deadline.
FINISH_RESERVE = 10.0
# Real generations take tens of seconds and queue for minutes at peak; a shorter limit abandons paid calls.
JIMENG_TIMEOUT_FLOOR = 120_000
JIMENG_TIMEOUT_ADVISED = 600_000
# TOS's native API endpoint (tos-<region>.volces.com, or .ivolces.com inside Volcengine), which S3 clients
# can't use; its S3 endpoint is tos-s3-<region>.<same domain>.
_TOS_NATIVE_HOST = re.compile(r"tos-(?!s3-)(?P<region>[a-z0-9-]+)\.(?P<domain>i?volces\.com)")


class Settings(BaseSettings):
    """Everything imagegen can be told; see `.env.example` for each variable's meaning."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")
    _notes: list[str] = PrivateAttr(default_factory=list)

    # Redis (the queue)
    redis_host: str = "localhost"
    redis_port: int = Field(6379, ge=1, le=65535)
    redis_password: SecretStr | None = None
    redis_db: int = Field(0, ge=0)
    # Instead of host/port: a URL (redis:// or rediss:// for TLS), or Redis Sentinel for a highly available Redis.
    redis_url: SecretStr | None = None
    redis_tls_ca_file: str = ""
    redis_sentinels: str = ""
    redis_sentinel_master: str = "mymaster"

    # jimeng API
    jimeng_api_key: SecretStr = SecretStr("")
    jimeng_api_url: str = "https://jimeng-api.kevisual.cn/v1"
    jimeng_timeout: int = Field(600_000, gt=0, description="milliseconds")
    jimeng_model: str = "jimeng-4.0"
    jimeng_ratio: str = "1:1"
    jimeng_resolution: str = "2k"
    jimeng_link_lifetime: int = Field(7200, ge=1, description="seconds the API's image links stay valid")
    jimeng_max_inflight: int = Field(0, ge=0, description="concurrent calls across every worker; 0 no cap")
    jimeng_rate_limit: int = Field(0, ge=0, description="calls started per minute across every worker; 0 none")
    jimeng_daily_limit: int = Field(0, ge=0, description="jimeng calls a day, every worker and `generate`; 0 none")
    jimeng_daily_limit_tz: str = Field("UTC", description="IANA time zone whose midnight starts a day of the limit")
    # The accounts of JIMENG_API_KEY (comma-separated keys): caps of each one, across every worker.
    jimeng_account_concurrency: int = Field(0, ge=0, description="calls at once per account; 0 no cap")
    jimeng_account_daily_limit: int = Field(0, ge=0, description="calls a day per account; 0 none")
    jimeng_claim_daily: bool = False  # claim each account's free credits once a day (/token/receive)

    # Volcengine Ark, the official Seedream API (see `ark`)
    # Providers a call tries in order: `jimeng` (its pool of accounts), `ark` (the official API).
    image_providers: str = "jimeng"
    ark_api_key: SecretStr | None = None
    ark_base_url: str = "https://ark.cn-beijing.volces.com/api/v3"
    ark_model: str = "doubao-seedream-4-0-250828"
    ark_watermark: bool = Field(False, description="ask Ark to mark the images 'AI生成' (it does unless told not to)")
    ark_response_format: Literal["url", "b64_json"] = "url"
    ark_max_images: int = Field(1, ge=1, le=15, description="1: one image a call; more: up to this many, as a group")
    ark_timeout: int = Field(600, gt=0, description="seconds")
    ark_daily_limit: int = Field(0, ge=0, description="Ark calls per day across every worker; 0 none")

    # object storage (Volcengine TOS or any S3-compatible store)
    tos_bucket: str = ""
    tos_access_key_id: str = ""
    tos_access_key_secret: SecretStr = SecretStr("")
    tos_region: str = "cn-beijing"
    tos_endpoint: str = "https://tos-s3-cn-beijing.volces.com"
    tos_addressing_style: Literal["virtual", "path"] = "virtual"
    tos_public_base_url: str = ""
    tos_key_prefix: str = "imagegen/"

    # PocketBase (the prompts)
    pocketbase_url: str = "http://127.0.0.1:8090"
    pocketbase_email: str = ""
    pocketbase_password: SecretStr = SecretStr("")
    pocketbase_collection: str = "prompts"
    pocketbase_field_prompt: str = "prompt"
    pocketbase_field_negative_prompt: str = "negativePrompt"
    pocketbase_field_image_url: str = "imageUrl"
    pocketbase_field_status: str = "status"
    pocketbase_field_error: str = "error"
    pocketbase_field_images: str = "images"
    # Optional per-record choices; a record's empty value means the JIMENG_* setting.
    pocketbase_field_model: str = "model"
    pocketbase_field_ratio: str = "ratio"
    pocketbase_field_resolution: str = "resolution"
    # Optional number field: a record's priority (higher runs first; see `priority`).
    pocketbase_field_priority: str = "priority"
    # Status values that mean "pending" as well as an empty status (comma-separated); never imagegen's own.
    pocketbase_pending_values: str = "pending"
    pocketbase_watch: bool = Field(False, description="queue records as they are created (realtime subscription)")

    # queue and worker
    queue_name: str = "imagegen:queue"
    queue_concurrency: int = Field(5, ge=1, le=1000, description="paid calls at once per worker process")
    queue_max_failed: int = Field(10, ge=1)
    queue_attempts: int = Field(3, ge=1, le=100)
    queue_backoff: float = Field(5.0, ge=0)
    queue_backoff_max: float = Field(600.0, ge=0)
    queue_job_timeout: int = Field(3600, ge=10, description="seconds")
    queue_poll_interval: float = Field(
        0.5, gt=0, le=600, description="seconds between looks at the queue when no worker was told of new jobs"
    )
    queue_keep_result: int = Field(7 * 24 * 3600, ge=60, description="seconds")
    worker_shutdown_grace: int = Field(720, ge=0, description="seconds")
    worker_lease: float = Field(10.0, ge=2, le=600, description="seconds a dead worker's jobs stay claimed")
    reconcile_interval: float = Field(60.0, gt=0, description="seconds between sweeps for stranded records")
    # A worker's /metrics and /healthz: off at 0; process N under supervisord listens on the port + N.
    worker_metrics_port: int = Field(0, ge=0, le=65535, description="first port of the workers' /metrics; 0 off")
    worker_metrics_host: str = "127.0.0.1"
    worker_index: int = Field(0, ge=0, le=10_000, description="this worker's number (supervisord's process_num)")
    outage_pause_after: float = Field(60.0, ge=0, description="seconds of outage before the queue pauses; 0 never")

    # image download and upload
    download_max_bytes: int = Field(50 * MIB, ge=1024)
    download_timeout: int = Field(300, gt=0, description="seconds")
    download_tries: int = Field(3, ge=1, le=10, description="tries per image before the attempt fails")
    upload_multipart_threshold: int = Field(8 * MIB, ge=5 * MIB)
    store_concurrency: int = Field(10, ge=1, le=1000, description="image transfers at once per worker process")
    store_backlog: int = Field(
        50, ge=1, le=100_000, description="finished generations a worker process may hold waiting to be stored"
    )
    prompt_max_chars: int = Field(4000, ge=1)

    # the web API and dashboard (`imagegen serve`)
    api_token: SecretStr = SecretStr("")
    web_host: str = "127.0.0.1"
    web_port: int = Field(8300, ge=1, le=65535)
    # Host names the server answers to besides its bind address and localhost (comma-separated): the names a
    # reverse proxy or the operator's browser use for it.
    web_allowed_hosts: str = ""
    # How long record counts (status, the API, the dashboard, /metrics) are shared before PocketBase is counted
    # again; 0 counts on every look.
    record_counts_max_age: float = Field(5.0, ge=0, le=3600, description="seconds")

    log_level: Literal["TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR"] = "INFO"

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None
        if urlsplit(value.get_secret_value()).scheme not in ("redis", "rediss"):
            raise ValueError("must start with redis:// or rediss:// (TLS)")
        return value

    @field_validator("ark_api_key")
    @classmethod
    def _optional_key(cls, value: SecretStr | None) -> SecretStr | None:
        return value if value is not None and value.get_secret_value().strip() else None

    @field_validator("image_providers")
    @classmethod
    def _providers(cls, value: str) -> str:
        names = [part.strip().lower() for part in value.split(",") if part.strip()]
        unknown = [name for name in names if name not in PROVIDERS]
        if not names or unknown or len(set(names)) != len(names):
            raise ValueError(f"must name each of {', '.join(PROVIDERS)} at most once, in order, comma-separated")
        return ",".join(names)

    @field_validator("redis_sentinels")
    @classmethod
    def _sentinels(cls, value: str) -> str:
        for entry in filter(None, (part.strip() for part in value.split(","))):
            host, _, port = entry.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError("must be host:port pairs separated by commas")
        return value.strip()

    # The checks records and `imagegen generate` use too (see `choices`).
    _known_model = field_validator("jimeng_model")(check_model)
    _known_ratio = field_validator("jimeng_ratio")(check_ratio)
    _known_resolution = field_validator("jimeng_resolution")(check_resolution)
    _ark_model = field_validator("ark_model")(check_ark_model)

    @field_validator("jimeng_daily_limit_tz")
    @classmethod
    def _time_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value.strip())
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError("must be an IANA time zone name, e.g. UTC or Asia/Shanghai") from None
        return value.strip()

    @field_validator("jimeng_api_url", "ark_base_url", "pocketbase_url", "tos_public_base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if value and urlsplit(value).scheme not in ("http", "https"):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("tos_endpoint")
    @classmethod
    def _endpoint_url(cls, value: str) -> str:
        # The seed wrote bare host names (tos-cn-beijing.volces.com); S3 clients need a URL.
        value = value.strip().rstrip("/")
        if value and "://" not in value:
            value = "https://" + value
        return value

    @field_validator(
        "pocketbase_collection",
        "pocketbase_field_prompt",
        "pocketbase_field_image_url",
    )
    @classmethod
    def _identifier(cls, value: str) -> str:
        if not _FIELD_NAME.match(value):
            raise ValueError("must be a PocketBase name: letters, digits and _, not starting with a digit")
        return value

    @field_validator(
        "pocketbase_field_negative_prompt",
        "pocketbase_field_status",
        "pocketbase_field_error",
        "pocketbase_field_images",
        "pocketbase_field_model",
        "pocketbase_field_ratio",
        "pocketbase_field_resolution",
        "pocketbase_field_priority",
    )
    @classmethod
    def _optional_identifier(cls, value: str) -> str:
        if value and not _FIELD_NAME.match(value):
            raise ValueError("must be a PocketBase field name, or empty when the collection has no such field")
        return value

    @field_validator("pocketbase_pending_values")
    @classmethod
    def _pending_values(cls, value: str) -> str:
        values = [part.strip() for part in value.split(",") if part.strip()]
        own = [v for v in values if v in {s.value for s in RecordStatus} - {""}]
        if own:
            raise ValueError(
                f"{', '.join(own)} is a status imagegen writes itself, so it can't mean pending; list only the "
                "values your app gives new records (e.g. pending,new)"
            )
        return ",".join(values)

    def pending_values(self) -> tuple[str, ...]:
        """POCKETBASE_PENDING_VALUES as a tuple."""
        return tuple(v for v in self.pocketbase_pending_values.split(",") if v)

    @field_validator("web_allowed_hosts")
    @classmethod
    def _host_names(cls, value: str) -> str:
        names = [name.strip().lower() for name in value.split(",") if name.strip()]
        for name in names:
            if not _HOST_NAME.fullmatch(name):
                raise ValueError(
                    f"{name!r} is not a host name: list bare names or addresses, comma-separated "
                    "(images.example.com,10.0.0.5), without scheme, port or path"
                )
        return ",".join(names)

    def allowed_web_hosts(self) -> list[str]:
        """WEB_ALLOWED_HOSTS as a list of lowercased names."""
        return [name for name in self.web_allowed_hosts.split(",") if name]

    @field_validator("tos_key_prefix")
    @classmethod
    def _key_prefix(cls, value: str) -> str:
        value = value.lstrip("/")
        return value if not value or value.endswith("/") else value + "/"

    @model_validator(mode="after")
    def _endpoints(self) -> Settings:
        parts = urlsplit(self.tos_endpoint)
        native = _TOS_NATIVE_HOST.fullmatch(parts.hostname or "")
        if native:
            s3_host = f"tos-s3-{native['region']}.{native['domain']}"
            self._notes.append(
                f"TOS_ENDPOINT={parts.netloc} is TOS's native API, which S3 clients can't use; using its S3 "
                f"endpoint {s3_host} instead - set TOS_ENDPOINT=https://{s3_host} to silence this"
            )
            self.tos_endpoint = f"{parts.scheme}://{s3_host}"
        if not self.tos_public_base_url and self.tos_endpoint and self.tos_bucket:
            parts = urlsplit(self.tos_endpoint)
            if self.tos_addressing_style == "virtual":
                self.tos_public_base_url = f"{parts.scheme}://{self.tos_bucket}.{parts.netloc}"
            else:
                self.tos_public_base_url = f"{self.tos_endpoint}/{self.tos_bucket}"
        if self.jimeng_timeout < JIMENG_TIMEOUT_FLOOR:
            self._notes.append(
                f"JIMENG_TIMEOUT={self.jimeng_timeout} ms gives a generation only {self.jimeng_timeout_seconds:g} s; "
                "real ones take up to minutes, so slow calls are abandoned (and may still be billed) and retried - "
                f"set JIMENG_TIMEOUT={JIMENG_TIMEOUT_ADVISED}"
            )
        return self

    def warnings(self) -> list[str]:
        """Settings that work but are probably not what was meant, one line each."""
        return list(self._notes)

    @model_validator(mode="after")
    def _time_budgets(self) -> Settings:
        jimeng = self.jimeng_timeout_seconds
        needed = jimeng + self.download_timeout + FINISH_RESERVE
        if self.queue_job_timeout < needed:
            raise ValueError(
                f"QUEUE_JOB_TIMEOUT={self.queue_job_timeout} can't hold JIMENG_TIMEOUT={self.jimeng_timeout} "
                f"({jimeng:g} s) plus DOWNLOAD_TIMEOUT={self.download_timeout} plus {FINISH_RESERVE:g} s to record "
                f"the result: raise QUEUE_JOB_TIMEOUT to at least {needed:.0f} or lower JIMENG_TIMEOUT"
            )
        if self.worker_shutdown_grace < jimeng:
            raise ValueError(
                f"WORKER_SHUTDOWN_GRACE={self.worker_shutdown_grace} is shorter than JIMENG_TIMEOUT="
                f"{self.jimeng_timeout} ({jimeng:g} s): a stop would cut paid calls short; raise "
                f"WORKER_SHUTDOWN_GRACE to at least {jimeng:.0f}"
            )
        if "ark" in self.providers() and self.ark_api_key is None:
            raise ValueError(
                "IMAGE_PROVIDERS names ark but ARK_API_KEY is empty: set ARK_API_KEY or take ark out of IMAGE_PROVIDERS"
            )
        ark_needed = self.ark_timeout + self.download_timeout + FINISH_RESERVE
        if self.ark_api_key is not None and self.queue_job_timeout < ark_needed:
            raise ValueError(
                f"QUEUE_JOB_TIMEOUT={self.queue_job_timeout} can't hold ARK_TIMEOUT={self.ark_timeout} plus "
                f"DOWNLOAD_TIMEOUT={self.download_timeout} plus {FINISH_RESERVE:g} s to record the result: raise "
                f"QUEUE_JOB_TIMEOUT to at least {ark_needed:.0f} or lower ARK_TIMEOUT"
            )
        return self

    def providers(self) -> list[str]:
        """IMAGE_PROVIDERS in order."""
        return self.image_providers.split(",")

    def daily_limits(self) -> dict[str, int]:
        """Each provider's daily limit (0: none), IMAGE_PROVIDERS first in their order, then the others (a
        provider left out may still have counts: `imagegen generate` calls jimeng, an earlier setting Ark)."""
        limits = {"jimeng": self.jimeng_daily_limit, "ark": self.ark_daily_limit}
        return {name: limits[name] for name in [*self.providers(), *limits] if name in limits}

    @property
    def call_timeout(self) -> float:
        """Seconds the longest paid call of the configured providers may take."""
        jimeng = self.jimeng_timeout_seconds if "jimeng" in self.providers() else 0.0
        return max(jimeng, float(self.ark_timeout) if "ark" in self.providers() else 0.0)

    @property
    def job_budget(self) -> float:
        """Seconds a job may work before its own deadline (arq's QUEUE_JOB_TIMEOUT minus the finish reserve)."""
        return self.queue_job_timeout - FINISH_RESERVE

    @property
    def default_choices(self) -> Choices:
        """The model, ratio and resolution asked for unless a record or a command option says otherwise."""
        return Choices(self.jimeng_model, self.jimeng_ratio, self.jimeng_resolution)

    @property
    def daily_limit_zone(self) -> ZoneInfo:
        """The time zone whose midnight starts a new day of JIMENG_DAILY_LIMIT and ARK_DAILY_LIMIT (and of spend)."""
        return ZoneInfo(self.jimeng_daily_limit_tz)

    def jimeng_keys(self) -> list[SecretStr]:
        """The keys of JIMENG_API_KEY, one per account: comma-separated, blanks and repeats dropped, in order."""
        keys = [part.strip() for part in self.jimeng_api_key.get_secret_value().split(",")]
        return [SecretStr(key) for key in dict.fromkeys(key for key in keys if key)]

    @property
    def jimeng_timeout_seconds(self) -> float:
        return self.jimeng_timeout / 1000

    def sentinel_hosts(self) -> list[tuple[str, int]]:
        pairs = [part.strip().rpartition(":") for part in self.redis_sentinels.split(",") if part.strip()]
        return [(host, int(port)) for host, _, port in pairs]

    def redis_address(self) -> str:
        """Which Redis, as host:port/db (through Sentinel: the master's name/db and the sentinels); no password."""
        if self.redis_sentinels:
            return f"{self.redis_sentinel_master}/{self.redis_db} via Sentinel {self.redis_sentinels}"
        if self.redis_url is not None:
            parts = urlsplit(self.redis_url.get_secret_value())
            tls = " over TLS" if parts.scheme == "rediss" else ""
            return f"{parts.hostname}:{parts.port or 6379}/{parts.path.strip('/') or 0}{tls}"
        return f"{self.redis_host}:{self.redis_port}/{self.redis_db}"

    def redis_location(self) -> str:
        """Where Redis is, in words fit for a message: no password."""
        if self.redis_sentinels:
            return f"Redis Sentinel {self.redis_sentinels} (master {self.redis_sentinel_master})"
        if self.redis_url is not None:
            parts = urlsplit(self.redis_url.get_secret_value())
            return f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}{parts.path}"
        return f"Redis at {self.redis_address()}"

    def secrets(self) -> list[str]:
        """The configured secret values, for scrubbing them out of any text that leaves the process."""
        values = [getattr(self, name) for name in SECRET_FIELDS]
        found = [v.get_secret_value() for v in values if v is not None and v.get_secret_value()]
        # Each account's key alone too: a message about one account must not show it either.
        found += [key.get_secret_value() for key in self.jimeng_keys()]
        if self.redis_url is not None and urlsplit(self.redis_url.get_secret_value()).password:
            found.append(str(urlsplit(self.redis_url.get_secret_value()).password))
        return found


def load_settings(env_file: Path | str | Sequence[Path | str] | None = ".env", *, must_exist: bool = False) -> Settings:
    """Build the settings once; a bad value raises one ConfigError line naming the variable.

    Several files are read in order, a later one winning; the environment wins over all of them. With
    `must_exist`, a file that isn't there is an error instead of nothing to read."""
    files = env_file if env_file is None or isinstance(env_file, (str, Path)) else tuple(env_file)
    if must_exist:
        for path in [files] if isinstance(files, (str, Path)) else files or ():
            if not Path(path).is_file():
                raise ConfigError(f"settings file {str(path)!r} not found - check the --env-file path")
    try:
        return Settings(_env_file=files)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc)) from None


def describe_validation_error(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        message = error["msg"].removeprefix("Value error, ")
        if not error["loc"]:
            problems.append(message)  # a rule across settings names them itself
            continue
        name = str(error["loc"][0])
        shown = "" if name in SECRET_FIELDS else f" (got {error.get('input')!r})"
        problems.append(f"{name.upper()}: {message}{shown}")
    return "invalid setting " + "; ".join(problems) + " - fix it in the environment or .env"


def require(settings: Settings, *names: str) -> None:
    """Fail with one line when a setting a command needs is empty."""
    missing = []
    for name in names:
        value = getattr(settings, name)
        raw = value.get_secret_value() if isinstance(value, SecretStr) else value
        if not raw:
            missing.append(name.upper())
    if missing:
        raise ConfigError(f"{', '.join(missing)} not set - add it to the environment or .env")
