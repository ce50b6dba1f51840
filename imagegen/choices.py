"""What a generation asks the API for (model, ratio, resolution) and the one check each value gets.

The same checks judge the `JIMENG_*` settings, a record's own `model`/`ratio`/`resolution` fields and the
options of `imagegen generate`, so a value is accepted or refused the same way wherever it is written.
Ratios and resolutions are the API's documented lists; the API takes any model name (unknown ones may
silently fall back to its default), so a model name only has to look like one.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from imagegen.errors import PromptRejected

RATIOS = ("1:1", "4:3", "3:4", "16:9", "9:16", "3:2", "2:3", "21:9")
RESOLUTIONS = ("1k", "2k", "4k")
# Model names as the proxies spell them (jimeng-4.0, jimeng-4.5, jimeng-3.1): no spaces, quotes or slashes.
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MODEL_RULE = (
    "must be a model name such as jimeng-4.0: 1-64 letters, digits, '.', '-' or '_', starting with a letter or digit"
)
# Ark's ids: a model (doubao-seedream-4-0-250828; seedream-4-0-250828 on the international endpoint) or an
# endpoint made in its console (ep-20250101123456-abcde).
_ARK_MODEL_ID = re.compile(r"(?:doubao-)?seedream-[a-z0-9][a-z0-9.-]*|ep-[A-Za-z0-9][A-Za-z0-9-]*")


def check_model(value: str) -> str:
    """The model name, or ValueError saying what a model name may be."""
    value = value.strip()
    if not _MODEL_NAME.fullmatch(value):
        raise ValueError(MODEL_RULE)
    return value


def is_ark_model(value: str) -> bool:
    """Whether a model name is an Ark model or endpoint id (the other names are jimeng's)."""
    return bool(_ARK_MODEL_ID.fullmatch(value.strip()))


def check_ark_model(value: str) -> str:
    """The Ark model or endpoint id, or ValueError saying what one looks like."""
    value = check_model(value)
    if not is_ark_model(value):
        raise ValueError("must be an Ark model id such as doubao-seedream-4-0-250828, or an endpoint id ep-...")
    return value


def check_ratio(value: str) -> str:
    """The aspect ratio, or ValueError listing the allowed ones."""
    value = value.strip()
    if value not in RATIOS:
        raise ValueError(f"must be one of {', '.join(RATIOS)}")
    return value


def check_resolution(value: str) -> str:
    """The resolution in lower case (`2K` is `2k`), or ValueError listing the allowed ones."""
    value = value.strip().lower()
    if value not in RESOLUTIONS:
        raise ValueError(f"must be one of {', '.join(RESOLUTIONS)}")
    return value


CHECKS: dict[str, Callable[[str], str]] = {"model": check_model, "ratio": check_ratio, "resolution": check_resolution}


@dataclass(frozen=True)
class Choices:
    """The model, ratio and resolution of one generation call."""

    model: str
    ratio: str
    resolution: str

    def overridden(self, given: Mapping[str, str], describe: Callable[[str, str, str], str]) -> Choices:
        """These choices with each non-empty value of `given` (keyed `model`, `ratio`, `resolution`) in place.

        A value that fails its check raises PromptRejected (permanent: nothing was paid, and trying again
        changes nothing) with the message `describe(name, value, what is allowed)`."""
        changes: dict[str, str] = {}
        for name, raw in given.items():
            if not raw.strip():
                continue  # empty: keep the setting
            try:
                changes[name] = CHECKS[name](raw)
            except ValueError as exc:
                raise PromptRejected(describe(name, raw, str(exc))) from None
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        return f"model {self.model}, {self.ratio}, {self.resolution}"
