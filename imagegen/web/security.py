"""What keeps the operations surface safe from other web pages: the Host allow-list, the same-origin rule for
requests that change anything, and the security headers every response carries.

- **Host** (against DNS rebinding): a request must name a host this server answers to: the address it listens
  on, `localhost`, 127.0.0.1, ::1, any name in WEB_ALLOWED_HOSTS, and any IP address when it listens on all of
  them (0.0.0.0 or ::). A page on a rebound name (`evil.example` resolving to 127.0.0.1) sends its own name, so it
  gets 421 and reads nothing. A request without a Host header (not a browser) passes.
- **Writes** (against cross-site request forgery): every request but GET, HEAD and OPTIONS must send
  `Content-Type: application/json` (another site's page can send that only after a CORS preflight, which this
  server never grants), and its `Origin`, when sent, must be the server's own (the Host it was sent to, or a name
  in WEB_ALLOWED_HOSTS); without an `Origin`, a browser's `Sec-Fetch-Site` must say same-origin. Refusals are
  403s and change nothing. The token check comes after these, so they hold with API_TOKEN unset too.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from urllib.parse import urlsplit

from aiohttp import web

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
WILDCARD_BINDS = frozenset({"", "0.0.0.0", "::"})
DEFAULT_PORTS = {"http": 80, "https": 443}
# A browser's own statement of where a request comes from; "none" is the user typing the URL.
TRUSTED_FETCH_SITES = frozenset({"same-origin", "none"})

# The dashboard's page and files: its own scripts and styles only, images from the bucket's public URLs, never
# framed. The same policy on JSON and errors does no harm and leaves no response without one.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' http: https: data:; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Server": "imagegen",
}
# Answers with queue data or prompts are never stored by a browser or a proxy; the dashboard's files may be,
# as long as they are checked again on each use.
NO_STORE = "no-store"
REVALIDATE = "no-cache"

WRONG_HOST = (
    "refused: this server does not answer to the host name this request was sent to "
    "(add the name to WEB_ALLOWED_HOSTS if it is yours)"
)
NOT_JSON = (
    "refused: a request that changes anything must send 'Content-Type: application/json' "
    "(with a JSON body, {} when there is nothing to say)"
)
CROSS_SITE = (
    "refused: this request comes from a page of another site; only the dashboard itself, or a client that "
    "sends no Origin, may change anything"
)


def _host_name(authority: str) -> str | None:
    """The host name of a Host header or an Origin's authority, lowercased; None when it isn't one."""
    try:
        return urlsplit(f"//{authority}").hostname
    except ValueError:
        return None


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class HostRule:
    """The host names a server bound to `bind_host` answers to."""

    def __init__(self, bind_host: str, allowed: Iterable[str]) -> None:
        bind = bind_host.strip("[]").lower()
        self._any_ip = bind in WILDCARD_BINDS
        self.names = frozenset({*LOOPBACK_NAMES, *(n.lower() for n in allowed), *([bind] if bind else [])})

    def allows(self, host_header: str | None) -> bool:
        if host_header is None:
            return True  # not a browser: every browser sends the Host it connects to
        name = _host_name(host_header)
        if name is None:
            return False
        return name in self.names or (self._any_ip and _is_ip(name))

    def is_own_origin(self, origin: str, host_header: str | None) -> bool:
        """Whether a browser's Origin is this server: the Host it was sent to, or a name listed as ours."""
        try:
            parts = urlsplit(origin)
            origin_port = parts.port or DEFAULT_PORTS.get(parts.scheme)
        except ValueError:
            return False
        name = parts.hostname
        if parts.scheme not in DEFAULT_PORTS or name is None:
            return False  # "null", file:, extensions, and anything else that is no web origin
        if name in self.names - LOOPBACK_NAMES:
            return True  # a public name behind a reverse proxy that rewrites Host
        if host_header is None:
            return False
        try:
            sent_to = urlsplit(f"//{host_header}")
            host_port = sent_to.port or DEFAULT_PORTS[parts.scheme]
        except ValueError:
            return False
        return sent_to.hostname == name and host_port == origin_port


def write_refusal(request: web.Request, rule: HostRule) -> str | None:
    """Why a request that may change something is refused, or None when it may go on to the token check."""
    if request.method in SAFE_METHODS:
        return None
    if request.content_type != "application/json":
        return NOT_JSON
    origin = request.headers.get("Origin")
    if origin is not None:
        return None if rule.is_own_origin(origin, request.headers.get("Host")) else CROSS_SITE
    fetch_site = request.headers.get("Sec-Fetch-Site")
    if fetch_site is not None and fetch_site.lower() not in TRUSTED_FETCH_SITES:
        return CROSS_SITE
    return None


def cache_policy(path: str) -> str:
    """How long a browser may keep an answer: data never, the dashboard's files until they change."""
    return REVALIDATE if path == "/" or path.startswith("/static/") else NO_STORE


def apply_headers(response: web.StreamResponse, path: str) -> None:
    """Put the security headers and the cache policy on a response about to be sent."""
    response.headers.update(SECURITY_HEADERS)
    response.headers["Cache-Control"] = cache_policy(path)
