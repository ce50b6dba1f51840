"""The one place imagegen bends aiohttp: the answer to a request aiohttp could not parse.

Requests that never reach the application (an over-long header, an unknown method, a malformed URL or
Content-Length) are answered by aiohttp's `RequestHandler.handle_error`, which replies in plain text that echoes
the offending bytes (an over-long `Authorization` header came back with the token in it) and logs a traceback
at ERROR, so any stranger could flood the log. `ApiRequestHandler` overrides that one method: a JSON
`{"error": ...}` with a fixed sentence per kind of fault, the security headers, one debug line for a fault the
client caused; only a failure of our own is logged at ERROR (through the scrubbing sinks).

aiohttp makes one handler per connection in `Server.__call__`, from the `Server` an `AppRunner` builds in
`_make_server`; `ApiServer` and `ApiRunner` override exactly those. `check_aiohttp` verifies at start that
aiohttp still has the shape this relies on (tests/test_web_security.py checks the same names against the
installed version).
"""

from __future__ import annotations

import inspect
from typing import Any

import aiohttp
from aiohttp import http_exceptions, web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from loguru import logger
from typing_extensions import override

from imagegen.errors import ConfigError

from .security import apply_headers

# What aiohttp's private parts must look like for the overrides below to take effect.
HANDLE_ERROR_PARAMETERS = ("self", "request", "status", "exc", "message")
SERVER_ATTRIBUTES = ("_loop", "_kwargs", "request_handler", "request_factory", "handler_cancellation")

PARSE_FAULTS: tuple[tuple[type[Exception], str], ...] = (
    (http_exceptions.LineTooLong, "a request line or header is longer than this server accepts"),
    (http_exceptions.BadHttpMethod, "the request's method is not one this server knows"),
    (http_exceptions.InvalidURLError, "the request's URL is malformed"),
    (http_exceptions.InvalidHeader, "a request header is malformed"),
    (http_exceptions.BadStatusLine, "the request line is malformed"),
    (http_exceptions.ContentEncodingError, "the request body does not match its Content-Encoding"),
    (http_exceptions.TransferEncodingError, "the request body does not match its Transfer-Encoding"),
)
MALFORMED = "the request is not well-formed HTTP"
INTERNAL = "internal error; see the server log"
TIMED_OUT = "the request took too long to handle"


def fault_message(exc: BaseException | None) -> str:
    """A fixed sentence for a request aiohttp could not parse; never any of the request's own bytes."""
    for kind, sentence in PARSE_FAULTS:
        if isinstance(exc, kind):
            return sentence
    return MALFORMED


def error_response(status: int, message: str) -> web.Response:
    response = web.json_response({"error": message}, status=status)
    apply_headers(response, "")
    response.force_close()
    return response


class ApiRequestHandler(RequestHandler):
    """aiohttp's per-connection protocol with JSON answers to requests it could not parse."""

    @override
    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("a response was under way when the request failed; the connection is dropped")
        if status == 504:
            return error_response(status, TIMED_OUT)
        if status >= 500:
            logger.opt(exception=exc).error("{} {} failed in the HTTP server", request.method, request.path)
            return error_response(status, INTERNAL)
        # The client's fault: one line at debug, naming the kind only (the bytes may hold a token).
        logger.debug("refused a malformed request from {}: {}", request.remote, type(exc).__name__)
        return error_response(status, fault_message(exc))


class ApiServer(web.Server):
    """aiohttp's connection factory, making `ApiRequestHandler`s with the settings aiohttp gave the server."""

    @override
    def __call__(self) -> RequestHandler:
        return ApiRequestHandler(self, loop=self._loop, **self._kwargs)


class ApiRunner(web.AppRunner):
    """An `AppRunner` whose server answers unparsable requests as the API answers everything else."""

    @override
    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        check_server(server)
        kwargs: dict[str, Any] = server._kwargs
        return ApiServer(
            server.request_handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=server._loop,
            **kwargs,
        )


def check_aiohttp() -> None:
    """ConfigError naming the aiohttp version when its parts are not shaped as the overrides above expect."""
    missing = []
    parameters = tuple(inspect.signature(RequestHandler.handle_error).parameters)
    if parameters != HANDLE_ERROR_PARAMETERS:
        missing.append(f"RequestHandler.handle_error{parameters}")
    if not callable(getattr(web.AppRunner, "_make_server", None)):
        missing.append("AppRunner._make_server")
    init = inspect.signature(web.Server.__init__).parameters
    if not {"handler", "request_factory", "handler_cancellation", "loop"} <= set(init):
        missing.append("Server.__init__ arguments")
    if missing:
        raise ConfigError(
            f"aiohttp {aiohttp.__version__} is not shaped as imagegen's HTTP server expects "
            f"({', '.join(missing)}); install the aiohttp version pyproject.toml allows"
        )


def check_server(server: web.Server) -> None:
    """The same check for the attributes a built server must carry."""
    absent = [name for name in SERVER_ATTRIBUTES if not hasattr(server, name)]
    if absent:
        raise ConfigError(
            f"aiohttp {aiohttp.__version__} builds servers without {', '.join(absent)}; "
            "install the aiohttp version pyproject.toml allows"
        )
