"""Log configuration, done once at an entry point: loguru sinks, standard logging routed in, secrets scrubbed.

Info and below go to stdout, warnings and errors to stderr, which is what supervisord splits into
`logs/worker-<n>-out.log` and `logs/worker-<n>-error.log` (one pair per worker process).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING, TextIO

from loguru import logger

from imagegen.errors import PromptFailed

if TYPE_CHECKING:
    from loguru import Record

FORMAT = "{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <7} | {process} | {extra[prompt_id]: <15} | {message}"


class _InterceptHandler(logging.Handler):
    """Hands records of the standard logging module (arq, aiohttp, botocore) to loguru."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        exc_info = record.exc_info
        if exc_info and isinstance(exc_info[1], PromptFailed):
            exc_info = None  # an expected outcome, already logged by the job: no traceback
        logger.opt(exception=exc_info).log(level, "{}: {}", record.name, record.getMessage())


class _Scrubber:
    """Replaces every configured secret with *** in each message before any sink sees it."""

    def __init__(self, secrets: Iterable[str]) -> None:
        self._secrets = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)

    def __call__(self, record: Record) -> None:
        record["extra"].setdefault("prompt_id", "-")
        message = record["message"]
        for secret in self._secrets:
            if secret in message:
                message = message.replace(secret, "***")
        record["message"] = message

    def scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text


class _ScrubbedStream:
    """A sink that writes each formatted line, traceback included, with every secret replaced by ***
    (the patcher above sees only the message; a traceback's lines name the values of its exceptions)."""

    def __init__(self, stream: TextIO, scrubber: _Scrubber) -> None:
        self._stream = stream
        self._scrubber = scrubber

    def write(self, text: str) -> None:
        self._stream.write(self._scrubber.scrub(text))

    def flush(self) -> None:
        self._stream.flush()

    def isatty(self) -> bool:
        return self._stream.isatty()


def scrub(text: str, secrets: Iterable[str]) -> str:
    """`text` with every configured secret replaced by ***, for anything that leaves the process."""
    return _Scrubber(secrets).scrub(text)


def setup_logging(level: str = "INFO", secrets: Iterable[str] = (), *, colorize: bool | None = None) -> None:
    """Configure loguru and route standard logging into it; call once per process."""
    scrubber = _Scrubber(secrets)
    logger.remove()
    logger.configure(patcher=scrubber, extra={"prompt_id": "-"})
    threshold = logger.level(level).no
    warning = logger.level("WARNING").no
    logger.add(
        _ScrubbedStream(sys.stdout, scrubber),
        level=level,
        format=FORMAT,
        filter=lambda record: record["level"].no < warning,
        colorize=colorize,
        backtrace=False,
        diagnose=False,
    )
    logger.add(
        _ScrubbedStream(sys.stderr, scrubber),
        level=max(threshold, warning),
        format=FORMAT,
        colorize=colorize,
        diagnose=False,
    )
    handler = _InterceptHandler()
    logging.basicConfig(handlers=[handler], level=logging.INFO, force=True)
    for name, std_level in (
        ("arq", logging.INFO),
        ("aiohttp", logging.WARNING),
        ("botocore", logging.WARNING),
        ("aiobotocore", logging.WARNING),
        ("boto3", logging.WARNING),
    ):
        std = logging.getLogger(name)
        std.handlers = [handler]
        std.setLevel(std_level)
        std.propagate = False
