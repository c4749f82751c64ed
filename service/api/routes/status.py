"""`GET /` (the status page's static shell), `GET /status` (JSON), `GET /metrics` (Prometheus text)."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response

from client.spec import matching_preset
from service.api.deps import MetricsDep, Runtime

VERSION = "0.1.0"

router = APIRouter()


@router.get("/", response_class=HTMLResponse)
def status_page() -> str:
    return resources.files("service").joinpath("static/status.html").read_text(encoding="utf-8")


@router.get("/status")
def status(runtime: Runtime, metrics: MetricsDep) -> dict:
    c = runtime.components
    body: dict = {
        "service": {
            "version": VERSION,
            "state": runtime.state,
            "error": runtime.load_error,
            "uptime_s": round(metrics.uptime(), 1),
            "allowed_roots": list(runtime.roots.given),
            "auth": runtime.settings.api_token is not None,
            "warnings": runtime.warnings,
        },
        "model": None, "spec": None, "preset": None, "engine": None, "jobs": [],
    }
    if c is not None:
        body["model"] = c.jobs.model_info
        body["spec"] = {**c.spec.to_dict(), "digest": c.spec.digest}
        body["preset"] = matching_preset(c.spec)
        body["engine"] = c.engine.stats()
        body["jobs"] = [v.summary() for v in c.jobs.list_views()]
    return body


@router.get("/metrics")
def prometheus(metrics: MetricsDep) -> Response:
    return Response(metrics.render(), media_type=metrics.content_type)
