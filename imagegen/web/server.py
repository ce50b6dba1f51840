"""`imagegen serve`: where it may listen, and the serving loop until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import signal

from aiohttp import web
from loguru import logger

from imagegen.access import check_bind
from imagegen.errors import ConfigError
from imagegen.settings import Settings
from imagegen.target import Target

from .app import create_app
from .protocol import ApiRunner, check_aiohttp

SHUTDOWN_TIMEOUT = 5.0


async def serve(settings: Settings, host: str, port: int) -> None:
    """Serve the API and dashboard on host:port until the process is told to stop."""
    check_bind(settings, host)
    check_aiohttp()
    runner = ApiRunner(create_app(settings, host), access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {host}:{port} ({exc.strerror or exc}) - choose another --port"
            ) from None
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        shown = f"[{host}]" if ":" in host else host
        logger.info(
            "serving the API and dashboard on http://{}:{}/ (token {}) from {}",
            shown,
            port,
            "required" if settings.api_token.get_secret_value() else "not set: loopback only",
            Target.of(settings).describe(),
        )
        await stop.wait()
        logger.info("stopping")
    finally:
        await runner.cleanup()
