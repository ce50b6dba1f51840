"""Real local services (Redis, PocketBase, SeaweedFS) for the test fixtures and the demo stack.

Each `*_spec` function prepares a data dir and returns a `ServiceSpec`; `RunningService` runs one directly,
the demo stack hands the same specs to supervisord.
"""

from .pocketbase import create_collection, pocketbase_spec
from .process import LocalStackError, RunningService, ServiceSpec, child_env, find_binary, free_port
from .redis import redis_spec
from .seaweed import ensure_bucket, seaweed_spec
from .services import Credentials, LocalServices, local_services

__all__ = [
    "Credentials",
    "LocalServices",
    "LocalStackError",
    "RunningService",
    "ServiceSpec",
    "child_env",
    "create_collection",
    "ensure_bucket",
    "find_binary",
    "free_port",
    "local_services",
    "pocketbase_spec",
    "redis_spec",
    "seaweed_spec",
]
