"""Who may reach imagegen's HTTP endpoints (the API of `imagegen serve`, a worker's metrics).

One rule for both: with API_TOKEN set, callers send `Authorization: Bearer <API_TOKEN>` (compared in constant
time); without it, an endpoint listens on loopback only, since anyone who reaches it could use it. A token that
no client can send (blank, or with spaces around it) is refused anywhere, and beyond loopback one shorter than
MIN_TOKEN_CHARS, which a stranger could guess.
"""

from __future__ import annotations

import hmac
import ipaddress

from imagegen.errors import ConfigError
from imagegen.settings import Settings

MIN_TOKEN_CHARS = 16
MAKE_A_TOKEN = "python3 -c 'import secrets; print(secrets.token_urlsafe(32))' makes one"


def is_loopback(host: str) -> bool:
    """True for localhost and addresses in 127.0.0.0/8 or ::1; any other name counts as reachable from outside."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(settings: Settings, host: str, setting: str = "--host or WEB_HOST") -> None:
    """Without API_TOKEN only a loopback address is allowed; `setting` names where the address comes from."""
    token = settings.api_token.get_secret_value()
    if token and token != token.strip():
        what = "is blank" if not token.strip() else "has spaces around it"
        raise ConfigError(f"API_TOKEN {what}, so no client could send it: set a real token ({MAKE_A_TOKEN})")
    if token and len(token) < MIN_TOKEN_CHARS and not is_loopback(host):
        raise ConfigError(
            f"refusing to listen on {host!r} with an API_TOKEN of {len(token)} characters: beyond loopback it needs "
            f"at least {MIN_TOKEN_CHARS} ({MAKE_A_TOKEN})"
        )
    if not token and not is_loopback(host):
        raise ConfigError(
            f"refusing to listen on {host!r} without API_TOKEN: set API_TOKEN, or listen on 127.0.0.1 "
            f"(loopback only) with {setting}"
        )


def token_refusal(settings: Settings, authorization: str) -> str | None:
    """Why a request with this Authorization header is refused, or None when it may pass."""
    token = settings.api_token.get_secret_value()
    if not token:
        return None
    scheme, _, given = authorization.partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return "this endpoint needs a token: send the header 'Authorization: Bearer <API_TOKEN>'"
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        return "wrong token: it does not match API_TOKEN"
    return None
