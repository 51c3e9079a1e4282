"""An app for granian (which serves from a module path): what each request finds bound as it
arrives, before AmbientMiddleware, and which user its handler sees."""

from __future__ import annotations

from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import ambient
from ambient._binding import _current, _live
from ambient.middleware import AmbientMiddleware, trusted_header


async def echo(request: Request) -> Response:
    size = len(await request.body())
    return JSONResponse(
        {
            "user": ambient.get_current_context().user_id,
            "entry": request.scope["entry"],
            "entry_live": request.scope["entry_live"],
            "size": size,
        }
    )


inner = AmbientMiddleware(
    Starlette(routes=[Route("/echo", echo, methods=["POST"])]),
    registry=ambient.Registry(),
    identity=trusted_header(),
)


async def app(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] == "http":
        found = _current.get()
        scope["entry"] = None if found is None else found.ctx.user_id
        scope["entry_live"] = _live(found) is not None
    await inner(scope, receive, send)
