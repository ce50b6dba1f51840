"""`imagegen serve`: where it may listen, and the serving loop until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import ipaddress
import signal

from aiohttp import web
from loguru import logger

from ..errors import ConfigError
from ..settings import Settings
from .app import create_app

SHUTDOWN_TIMEOUT = 5.0


def is_loopback(host: str) -> bool:
    """True for localhost and addresses in 127.0.0.0/8 or ::1; any other name counts as reachable from outside."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(settings: Settings, host: str) -> None:
    """Without API_TOKEN the API is open to whoever reaches it, so only a loopback address is allowed."""
    if not settings.api_token.get_secret_value() and not is_loopback(host):
        raise ConfigError(
            f"refusing to listen on {host!r} without API_TOKEN: set API_TOKEN, or listen on 127.0.0.1 (loopback only)"
        )


async def serve(settings: Settings, host: str, port: int) -> None:
    """Serve the API and dashboard on host:port until the process is told to stop."""
    check_bind(settings, host)
    runner = web.AppRunner(create_app(settings), access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT)
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
            "serving the API and dashboard on http://{}:{}/ (token {})",
            shown,
            port,
            "required" if settings.api_token.get_secret_value() else "not set: loopback only",
        )
        await stop.wait()
        logger.info("stopping")
    finally:
        await runner.cleanup()
