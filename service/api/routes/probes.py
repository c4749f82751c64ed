"""`GET /healthz` (the process) and `GET /readyz` (a model loaded and a device worker alive): no auth.

Both run on the event loop (async, attribute reads only): a pool of worker threads busy with
requests must not make an orchestrator think the service is dead.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from service.api.deps import Runtime

router = APIRouter()


@router.get("/healthz")
async def healthz(runtime: Runtime) -> JSONResponse:
    # A model that failed to load will not recover by itself: say so, so the orchestrator restarts us.
    failed = runtime.load_error is not None
    return JSONResponse({"status": "failed" if failed else "ok", "state": runtime.state,
                         "error": runtime.load_error}, 503 if failed else 200)


@router.get("/readyz")
async def readyz(runtime: Runtime) -> JSONResponse:
    c = runtime.components
    if c is not None and not c.engine.ready:  # a device worker died: requests would wait forever
        return JSONResponse({"ready": False, "state": "engine stopped", "error": runtime.load_error}, 503)
    code = 200 if c is not None else 503
    return JSONResponse({"ready": code == 200, "state": runtime.state, "error": runtime.load_error}, code)
