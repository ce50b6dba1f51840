"""The HTTP API and dashboard behind `imagegen serve`: a thin aiohttp shell over `imagegen.ops.control`.

`app` builds the application, `routes` holds one handler per route, `middleware` the token check and the
JSON errors, `bodies` the validated request bodies and queries, `openapi` the API's document, `server`
the bind rules and the serving loop; `static/` is the dashboard (plain HTML, CSS and JavaScript).
"""

from imagegen.access import check_bind

from .app import create_app
from .server import serve

__all__ = ["check_bind", "create_app", "serve"]
