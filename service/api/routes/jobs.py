"""`POST /precompute` (a bulk job over a data root, or its plan), `GET /jobs/{id}`, `DELETE /jobs/{id}`."""

from __future__ import annotations

import os

from fastapi import APIRouter, HTTPException
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from vggt_cache.service.api.deps import Plans, Ready, Runtime
from vggt_cache.service.api.schemas import JobViewModel, PrecomputeRequest
from vggt_cache.service.jobs.options import JobLimits, JobOptions
from vggt_cache.service.jobs.planning import plan_root
from vggt_cache.service.jobs.view import TERMINAL, JobView
from vggt_cache.service.runtime import Components, ServiceRuntime

router = APIRouter()


@router.post("/precompute", status_code=202, response_model=None)
async def precompute(req: PrecomputeRequest, c: Ready, runtime: Runtime, plans: Plans) -> JobViewModel | JSONResponse:
    if not req.dry_run:
        return await run_in_threadpool(_precompute, req, c, runtime)
    # A plan walks the whole tree: a few at a time, admitted here, so that plans cannot take every worker thread.
    with plans.admit():
        return await run_in_threadpool(_precompute, req, c, runtime)


def _precompute(req: PrecomputeRequest, c: Components, runtime: ServiceRuntime) -> JobViewModel | JSONResponse:
    data_root = runtime.allowed.contain(req.data_root, writes_sibling=False)
    if not os.path.isdir(data_root):
        raise HTTPException(404, f"data_root is not a folder: {req.data_root}")
    options = JobOptions.of(req)
    if req.dry_run:  # the plan alone, computed here (a slow NFS root needs a patient client)
        plan = plan_root(data_root, c.spec, runtime.allowed, options, JobLimits.of(runtime.settings))
        return JSONResponse(
            {"dry_run": True, "spec_digest": c.spec.digest, "plan": plan.to_dict(), "summary": plan.summary()}
        )
    job = c.jobs.submit(data_root, options)
    if job.options != options:  # the active job over this root and spec, started with other options
        asked, running = options.to_dict(), job.options.to_dict()
        differ = ", ".join(f"{k}={running[k]!r} (asked {asked[k]!r})" for k in sorted(asked) if asked[k] != running[k])
        raise HTTPException(
            409,
            f"job {job.job_id} over this data_root and spec is already {job.state.value} with {differ}; "
            f"wait for it or cancel it (DELETE /jobs/{job.job_id}), then submit again",
        )
    return _model(req.data_root, job)


@router.get("/jobs/{job_id}")
def get_job(job_id: str, c: Ready) -> JobViewModel:
    return _model(job_id, c.jobs.view(job_id))


@router.delete("/jobs/{job_id}")
def cancel_job(job_id: str, c: Ready) -> JobViewModel:
    """Cancel: queued units are taken back at once; only the batches on a device finish (409 once it ended)."""
    view = _model(job_id, c.jobs.view(job_id))
    if view.state in TERMINAL:
        raise HTTPException(409, f"job {job_id} already {view.state.value}: nothing to cancel")
    return _model(job_id, c.jobs.cancel(job_id))


def _model(name: str, job: JobView | None) -> JobViewModel:
    if job is None:
        raise HTTPException(404, f"no job {name}")
    return JobViewModel(**job.to_dict())
