"""A Volcengine Ark image API for tests: the real API's checks, statuses and error bodies, real images of the
requested size as expiring links or base64, group and partial answers, scripted failures, counters per prompt."""

from .modes import ERRORS
from .server import ArkSandbox, ArkSandboxConfig, ArkSandboxThread

__all__ = ["ERRORS", "ArkSandbox", "ArkSandboxConfig", "ArkSandboxThread"]
