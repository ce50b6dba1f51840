"""The outcomes the Ark sandbox can play for one generation call, as ark-api.md describes the real API.

An outcome is chosen by a script queued for a prompt or by a marker in the prompt: `[[ark:<code>]]` answers
that error row (`[[ark:ModelNotOpen]]`), `[[ark:slow:2]]` waits 2 s first, `[[ark:hang]]` never answers,
`[[ark:drop]]` closes the connection mid-call, `[[ark:html-502]]` is a gateway's HTML page. Two markers shape
a success instead: `[[ark:images=3]]` (in group mode the model makes this many, up to `max_images`) and
`[[ark:blocked=1,2]]` (those positions come back as moderation errors: a partial success).
"""

from __future__ import annotations

import re

from imagegen.dev.jimeng_sandbox.modes import slow_delay

MARKER = re.compile(r"\[\[ark:([^\]]+)\]\]")

_ID = "Request id: 021733593745000fake"

# code -> (HTTP status, message), one entry per row of ark-api.md's error table. The statuses of
# QuotaExceeded and SetLimitExceeded are not documented: 429 here, so a client that trusts the status over
# the code mistakes a spent budget for a rate limit.
ERRORS: dict[str, tuple[int, str]] = {
    "MissingParameter": (400, f"The request failed because it is missing one or multiple required parameters. {_ID}"),
    "InvalidParameter": (400, f"A parameter specified in the request is not valid. {_ID}"),
    "InvalidParameter.size": (400, f"The parameter `size` specified in the request is not valid. {_ID}"),
    "InputTextSensitiveContentDetected": (
        400,
        f"The request failed because the input text may contain sensitive information. {_ID}",
    ),
    "InputTextSensitiveContentDetected.PolicyViolation": (
        400,
        f"The request failed because the input text may violate the content policy. {_ID}",
    ),
    "InputImageSensitiveContentDetected": (
        400,
        f"The request failed because the input image may contain sensitive information. {_ID}",
    ),
    "OutputImageSensitiveContentDetected": (
        400,
        f"The request failed because the output image may contain sensitive information. {_ID}",
    ),
    "OutputImageSensitiveContentDetected.PrivacyInformation": (
        400,
        f"The request failed because the output image may contain privacy information. {_ID}",
    ),
    "AuthenticationError": (401, f"The API key or AK/SK in the request is missing or invalid. {_ID}"),
    "AccountOverdueError": (403, f"The request failed because your account has an overdue balance. {_ID}"),
    "AccessDenied": (403, f"The request failed because you do not have access to the requested resource. {_ID}"),
    "OperationDenied.ServiceOverdue": (403, f"Your service is suspended because of an overdue balance. {_ID}"),
    "ModelNotOpen": (
        404,
        f"Your account has not activated the model. Please activate the model service in the Ark Console. {_ID}",
    ),
    "InvalidEndpointOrModel.NotFound": (
        404,
        f"The model or endpoint does not exist or you do not have access to it. {_ID}",
    ),
    "InvalidEndpointOrModel.ModelIDAccessDisabled": (
        404,
        f"Access to the model id is disabled for your account. {_ID}",
    ),
    "ModelAccountIpmRateLimitExceeded": (
        429,
        f"The request has exceeded the images per minute (IPM) limit of the model for your account. {_ID}",
    ),
    "ModelAccountRpmRateLimitExceeded": (
        429,
        f"The request has exceeded the requests per minute (RPM) limit of the model for your account. {_ID}",
    ),
    "RateLimitExceeded.EndpointRPMExceeded": (429, f"The request has exceeded the RPM limit of the endpoint. {_ID}"),
    "AccountRateLimitExceeded": (429, f"The request has exceeded the rate limit of your account. {_ID}"),
    "RequestBurstTooFast": (
        429,
        f"The request rate rose too fast. Please ramp up your request rate gradually. {_ID}",
    ),
    "ServerOverloaded": (429, f"The service is overloaded; please try again later. {_ID}"),
    "InternalServiceError": (500, f"The service encountered an unexpected internal error. {_ID}"),
    "QuotaExceeded": (429, f"Your account has used up its quota for the model. {_ID}"),
    "SetLimitExceeded": (429, f"Your account has reached the inference limit you set in the Ark Console. {_ID}"),
}

OTHER_MODES = ("ok", "hang", "drop", "html-502")


def is_known(mode: str) -> bool:
    return slow_delay(mode) is not None or mode in ERRORS or mode in OTHER_MODES


def markers(prompt: str) -> list[str]:
    """Every `[[ark:...]]` marker of a prompt, in order."""
    return MARKER.findall(prompt)


def count_marker(found: list[str], name: str) -> list[int] | None:
    """The numbers of a `name=1,2` marker, if the prompt has one."""
    for marker in found:
        key, _, value = marker.partition("=")
        if key == name and value:
            return [int(part) for part in value.split(",") if part.strip().isdigit()]
    return None


def outcome_marker(found: list[str]) -> str | None:
    """The outcome a prompt's markers ask for (an error row, slow, hang, drop), if any."""
    return next((marker for marker in found if "=" not in marker), None)
