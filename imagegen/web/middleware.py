"""The API's two middlewares: the bearer token check, and errors as JSON `{"error": ...}` with the right status.

Status by error: 400 a bad request or id, 401 a missing or wrong token, 404 no such route or record, 405 a
method the route doesn't take, 503 Redis or PocketBase down (or misconfigured), 500 anything unexpected,
logged once with its traceback and answered without it. Every message is scrubbed of configured secrets.
"""

from __future__ import annotations

import json

from aiohttp import web
from aiohttp.typedefs import Handler
from loguru import logger

from ..access import token_refusal
from ..errors import ConfigError, ImagegenError, InvalidPromptId, InvalidRequest, RecordNotFound, ServiceError
from ..logs import scrub
from .context import SETTINGS

# Under /api/, only the document describing the API is public; outside it, /healthz and the dashboard's files
# are public, /metrics is not.
PUBLIC_API_PATHS = frozenset({"/api/openapi.json"})


def json_error(request: web.Request, status: int, message: str, **headers: str) -> web.Response:
    text = scrub(message, request.app[SETTINGS].secrets())
    return web.json_response({"error": text}, status=status, headers=headers, dumps=_dumps)


def _dumps(value: object) -> str:
    return json.dumps(value, ensure_ascii=False)


def needs_token(request: web.Request) -> bool:
    if request.path == "/metrics":
        return True
    return request.path.startswith("/api/") and request.path not in PUBLIC_API_PATHS


@web.middleware
async def token_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """With API_TOKEN set, /api/ calls and /metrics must send `Authorization: Bearer <token>` (`access`)."""
    if needs_token(request):
        refusal = token_refusal(request.app[SETTINGS], request.headers.get("Authorization", ""))
        if refusal is not None:
            return _unauthorized(request, refusal)
    return await handler(request)


def _unauthorized(request: web.Request, message: str) -> web.Response:
    return json_error(request, 401, message, **{"WWW-Authenticate": 'Bearer realm="imagegen"'})


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure becomes `{"error": "..."}` with its status; never a traceback."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return json_error(request, exc.status, _http_message(request, exc), **_kept_headers(exc))
    except (InvalidRequest, InvalidPromptId) as exc:
        return json_error(request, 400, str(exc))
    except RecordNotFound as exc:
        return json_error(request, 404, str(exc))
    except (ServiceError, ConfigError) as exc:
        return json_error(request, 503, str(exc))
    except ImagegenError as exc:
        logger.error("{} {} failed: {}", request.method, request.path, exc)
        return json_error(request, 500, str(exc))
    except Exception as exc:
        logger.opt(exception=exc).error("{} {} failed: {}: {}", request.method, request.path, type(exc).__name__, exc)
        return json_error(request, 500, f"internal error ({type(exc).__name__}); see the server log")


def _http_message(request: web.Request, exc: web.HTTPException) -> str:
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        return f"{request.method} is not allowed on {request.path}; use {allowed}"
    if isinstance(exc, web.HTTPNotFound):
        return f"nothing at {request.path}"
    return exc.reason


def _kept_headers(exc: web.HTTPException) -> dict[str, str]:
    allow = exc.headers.get("Allow")
    return {"Allow": allow} if allow else {}
