"""What each `vggt-cache` subcommand does (argument parsing lives in cli.py)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor, wait

from service.jobview import JobState, JobView
from service.progress import follow_job
from service.samples import DEFAULT_MAX_HISTORY
from service.settings import ServiceSettings
from service.specflags import spec_options

log = logging.getLogger("vggt_cache")
PROGRESS_POLL_S = 1.0  # how often a followed job's progress is read (not a test's synchronisation)


def _settings(args: argparse.Namespace, **overrides: object) -> ServiceSettings:
    s = ServiceSettings(
        model=args.model, device=args.device, state_dir=os.path.expanduser(args.state_dir),
        spec=spec_options(args), max_batch_frames=args.max_batch_frames, decode_workers=args.decode_workers,
        write_workers=args.write_workers, patch_cache_mb=args.patch_cache_mb, fp32_weights=args.fp32_weights,
        compile=args.compile,
    )
    for key, value in overrides.items():
        setattr(s, key, value)
    return s


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.api import create_app
    from service.runtime import ServiceRuntime

    roots = args.allowed_roots or [r for r in (os.environ.get("VGGT_CACHE_ALLOWED_ROOT") or "").split(":") if r]
    if not roots:
        log.error("serve needs at least one --allowed-root DIR (the data the service may read and write)")
        return 2
    settings = _settings(args, host=args.host, port=args.port, allowed_roots=roots, api_token=args.api_token,
                         max_items_per_request=args.max_items_per_request, max_pending_units=args.max_pending,
                         max_image_bytes=args.max_image_bytes, body_timeout_s=args.body_timeout)
    try:
        runtime = ServiceRuntime(settings)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    app = create_app(runtime)  # its lifespan starts the runtime and, when uvicorn shuts down, stops it
    log.info("Serving on http://%s:%d (allowed roots: %s; auth: %s)", settings.host, settings.port,
             ", ".join(runtime.roots.given), "bearer token" if settings.api_token else "off")
    # uvicorn shuts down gracefully on SIGTERM or SIGINT, then raises the signal again for the handler
    # it found: take it quietly, so the process exits 0 after the lifespan has stopped jobs and engine.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: None)
    uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning",
                                  access_log=False, lifespan="on")).run()
    log.info("Stopped")
    return 0


def precompute(args: argparse.Namespace) -> int:
    if args.llm_model_path:
        log.info("--model_path %s is not needed (VGGT features do not depend on the LLM); ignored",
                 args.llm_model_path)
    data_root = os.path.abspath(args.data_root)
    if args.server:
        return _precompute_remote(args, data_root)
    return _precompute_local(args, data_root)


def _precompute_local(args: argparse.Namespace, data_root: str) -> int:
    from service.paths import AllowedRoots
    from service.runtime import build_components

    if not os.path.isdir(data_root):
        log.error("--data_root is not a folder: %s", data_root)
        return 2
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = args.device
    if world > 1 and device == "cuda":
        device = f"cuda:{local_rank}"  # under torchrun each rank drives its own GPU
    batch = args.batch_size or args.max_batch_frames
    state_dir = os.path.join(os.path.expanduser(args.state_dir), f"rank{rank}" if world > 1 else "")
    settings = _settings(args, device=device, max_batch_frames=batch, state_dir=state_dir)
    roots = AllowedRoots.of([data_root, *(args.allowed_roots or [])])
    if args.dry_run:
        return _dry_run_local(args, settings, data_root, roots)
    components = build_components(settings, roots, rank, world)
    engine, jobs = components.engine, components.jobs
    if world > 1:
        log.info("Rank %d of %d: taking shard %d", rank, world, rank)
    job = jobs.submit(data_root, skip_existing=args.skip_existing, verify=args.verify, data_path=args.data_path,
                      max_history_images=args.max_history_images, force=args.force, data_files=args.data_files)
    t0 = time.time()
    with ThreadPoolExecutor(1, thread_name_prefix="job") as pool:
        running = pool.submit(jobs.run, job.job_id)
        try:
            follow_job(lambda: jobs.view(job.job_id), lambda _: running.done(),
                        lambda: wait([running], timeout=PROGRESS_POLL_S),
                        f"[rank {rank}] precompute" if world > 1 else "precompute")
            view = running.result() or jobs.view(job.job_id)
        except BaseException:  # Ctrl-C: the job stops after its batches in flight and resumes next time
            jobs.stop()
            raise
        finally:
            engine.stop()
    if world > 1:
        _merge_rank_manifests(jobs, view, time.time() - t0, rank, world)
    _print_summary(view)
    return 0 if view.state is JobState.FINISHED and not view.failed else 1


def _dry_run_local(args: argparse.Namespace, settings: ServiceSettings, data_root: str, roots) -> int:
    """The plan of a precompute, from the weights' identity alone (the model is not built)."""
    from service.jobs import plan_work
    from service.model import identify_model
    from service.model.features import model_spec

    spec = model_spec(identify_model(settings.model), **settings.spec)
    work = plan_work(data_root, spec, roots, {"skip_existing": args.skip_existing, "data_path": args.data_path,
                                              "max_history_images": args.max_history_images,
                                              "data_files": args.data_files})
    _print_plan(work.plan.to_dict(), work.plan.summary(), spec.digest)
    return 0


def _print_plan(plan: dict, summary: str, digest: str) -> None:
    source = plan["source"]
    history = f", max_history_images {source['max_history_images']}" if source.get("max_history_images") else ""
    log.info("Dry run, spec %s: nothing is computed or written", digest)
    print(f"samples      {source['samples']} from {source['files']} {source['source']} source(s){history}")
    print(f"entries      {plan['entries']} ({plan['units']} forward units): {plan['valid']} valid, "
          f"{plan['to_compute']} to compute")
    if plan["problems"] or plan["refused"] or plan["unreadable"]:
        print(f"problems     {plan['problems']} malformed sample(s) or missing image(s), {plan['refused']} "
              f"outside the allowed roots, {plan['unreadable']} unreadable image(s)")
    print(f"to write     {plan['bytes_to_write']:,} bytes")
    print(f"free         {plan['free_bytes']:,} bytes on the file system of {plan['data_root']}"
          f" ({'fits' if plan['fits'] else 'DOES NOT FIT'})")
    print(summary)


_PLAN_COUNTS = ("units", "entries", "valid", "to_compute", "unreadable", "refused", "bytes_to_write")


def _merge_rank_manifests(jobs, view: JobView, seconds: float, rank: int, world: int) -> None:
    """torchrun: every rank sends its counts to rank 0, which writes the one manifest."""
    import torch.distributed as dist

    from client.manifest import write_manifest
    from service.jobs import manifest_record

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    parts: list[dict | None] = [None] * world
    dist.all_gather_object(parts, view.to_dict())
    if rank == 0:
        total = {k: sum(p[k] for p in parts) for k in ("total", "computed", "skipped", "failed")}
        failures = [f for p in parts for f in p.get("failures", [])]
        plans = [p["plan"] for p in parts if p.get("plan")]
        # One plan for the whole root: the samples found (the same on every rank), the counts summed.
        plan = {**plans[0], **{k: sum(p[k] for p in plans) for k in _PLAN_COUNTS}} if plans else None
        # Finished when every rank finished, else the state of the first rank that did not.
        state = next((JobState(p["state"]) for p in parts if p["state"] != JobState.FINISHED), JobState.FINISHED)
        write_manifest(view.data_root, manifest_record(view.job_id, state, total, jobs.spec, plan, jobs.model_info,
                                                       seconds, failures, ranks=world))
    dist.barrier()
    dist.destroy_process_group()


def _print_summary(view: JobView) -> None:
    log.info("%s: %d total, %d computed, %d skipped, %d failed", view.state.value, view.total, view.computed,
             view.skipped, view.failed)
    for f in (view.failures or [])[:20]:
        log.warning("Failed %s: %s", f["image"], f["reason"])


class _LostJob(RuntimeError):
    """The service no longer knows the job being followed."""


def _precompute_remote(args: argparse.Namespace, data_root: str) -> int:
    from client.service import ServiceClient, ServiceError

    options = {"skip_existing": args.skip_existing, "verify": args.verify, "data_path": args.data_path,
               "max_history_images": args.max_history_images, "data_files": args.data_files,
               "dry_run": args.dry_run, "force": args.force}
    with ServiceClient(args.server, args.api_token, down_s=0) as service:  # keep trying while it restarts
        try:
            answer = service.precompute(data_root, timeout=None if args.dry_run else 30.0, **options)
        except ServiceError as exc:
            log.error("The service refused the job: %s", exc)
            return 2
        if args.dry_run:
            _print_plan(answer["plan"], answer["summary"], answer["spec_digest"])
            return 0
        job_id = answer["job_id"]
        log.info("Job %s submitted to %s", job_id, args.server)

        def poll() -> JobView | None:
            try:
                return JobView.from_dict(service.job(job_id))
            except ServiceError as exc:
                if exc.status is None or exc.status == 503:  # unreachable, or restarting: it resumes
                    log.warning("Cannot follow job %s at %s (%s); still waiting", job_id, args.server, exc)
                    return None
                raise _LostJob(f"lost track of job {job_id}: {exc}") from exc

        try:
            view = follow_job(poll, lambda v: v is not None and not v.state.active,
                               lambda: time.sleep(PROGRESS_POLL_S), "precompute")
        except _LostJob as exc:
            log.error("%s", exc)
            return 2
    _print_summary(view)
    return 0 if view.state is JobState.FINISHED and not view.failed else 1


def verify(args: argparse.Namespace) -> int:
    from client.spec import FeatureSpec
    from service.verify import verify_data_root
    from client.manifest import read_manifest

    data_root = os.path.abspath(args.data_root)
    history, files = args.max_history_images, args.data_files
    if args.server:
        from client.service import ServiceClient, ServiceError

        try:
            with ServiceClient(args.server, args.api_token) as service:
                spec = service.spec()
        except (ServiceError, ValueError) as exc:
            log.error("Cannot take the spec from %s: %s", args.server, exc)
            return 2
    else:
        manifest = read_manifest(data_root)
        if manifest is None:
            log.error("No vggt_cache_manifest.json in %s: pass --server URL to take the spec from a service",
                      data_root)
            return 2
        spec = FeatureSpec.from_dict(manifest["spec"])
        scanned = (manifest.get("plan") or {}).get("source") or {}  # what the job that wrote it read
        history = scanned.get("max_history_images") if history is None else history
        files = scanned.get("sample_files") if files is None else files
    report = verify_data_root(data_root, spec, data_path=args.data_path,
                              max_history_images=DEFAULT_MAX_HISTORY if history is None else history, files=files)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        counts = report["counts"]
        print(f"{data_root}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        for item in report["problems"][:50]:
            print(f"  {item['outcome']:13s} {item['image']}: {item['reason']}")
    return 0 if report["ok"] else 1


def status(args: argparse.Namespace) -> int:
    from client.service import ServiceClient, ServiceError

    try:
        with ServiceClient(args.server, args.api_token) as service:
            body = service.status()
    except ServiceError as exc:
        log.error("Cannot read %s/status: %s", args.server, exc)
        return 2
    if args.json:
        print(json.dumps(body, indent=2))
        return 0
    svc, model, eng = body["service"], body.get("model"), body.get("engine")
    print(f"service  {args.server}  state={svc['state']}  uptime={svc['uptime_s']}s")
    if model:
        print(f"model    {model['source']}  {model['fingerprint']}  on {', '.join(model['devices'])}")
    if eng:
        print(f"engine   queued={eng.get('queued')}  images/s={eng.get('images_per_s')}")
    for job in body.get("jobs", []):
        eta = f"  eta {job['eta_s']}s" if job.get("eta_s") else ""
        print(f"job {job['job_id'][:8]}  {job['state']:9s} {job['progress']*100:5.1f}%  "
              f"{job['computed']} computed {job['skipped']} skipped {job['failed']} failed  {job['data_root']}{eta}")
    return 0


def demo(args: argparse.Namespace) -> int:
    from service.demo import run_demo

    return run_demo(keep=args.keep, port=args.port)

