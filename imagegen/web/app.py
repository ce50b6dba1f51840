"""The aiohttp application: its long-lived clients, middlewares, routes and the dashboard's files."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from imagegen.settings import Settings

from .context import BACKENDS, HOST_RULE, SETTINGS, Backends
from .middleware import cross_site_middleware, error_middleware, host_middleware, token_middleware
from .routes import routes
from .security import HostRule, apply_headers

# The largest request body read (aiohttp's default): 500 ids and a reason fit many times over.
MAX_BODY_BYTES = 1024**2


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    apply_headers(response, request.path)


def create_app(settings: Settings, bind_host: str | None = None) -> web.Application:
    """The API under /api/, /healthz and the dashboard at /; clients open with the app and close with it.

    `bind_host`: the address the server listens on (default WEB_HOST), one of the host names it answers to."""
    app = web.Application(
        middlewares=[error_middleware, host_middleware, cross_site_middleware, token_middleware],
        client_max_size=MAX_BODY_BYTES,
    )
    app[SETTINGS] = settings
    app[HOST_RULE] = HostRule(settings.web_host if bind_host is None else bind_host, settings.allowed_web_hosts())
    app.on_response_prepare.append(_security_headers)

    async def backends(app: web.Application) -> AsyncIterator[None]:
        async with aiohttp.ClientSession() as http:
            app[BACKENDS] = Backends(settings, http)
            try:
                yield
            finally:
                await app[BACKENDS].close()

    app.cleanup_ctx.append(backends)
    app.add_routes(routes)
    return app
