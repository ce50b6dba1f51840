"""A jimeng-compatible image API for tests and the local stack: real images, the proxy's error bodies,
scripted failures, latency, and counters of calls per prompt."""

from .modes import PROXY_ERRORS, TRANSIENT_MODES
from .render import render_image
from .server import SANDBOX_KEY_ENV, JimengSandbox, SandboxConfig
from .thread import SandboxThread

__all__ = [
    "PROXY_ERRORS",
    "SANDBOX_KEY_ENV",
    "TRANSIENT_MODES",
    "JimengSandbox",
    "SandboxConfig",
    "SandboxThread",
    "render_image",
]
