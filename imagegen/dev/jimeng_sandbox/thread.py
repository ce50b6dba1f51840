"""Running the sandbox in a background thread with its own event loop, for synchronous callers and tests."""

from __future__ import annotations

from aiohttp import web

from .server import JimengSandbox, SandboxConfig, start_site
from .site import AppThread


class SandboxThread(AppThread):
    """`with SandboxThread(config) as fake:` serves on 127.0.0.1 and a free port; `fake.base_url` is the
    JIMENG_API_URL to use, `fake.sandbox` the state (counters, scripts)."""

    def __init__(self, config: SandboxConfig, host: str = "127.0.0.1", port: int = 0) -> None:
        self.sandbox = JimengSandbox(config)
        super().__init__(self._serve, "jimeng sandbox", host, port)

    async def _serve(self, host: str, port: int) -> web.AppRunner:
        runner, _ = await start_site(self.sandbox, host, port)
        return runner

    @property
    def base_url(self) -> str:
        return self.sandbox.base_url
