"""Real local services (Redis, PocketBase, SeaweedFS) for the test fixtures and the demo stack.

Each `*_spec` function prepares a data dir and returns a `ServiceSpec`; `RunningService` runs one directly,
the demo stack hands the same specs to supervisord.
"""

from .env import stack_env
from .pocketbase import pocketbase_spec
from .process import LocalStackError, RunningService, ServiceSpec, child_env, find_binary, free_port
from .redis import redis_spec
from .seaweed import ensure_bucket, seaweed_spec

__all__ = [
    "LocalStackError",
    "RunningService",
    "ServiceSpec",
    "child_env",
    "ensure_bucket",
    "find_binary",
    "free_port",
    "pocketbase_spec",
    "redis_spec",
    "seaweed_spec",
    "stack_env",
]
