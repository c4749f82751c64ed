"""HTTP API. Every route is here; each hands off to the runtime's engine or job manager.

    GET  /healthz, /readyz          probes (no auth)
    GET  /                          status page (static; it fetches /status itself)
    GET  /status                    model, spec, queues, throughput, memory, jobs
    GET  /metrics                   Prometheus text
    POST /features                  on-demand features -> safetensors body (client/wire.py)
    POST /precompute                bulk job over a data_root -> 202
    GET  /jobs/{id}, DELETE /jobs/{id}
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import os
import queue
import threading
from importlib import resources

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from client.spec import matching_preset
from client.wire import encode_features
from service.engine import Engine, EngineStopped, Priority, UnitResult
from service.jobs import plan_work
from service.jobview import JobState, JobView
from service.limits import BodySizeLimit
from service.metrics import Metrics
from service.paths import PathNotAllowed, printable
from service.runtime import Components, ServiceRuntime
from service.samples import DEFAULT_MAX_HISTORY
from service.units import Unit

VERSION = "0.1.0"
MEDIA_TYPE = "application/vnd.vggt-features+safetensors"


class FeaturesRequest(BaseModel):
    """Images (each its own target) and/or clips (ordered frames; the spec's attention mode decides the targets)."""

    images: list[str] = Field(default_factory=list, description="absolute image paths")
    clips: list[list[str]] = Field(default_factory=list, description="ordered frames, target last")
    skip_existing: bool = Field(True, description="serve valid sibling files instead of recomputing")
    wait: bool = Field(True, description="false: queue at bulk priority and return 202 (prefetch)")


class PrecomputeRequest(BaseModel):
    data_root: str
    skip_existing: bool = True
    verify: bool = False
    data_path: str | None = Field(None, description="folder the samples' image paths are relative to")
    max_history_images: int = Field(DEFAULT_MAX_HISTORY, ge=1, le=1024,
                                    description="history frames per sample of an episode folder (step_<n>_<action>)")
    dry_run: bool = Field(False, description="plan only: samples, entries valid / to compute, bytes, free space")
    force: bool = Field(False, description="start even if the new entries would not fit on the file system")
    data_files: list[str] | None = Field(None, description="sample files to read (relative to data_root), "
                                                           "instead of every one found")


class JobViewModel(BaseModel):
    """service.jobview.JobView at the HTTP edge."""

    job_id: str
    data_root: str
    state: JobState
    total: int
    computed: int
    skipped: int
    failed: int

    model_config = {"extra": "allow"}


def create_app(runtime: ServiceRuntime) -> FastAPI:
    settings = runtime.settings
    metrics = Metrics(runtime)
    # With a token, the OpenAPI schema and docs pages would be the only unauthenticated routes besides
    # the probes and the (data-free) status page shell: turn them off.
    open_docs = settings.api_token is None
    app = FastAPI(title="vggt-cache", version=VERSION, docs_url="/docs" if open_docs else None,
                  redoc_url=None, openapi_url="/openapi.json" if open_docs else None)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.middleware("http")(metrics.observe_request)
    prefetcher = Prefetcher()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Details name paths: a non-UTF-8 file name would make the JSON unencodable (a 500).
        detail = printable(exc.detail) if isinstance(exc.detail, str) else exc.detail
        return JSONResponse({"detail": detail}, exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # Where and what, without echoing the input: it may hold what JSON cannot carry (NaN, lone surrogates).
        errors = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        return JSONResponse({"detail": errors}, 422)

    def authorised(request: Request) -> None:
        if settings.api_token is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), settings.api_token.encode()):
            raise HTTPException(401, "missing or wrong bearer token (Authorization: Bearer <token>)",
                                headers={"WWW-Authenticate": "Bearer"})

    def ready() -> Components:
        if runtime.components is None:
            detail = f"model failed to load: {runtime.load_error}" if runtime.load_error else "model is still loading"
            raise HTTPException(503, detail, headers={"Retry-After": "5"})
        return runtime.components

    auth = [Depends(authorised)]

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        # A model that failed to load will not recover by itself: say so, so the orchestrator restarts us.
        failed = runtime.load_error is not None
        return JSONResponse({"status": "failed" if failed else "ok", "state": runtime.state,
                             "error": runtime.load_error}, 503 if failed else 200)

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        c = runtime.components
        if c is not None and not c.engine.ready:  # a device worker died: requests would wait forever
            return JSONResponse({"ready": False, "state": "engine stopped", "error": runtime.load_error}, 503)
        code = 200 if c is not None else 503
        return JSONResponse({"ready": code == 200, "state": runtime.state, "error": runtime.load_error}, code)

    @app.get("/", response_class=HTMLResponse)
    def status_page() -> str:
        return resources.files("service").joinpath("static/status.html").read_text(encoding="utf-8")

    @app.get("/status", dependencies=auth)
    def status() -> dict:
        c = runtime.components
        body: dict = {
            "service": {
                "version": VERSION,
                "state": runtime.state,
                "error": runtime.load_error,
                "uptime_s": round(metrics.uptime(), 1),
                "allowed_roots": list(runtime.roots.given),
                "auth": settings.api_token is not None,
            },
            "model": None, "spec": None, "preset": None, "engine": None, "jobs": [],
        }
        if c is not None:
            body["model"] = c.jobs.model_info
            body["spec"] = {**c.spec.to_dict(), "digest": c.spec.digest}
            body["preset"] = matching_preset(c.spec)
            body["engine"] = c.engine.stats()
            body["jobs"] = [v.to_dict() for v in c.jobs.list_views()]
        return body

    @app.get("/metrics", dependencies=auth)
    def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.post("/features", dependencies=auth)
    async def features(req: FeaturesRequest, c: Components = Depends(ready)) -> Response:
        n_items = len(req.images) + len(req.clips)
        n_frames = len(req.images) + sum(len(clip) for clip in req.clips)
        if n_items == 0:
            raise HTTPException(422, "give at least one image in 'images' or one clip in 'clips'")
        if n_frames > settings.max_items_per_request:
            raise HTTPException(413, f"{n_frames} images in one request; the limit is "
                                     f"{settings.max_items_per_request} (split the request)")
        try:
            # realpath() on every frame touches the file system (NFS): off the event loop.
            units = await run_in_threadpool(lambda: request_units(
                [runtime.roots.contain(p) for p in req.images],
                [[runtime.roots.contain(p) for p in clip] for clip in req.clips],
                c.spec.attention,
            ))
        except PathNotAllowed as exc:
            raise HTTPException(403, str(exc)) from exc
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from exc

        if not req.wait:
            if not prefetcher.offer(c.engine, units, req.skip_existing):
                raise HTTPException(429, "prefetch queue is full; retry later", headers={"Retry-After": "5"})
            return JSONResponse({"queued": len(units)}, status_code=202)

        pending = c.engine.pending(Priority.ON_DEMAND)
        # An empty queue always admits, so a request larger than the limit still gets through eventually.
        if pending and pending + len(units) > settings.max_pending_units:
            raise HTTPException(429, "on-demand queue is full; retry shortly", headers={"Retry-After": "1"})
        try:
            futures = c.engine.submit(units, Priority.ON_DEMAND, skip_existing=req.skip_existing)
            results = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
        except EngineStopped as exc:
            raise HTTPException(503, str(exc), headers={"Retry-After": "5"}) from exc
        metrics.count_entries(e for r in results for e in r.entries)
        # Copies every tensor into one body (hundreds of MB for VGGT-1B): off the event loop.
        body = await run_in_threadpool(features_body, results, c.spec.digest)
        return Response(body, media_type=MEDIA_TYPE)

    @app.post("/precompute", status_code=202, dependencies=auth, response_model=None)
    def precompute(req: PrecomputeRequest, c: Components = Depends(ready)) -> JobViewModel | JSONResponse:
        try:
            data_root = runtime.roots.contain(req.data_root, writes_sibling=False)
        except PathNotAllowed as exc:
            raise HTTPException(403, str(exc)) from exc
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from exc
        if not os.path.isdir(data_root):
            raise HTTPException(404, f"data_root is not a folder: {req.data_root}")
        options = {"skip_existing": req.skip_existing, "data_path": req.data_path,
                   "max_history_images": req.max_history_images, "data_files": req.data_files}
        try:
            if req.dry_run:
                work = plan_work(data_root, c.spec, runtime.roots, options)
                return JSONResponse({"dry_run": True, "spec_digest": c.spec.digest, "plan": work.plan.to_dict(),
                                     "summary": work.plan.summary()})
            job = c.jobs.submit(data_root, verify=req.verify, force=req.force, **options)
        except PathNotAllowed as exc:  # a sample file outside the allowed roots
            raise HTTPException(403, str(exc)) from exc
        except ValueError as exc:  # a dry run without samples, a data root the job store cannot record
            raise HTTPException(422, str(exc)) from exc
        return JobViewModel(**job.to_dict())

    @app.get("/jobs/{job_id}", dependencies=auth)
    def get_job(job_id: str, c: Components = Depends(ready)) -> JobViewModel:
        return _job_view(job_id, c.jobs.view(job_id))

    @app.delete("/jobs/{job_id}", dependencies=auth)
    def cancel_job(job_id: str, c: Components = Depends(ready)) -> JobViewModel:
        return _job_view(job_id, c.jobs.cancel(job_id))

    return app


def features_body(results: list[UnitResult], spec_digest: str) -> bytes:
    """The safetensors body of a /features answer (client/wire.py): results in request order."""
    items, tensors, requests = [], {}, []
    for position, result in enumerate(results):
        for e in result.entries:
            name = None
            if e.features is not None:
                name = str(len(tensors))
                tensors[name] = e.features
            items.append({"image": e.image, "status": e.status, "tensor": name, "error": e.error,
                          "grid": list(e.grid) if e.grid else None})
            requests.append(position)
    return encode_features(items, tensors, spec_digest, requests)


class Prefetcher:
    """Prefetch hints (`"wait": false`) go to the engine's bulk queue from one thread, a bounded backlog ahead."""

    def __init__(self, backlog: int = 64) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=backlog)
        threading.Thread(target=self._run, name="prefetch", daemon=True).start()

    def offer(self, engine: Engine, units: list[Unit], skip_existing: bool) -> bool:
        try:
            self._queue.put_nowait((engine, units, skip_existing))
        except queue.Full:
            return False
        return True

    def _run(self) -> None:
        while True:
            engine, units, skip_existing = self._queue.get()
            with contextlib.suppress(EngineStopped):  # shutting down: a hint may be dropped
                engine.submit(units, Priority.BULK, skip_existing=skip_existing, return_features=False)


def _job_view(job_id: str, job: JobView | None) -> JobViewModel:
    if job is None:
        raise HTTPException(404, f"no job {job_id}")
    return JobViewModel(**job.to_dict())


def request_units(images: list[str], clips: list[list[str]], attention: str) -> list[Unit]:
    """An image is a clip of one; in frame mode a clip asks for its last (current) frame."""
    if any(not clip for clip in clips):
        raise ValueError("a clip needs at least one frame")
    units = [Unit.for_clip(attention, [image]) for image in images]
    units += [Unit.frame(clip[-1]) if attention == "frame" else Unit.for_clip(attention, clip) for clip in clips]
    return units
