"""A worker process's own HTTP endpoint: `/metrics` (Prometheus) and `/healthz`, on WORKER_METRICS_PORT.

Off unless WORKER_METRICS_PORT is set; process N of a supervisord program listens on WORKER_METRICS_PORT + N
(WORKER_INDEX, which supervisord.conf sets from its process_num), so every process has a port of its own.
The access rules are the API's (`access`): with API_TOKEN set both paths need it, and without one the
endpoint listens on loopback only.

`/healthz` answers 200 while the worker's heartbeat reaches Redis (its jobs' leases are being renewed) and
503 when it has not for three heartbeat periods, or before its first one.
"""

from __future__ import annotations

import asyncio
import json

from aiohttp import web
from aiohttp.typedefs import Handler
from loguru import logger

from imagegen.access import check_bind, token_refusal
from imagegen.errors import ConfigError
from imagegen.ops.metrics import CONTENT_TYPE, WorkerMetrics
from imagegen.settings import Settings

from .heartbeat import Heartbeat
from .runs import Runs

HEALTHY_BEATS = 3
MAX_PORT = 65535


def metrics_port(settings: Settings) -> int | None:
    """This process's port, or None when the endpoint is off; ConfigError when the sum is no port."""
    if not settings.worker_metrics_port:
        return None
    port = settings.worker_metrics_port + settings.worker_index
    if port > MAX_PORT:
        raise ConfigError(
            f"WORKER_METRICS_PORT={settings.worker_metrics_port} + WORKER_INDEX={settings.worker_index} is port "
            f"{port}, past {MAX_PORT}; choose a lower WORKER_METRICS_PORT"
        )
    return port


class Exporter:
    """Serves one worker's metrics and health until stopped; `stop` is safe to call twice."""

    def __init__(self, settings: Settings, metrics: WorkerMetrics, heartbeat: Heartbeat, runs: Runs) -> None:
        self._settings = settings
        self._metrics = metrics
        self._heartbeat = heartbeat
        self._runs = runs
        self._runner: web.AppRunner | None = None

    def _app(self) -> web.Application:
        settings = self._settings

        @web.middleware
        async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
            refusal = token_refusal(settings, request.headers.get("Authorization", ""))
            if refusal is not None:
                return web.json_response({"error": refusal}, status=401, headers={"WWW-Authenticate": "Bearer"})
            return await handler(request)

        app = web.Application(middlewares=[guard])
        app.router.add_get("/metrics", self._serve_metrics)
        app.router.add_get("/healthz", self._healthz)
        return app

    async def _serve_metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self._metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def _healthz(self, request: web.Request) -> web.Response:
        last = self._heartbeat.last_success
        age = None if last is None else asyncio.get_running_loop().time() - last
        ok = age is not None and age <= HEALTHY_BEATS * self._heartbeat.interval
        body = {
            "ok": ok,
            "worker": self._heartbeat.worker_id,
            "heartbeat_age_seconds": None if age is None else round(age, 3),
            "jobs": len(self._runs),
            "stopping": self._runs.stopping,
        }
        return web.Response(text=json.dumps(body), status=200 if ok else 503, content_type="application/json")

    async def start(self, port: int) -> None:
        host = self._settings.worker_metrics_host
        check_bind(self._settings, host, "WORKER_METRICS_HOST")
        runner = web.AppRunner(self._app(), access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as exc:
            await runner.cleanup()
            raise ConfigError(
                f"cannot listen on {host}:{port} for the worker's metrics ({exc.strerror or exc}); "
                "choose another WORKER_METRICS_PORT (process N uses the port + N)"
            ) from None
        self._runner = runner
        logger.info("metrics and health on http://{}:{}/metrics and /healthz", host, port)

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
