"""Typed dependencies of the routes: the runtime, its loaded components, the bearer-token check."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Request

from service.api.errors import NotReady
from service.api.metrics import Metrics
from service.runtime import Components, ServiceRuntime


def _runtime(request: Request) -> ServiceRuntime:
    return request.app.state.runtime


def _metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def _components(runtime: Annotated[ServiceRuntime, Depends(_runtime)]) -> Components:
    if runtime.components is None:
        raise NotReady(f"model failed to load: {runtime.load_error}" if runtime.load_error
                       else "model is still loading")
    return runtime.components


def authorised(request: Request, runtime: Annotated[ServiceRuntime, Depends(_runtime)]) -> None:
    """Every route that returns data requires `Authorization: Bearer <token>` when the service has a token."""
    token = runtime.settings.api_token
    if token is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), token.encode()):
        raise HTTPException(401, "missing or wrong bearer token (Authorization: Bearer <token>)",
                            headers={"WWW-Authenticate": "Bearer"})


Runtime = Annotated[ServiceRuntime, Depends(_runtime)]
Ready = Annotated[Components, Depends(_components)]
MetricsDep = Annotated[Metrics, Depends(_metrics)]
AUTH = [Depends(authorised)]
