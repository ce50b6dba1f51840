"""The API's middlewares, outermost first: errors as JSON `{"error": ...}` with the right status, the Host and
cross-site rules of `security`, and the bearer token check.

Status by error: 400 a bad request or id, 401 a missing or wrong token, 403 a write refused as cross-site or
not JSON, 404 no such route or record, 405 a method the route doesn't take, 413 a body over the size limit, 421
a Host the server doesn't answer to, 503 Redis or PocketBase down (or misconfigured), 500 anything unexpected,
logged once with its traceback and answered without it. Every message is scrubbed of configured secrets.
"""

from __future__ import annotations

import json

from aiohttp import http_exceptions, web
from aiohttp.typedefs import Handler
from loguru import logger

from imagegen.access import token_refusal
from imagegen.errors import ConfigError, ImagegenError, InvalidPromptId, InvalidRequest, RecordNotFound, ServiceError
from imagegen.logs import scrub

from .context import HOST_RULE, SETTINGS
from .protocol import fault_message
from .security import WRONG_HOST, write_refusal

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
async def host_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """421 for a Host this server doesn't answer to (a DNS-rebinding page reads and writes nothing)."""
    if not request.app[HOST_RULE].allows(request.headers.get("Host")):
        logger.debug("refused a request for another host name: {} {}", request.method, request.path)
        return json_error(request, 421, WRONG_HOST)
    return await handler(request)


@web.middleware
async def cross_site_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """403 for a write that isn't JSON or comes from another site's page, before anything is read or changed."""
    if request.match_info.http_exception is None:  # no such route or method: that answer comes first
        refusal = write_refusal(request, request.app[HOST_RULE])
        if refusal is not None:
            return json_error(request, 403, refusal)
    return await handler(request)


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
    except (http_exceptions.HttpProcessingError, web.RequestPayloadError) as exc:
        # A body aiohttp could not decode as its headers say (a gzip Content-Encoding on plain bytes).
        return json_error(request, 400, fault_message(exc.__cause__ or exc))
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
        return f"{request.method} is not allowed on {_shown_path(request.path)}; use {allowed}"
    if isinstance(exc, web.HTTPNotFound):
        return f"nothing at {_shown_path(request.path)}" + (
            " (a task id is 15 characters of a-z and 0-9)" if request.path.startswith("/api/tasks/") else ""
        )
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return f"the body is larger than this server accepts ({request.client_max_size} bytes)"
    return exc.reason


def _shown_path(path: str) -> str:
    """A path as an error shows it: printable and short, since it is the client's own text."""
    printable = "".join(c if c.isprintable() else "?" for c in path)
    return printable if len(printable) <= 80 else printable[:80] + "…"


def _kept_headers(exc: web.HTTPException) -> dict[str, str]:
    allow = exc.headers.get("Allow")
    return {"Allow": allow} if allow else {}
