"""Our error types mapped to HTTP answers, registered once on the app.

Every error body is `{"detail": <message>}`, or for every 422 a list of `{"loc", "msg", "type"}`
(pydantic's validation, and our `UnusableInput` alike). A stray exception (a bug) is a 500, never dressed up as a 4xx.
"""

from __future__ import annotations

from collections.abc import Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from vggt_cache.client.safeopen import OutsideRoots
from vggt_cache.client.text import bounded
from vggt_cache.service.api.limits import Busy
from vggt_cache.service.engine import EngineStopped, QueueFull
from vggt_cache.service.errors import UnusableInput


class NotReady(RuntimeError):
    """No model to serve with: still loading, or it failed to load (the message says which)."""


def _error(status: int, detail: object, headers: Mapping[str, str] | None = None) -> JSONResponse:
    # Details name paths: a non-UTF-8 file name would make the JSON unencodable (a 500), a long one a huge body.
    return JSONResponse({"detail": bounded(detail) if isinstance(detail, str) else detail}, status, headers=headers)


def register_errors(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, exc.detail, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # Where and what, without echoing the input: it may hold what JSON cannot carry (NaN, lone surrogates).
        return _error(422, [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()])

    @app.exception_handler(UnusableInput)
    async def unusable(request: Request, exc: UnusableInput) -> JSONResponse:
        return _error(422, [{"loc": list(exc.loc), "msg": bounded(str(exc)), "type": "value_error"}])

    @app.exception_handler(OutsideRoots)
    async def not_allowed(request: Request, exc: OutsideRoots) -> JSONResponse:
        return _error(403, str(exc))

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, exc: QueueFull) -> JSONResponse:
        return _error(429, f"{exc}; retry shortly", {"Retry-After": "1"})

    @app.exception_handler(Busy)
    async def busy(request: Request, exc: Busy) -> JSONResponse:
        return _error(429, str(exc), {"Retry-After": "5"})

    @app.exception_handler(EngineStopped)
    async def stopped(request: Request, exc: EngineStopped) -> JSONResponse:
        return _error(503, str(exc), {"Retry-After": "5"})

    @app.exception_handler(NotReady)
    async def not_ready(request: Request, exc: NotReady) -> JSONResponse:
        return _error(503, str(exc), {"Retry-After": "5"})
