"""The aiohttp application: its long-lived clients, middlewares, routes and the dashboard's files."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from ..settings import Settings
from .context import BACKENDS, SETTINGS, STATIC_DIR, Backends
from .middleware import error_middleware, token_middleware
from .routes import routes


def create_app(settings: Settings) -> web.Application:
    """The API under /api/, /healthz and the dashboard at /; clients open with the app and close with it."""
    app = web.Application(middlewares=[error_middleware, token_middleware])
    app[SETTINGS] = settings

    async def backends(app: web.Application) -> AsyncIterator[None]:
        async with aiohttp.ClientSession() as http:
            app[BACKENDS] = Backends(settings, http)
            try:
                yield
            finally:
                await app[BACKENDS].close()

    app.cleanup_ctx.append(backends)
    app.add_routes(routes)
    app.router.add_static("/static/", STATIC_DIR, name="static")
    return app
