"""`GET /healthz` (the process) and `GET /readyz` (a model loaded and a device worker alive): no auth.

Both run on the event loop (async, attribute reads only): a pool of worker threads busy with
requests must not make an orchestrator think the service is dead.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from vggt_cache.service.api.deps import Runtime

router = APIRouter()


@router.get("/healthz")
async def healthz(runtime: Runtime) -> JSONResponse:
    # A model that failed to load, or every device lost, will not recover by itself: say so, so the
    # orchestrator restarts us.
    lost = _lost(runtime)
    c = runtime.components
    dead = c is not None and len(lost) == len(c.engine.devices)
    failed = runtime.load_error is not None or dead
    error = runtime.load_error or _reasons(lost)
    return JSONResponse(
        {
            "status": "failed" if failed else "degraded" if lost else "ok",
            "state": runtime.state,
            "error": error,
            "lost_devices": lost,
        },
        503 if failed else 200,
    )


@router.get("/readyz")
async def readyz(runtime: Runtime) -> JSONResponse:
    c = runtime.components
    if c is not None and not c.engine.ready:  # a device worker died or was lost: requests would fail or wait
        lost = _lost(runtime)
        return JSONResponse(
            {
                "ready": False,
                "state": "device lost" if lost else "engine stopped",
                "error": _reasons(lost) or runtime.load_error,
            },
            503,
        )
    code = 200 if c is not None else 503
    return JSONResponse({"ready": code == 200, "state": runtime.state, "error": runtime.load_error}, code)


def _lost(runtime: Runtime) -> dict[str, str]:
    c = runtime.components
    return c.engine.lost_devices if c is not None else {}


def _reasons(lost: dict[str, str]) -> str | None:
    return "; ".join(f"{name}: {why}" for name, why in lost.items()) or None
