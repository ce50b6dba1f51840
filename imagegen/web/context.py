"""What every handler reaches through the app: the settings and the long-lived clients."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
from aiohttp import web

from imagegen.ops.control import Control, connect_queue, pocketbase_client
from imagegen.settings import Settings

from .security import HostRule


class Backends:
    """The app's clients, created once: one HTTP session for PocketBase and one Redis pool.

    The pool is made on first use, so the app starts (and `/healthz` answers 503) while Redis is down."""

    def __init__(self, settings: Settings, http: aiohttp.ClientSession) -> None:
        self.settings = settings
        self._http = http
        self._control: Control | None = None
        self._lock = asyncio.Lock()

    async def control(self) -> Control:
        if self._control is None:
            async with self._lock:
                if self._control is None:
                    redis = await connect_queue(self.settings)
                    pocketbase = pocketbase_client(self._http, self.settings, redis)
                    self._control = Control(self.settings, redis, pocketbase)
        return self._control

    async def close(self) -> None:
        """Close the Redis pool; safe to call twice."""
        control, self._control = self._control, None
        if control is not None:
            await control.redis.aclose()


STATIC_DIR = Path(__file__).with_name("static")
DASHBOARD_PAGE = Path(__file__).with_name("index.html")
BACKENDS = web.AppKey("backends", Backends)
SETTINGS = web.AppKey("settings", Settings)
HOST_RULE = web.AppKey("host_rule", HostRule)


async def control_of(request: web.Request) -> Control:
    return await request.app[BACKENDS].control()
