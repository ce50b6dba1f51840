"""Running the sandbox in a background thread with its own event loop, for synchronous callers and tests."""

from __future__ import annotations

import asyncio
import threading
from types import TracebackType

from aiohttp import web

from .server import JimengSandbox, SandboxConfig, start_site


class SandboxThread:
    """`with SandboxThread(config) as fake:` serves on 127.0.0.1 and a free port; `fake.base_url` is the
    JIMENG_API_URL to use, `fake.sandbox` the state (counters, scripts)."""

    def __init__(self, config: SandboxConfig, host: str = "127.0.0.1", port: int = 0) -> None:
        self.sandbox = JimengSandbox(config)
        self._host = host
        self._port = port
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="jimeng-sandbox", daemon=True)
        self._runner: web.AppRunner | None = None
        self._error: BaseException | None = None

    @property
    def base_url(self) -> str:
        return self.sandbox.base_url

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._runner, _ = self._loop.run_until_complete(start_site(self.sandbox, self._host, self._port))
        except BaseException as exc:  # reported to the starting thread
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._runner.cleanup())
        self._loop.close()

    def start(self) -> SandboxThread:
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise RuntimeError(f"jimeng sandbox failed to start: {self._error}") from self._error
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(30)

    def __enter__(self) -> SandboxThread:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
