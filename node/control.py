"""The local control API: HTTP over a Unix domain socket in the data directory.

The socket is created with mode 0600 inside a 0700 directory, so only the
user who runs the node can reach it; nothing listens on a network port.
Hypercorn serves a Starlette app on the node's trio loop, so handlers read
node state directly. Every response is JSON; errors are
``{"error": message}`` with a 4xx or 5xx status.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from protocol.errors import RemoteProtocolError

if TYPE_CHECKING:
    from node.daemon import Node

logger = logging.getLogger(__name__)

MAX_SOCKET_PATH = 107  # sun_path is 108 bytes on Linux, with a terminating zero


class ApiError(Exception):
    """An error to return to the API client with an HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


Handler = Callable[[Request], Awaitable[Any]]


def endpoint(handler: Handler) -> Callable[[Request], Awaitable[JSONResponse]]:
    """Wrap a handler: its result becomes JSON, its errors a JSON error."""

    async def wrapped(request: Request) -> JSONResponse:
        try:
            return JSONResponse(await handler(request))
        except ApiError as exc:
            return JSONResponse({"error": exc.message}, status_code=exc.status)
        except RemoteProtocolError as exc:
            return JSONResponse({"error": str(exc), "reason": exc.reason.name.lower()}, status_code=409)
        except Exception as exc:
            logger.exception("Control API %s %s failed", request.method, request.url.path)
            return JSONResponse({"error": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)

    return wrapped


async def json_body(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise ApiError(400, "request body must be JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    return body


def build_app(node: Node) -> Starlette:
    from node import api

    routes = [Route(path, endpoint(handler), methods=[method]) for method, path, handler in api.routes(node)]
    return Starlette(routes=routes, exception_handlers={HTTPException: api.http_error})


async def serve_control(node: Node, socket_path: Path, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the control API until cancelled."""
    if len(str(socket_path)) > MAX_SOCKET_PATH:
        raise OSError(
            f"control socket path {socket_path} is {len(str(socket_path))} bytes, more than the "
            f"{MAX_SOCKET_PATH} a Unix socket allows; use a shorter --data-dir"
        )
    if socket_path.exists() or socket_path.is_symlink():
        # A stale socket from a daemon that was killed; the lock file says no
        # other daemon owns this directory.
        socket_path.unlink()
    config = HypercornConfig()
    config.bind = [f"unix:{socket_path}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = 0.5
    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(serve, build_app(node), config, mode="asgi"))  # type: ignore[arg-type]
        # The data directory is 0700, so nobody else could reach the socket
        # before this chmod either.
        os.chmod(socket_path, 0o600)
        task_status.started()
