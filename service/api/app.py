"""The app factory: middleware, error handlers, routes, and a lifespan that starts and stops the runtime."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool

from vggt_cache.service.api.connections import AcceptErrors
from vggt_cache.service.api.errors import register_errors
from vggt_cache.service.api.limits import Admission, RequestGuard
from vggt_cache.service.api.metrics import Metrics
from vggt_cache.service.api.routes import features, jobs, probes, status
from vggt_cache.service.runtime import ServiceRuntime
from vggt_cache.service.settings import host_names


def create_app(runtime: ServiceRuntime) -> FastAPI:
    """The service's ASGI app over `runtime`: its lifespan loads the model (in the background) and stops it."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        asyncio.get_running_loop().set_exception_handler(AcceptErrors())  # a line a minute, not a traceback a try
        runtime.start(background=True)  # probes answer while VGGT-1B is read from disk
        try:
            yield
        finally:
            await run_in_threadpool(runtime.stop)  # finishes the batch in flight; jobs resume next start

    # With a token, the OpenAPI schema and docs pages would be the only unauthenticated routes besides
    # the probes and the (data-free) status page shell: turn them off.
    settings = runtime.settings
    open_docs = settings.api_token is None
    # No trailing-slash redirects: their Location would echo the client's Host header.
    app = FastAPI(
        title="vggt-cache",
        version=status.VERSION,
        lifespan=lifespan,
        docs_url="/docs" if open_docs else None,
        redoc_url=None,
        openapi_url="/openapi.json" if open_docs else None,
        redirect_slashes=False,
    )
    app.state.runtime = runtime
    app.state.metrics = metrics = Metrics(runtime)
    app.state.plans = Admission(settings.max_plans, "plans (dry runs)")
    app.add_middleware(
        RequestGuard,
        token=settings.api_token,
        max_bytes=settings.max_body_bytes,
        timeout_s=settings.body_timeout_s,
        buffer_bytes=settings.body_buffer_bytes,
        hosts=host_names(settings),
    )
    app.middleware("http")(metrics.observe_request)
    register_errors(app)
    for module in (probes, status, features, jobs):
        app.include_router(module.router)
    return app
