"""Typed dependencies of the routes: the runtime and its loaded components (the token is checked in limits.py)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from vggt_cache.service.api.errors import NotReady
from vggt_cache.service.api.limits import Admission
from vggt_cache.service.api.metrics import Metrics
from vggt_cache.service.runtime import Components, ServiceRuntime


# async: FastAPI runs a plain `def` dependency in the thread pool, which a probe must never wait for.
async def _runtime(request: Request) -> ServiceRuntime:
    return request.app.state.runtime


async def _metrics(request: Request) -> Metrics:
    return request.app.state.metrics


async def _plans(request: Request) -> Admission:
    return request.app.state.plans


async def _components(runtime: Annotated[ServiceRuntime, Depends(_runtime)]) -> Components:
    if runtime.components is None:
        raise NotReady(
            f"model failed to load: {runtime.load_error}" if runtime.load_error else "model is still loading"
        )
    return runtime.components


Runtime = Annotated[ServiceRuntime, Depends(_runtime)]
Ready = Annotated[Components, Depends(_components)]
MetricsDep = Annotated[Metrics, Depends(_metrics)]
Plans = Annotated[Admission, Depends(_plans)]
