"""`GET /` (the status page's static shell), `GET /status` (JSON), `GET /metrics` (Prometheus text)."""

from __future__ import annotations

import base64
import functools
import hashlib
import re
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response

from vggt_cache.client.spec import matching_preset
from vggt_cache.service.api.deps import MetricsDep, Runtime

VERSION = "0.1.0"

router = APIRouter()


@functools.cache
def _page() -> tuple[str, str]:
    """The status page and its Content-Security-Policy: only its own inline script runs, it only talks to
    this origin, and no other page may frame it (clickjacking)."""
    html = resources.files("vggt_cache.service").joinpath("static/status.html").read_text(encoding="utf-8")
    scripts = " ".join(
        f"'sha256-{base64.b64encode(hashlib.sha256(block.encode()).digest()).decode()}'"
        for block in re.findall(r"<script[^>]*>(.*?)</script>", html, re.S)
    )
    # Styles inline: the job table sets each progress bar's width in a style attribute, which no hash allows.
    policy = (
        f"default-src 'none'; script-src {scripts}; style-src 'unsafe-inline'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    return html, policy


@router.get("/", response_class=HTMLResponse)
async def status_page() -> HTMLResponse:
    html, policy = _page()
    return HTMLResponse(html, headers={"Content-Security-Policy": policy, "X-Frame-Options": "DENY"})


@router.get("/status")
def status(runtime: Runtime, metrics: MetricsDep) -> dict:
    c = runtime.components
    body: dict = {
        "service": {
            "version": VERSION,
            "state": runtime.state,
            "error": runtime.load_error,
            "uptime_s": round(metrics.uptime(), 1),
            "allowed_roots": list(runtime.allowed.given),
            "auth": runtime.settings.api_token is not None,
            "warnings": runtime.warnings,
            "settings": runtime.settings.view(),
        },
        "model": None,
        "spec": None,
        "preset": None,
        "engine": None,
        "jobs": [],
    }
    if c is not None:
        body["model"] = c.jobs.model_info
        body["spec"] = {**c.spec.to_dict(), "digest": c.spec.digest}
        body["preset"] = matching_preset(c.spec)
        body["engine"] = c.engine.stats()
        body["jobs"] = [v.summary() for v in c.jobs.list_views()]
    return body


@router.get("/metrics")
async def prometheus(metrics: MetricsDep) -> Response:
    # On the event loop, never behind busy worker threads: engine counters and one WAL read (never waits).
    return Response(metrics.render(), media_type=metrics.content_type)
