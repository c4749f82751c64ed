"""`vggt-cache precompute`: a job computed in this process (one rank of torchrun, or alone) or by `--server`."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any

from vggt_cache.service.collector import settle_start_up
from vggt_cache.service.commands.common import (
    PROGRESS_POLL_S,
    check_device,
    client,
    loading_model,
    no_folder,
    settings_of,
)
from vggt_cache.service.commands.dryrun import dry_run_local, print_plan
from vggt_cache.service.devices import parse_devices, rank_device
from vggt_cache.service.errors import CommandError
from vggt_cache.service.jobs.options import JobOptions
from vggt_cache.service.jobs.view import JobState, JobView
from vggt_cache.service.progress import follow_job
from vggt_cache.service.settings import read_variable
from vggt_cache.service.specflags import given_options, serve_flags

log = logging.getLogger("vggt_cache")


def precompute(args: argparse.Namespace) -> int:
    if args.llm_model_path:
        log.info("--model_path %s is not needed (VGGT features do not depend on the LLM); ignored", args.llm_model_path)
    data_root = os.path.abspath(args.data_root)
    if args.server:
        return _precompute_remote(args, data_root)
    return _precompute_local(args, data_root)


def _precompute_local(args: argparse.Namespace, data_root: str) -> int:
    from vggt_cache.service.paths import AllowedRoots
    from vggt_cache.service.runtime import ModelUnavailable, build_components

    if not os.path.isdir(data_root):
        raise no_folder(data_root)
    # torchrun's variables: which shard this process takes, and which GPU
    rank, world = int(read_variable("RANK") or "0"), int(read_variable("WORLD_SIZE") or "1")
    local_rank = int(read_variable("LOCAL_RANK") or "0")
    device = args.device
    if world > 1 and not args.dry_run:
        check_device(device)
        if device in ("cuda", "auto") and parse_devices(device) != ["cpu"]:
            device = rank_device(device, local_rank)  # under torchrun each rank drives its own GPU
    batch = args.batch_size or args.max_batch_frames
    state_dir = os.path.join(args.state_dir, f"rank{rank}" if world > 1 else "")
    allowed = AllowedRoots.of([data_root, *(args.allowed_roots or [])])
    settings = settings_of(
        args, device=device, max_batch_frames=batch, state_dir=state_dir, allowed_roots=allowed.given
    )
    if args.dry_run:
        return dry_run_local(args, settings, data_root, allowed)
    check_device(settings.device)
    with loading_model(settings.model, ModelUnavailable):
        components = build_components(settings, allowed, rank, world)
    settle_start_up()
    engine, jobs = components.engine, components.jobs
    if world > 1:
        log.info("Rank %d of %d: taking shard %d", rank, world, rank)
    job = jobs.submit(data_root, JobOptions.of(args))
    t0 = time.time()
    with ThreadPoolExecutor(1, thread_name_prefix="job") as pool:
        running = pool.submit(jobs.run, job.job_id)
        try:
            follow_job(
                lambda: jobs.view(job.job_id),
                lambda _: running.done(),
                lambda: wait([running], timeout=PROGRESS_POLL_S),
                f"[rank {rank}] precompute" if world > 1 else "precompute",
            )
            view = running.result() or jobs.view(job.job_id)
        except BaseException:  # Ctrl-C: the job stops after its batches in flight and resumes next time
            jobs.stop()
            raise
        finally:
            engine.stop()
    assert view is not None  # the job submitted above: still in the store, so `run` or `view` finds it
    if world > 1:
        _merge_rank_manifests(jobs, view, time.time() - t0, rank, world)
    _print_summary(view)
    return 0 if view.state is JobState.FINISHED and not view.failed else 1


def _merge_rank_manifests(jobs, view: JobView, seconds: float, rank: int, world: int) -> None:
    """torchrun: every rank sends its view to rank 0, which writes the one manifest."""
    import torch.distributed as dist

    from vggt_cache.service.jobs.manifest import merged_report, write_job_manifest

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    parts: list[Any] = [None] * world  # every rank's view.to_dict(), once gathered
    dist.all_gather_object(parts, view.to_dict())
    if rank == 0:
        report = merged_report([JobView.from_dict(p) for p in parts], seconds)
        write_job_manifest(view.data_root, report, jobs.spec, jobs.model_info, jobs.allowed, jobs.engine.file_mode)
    dist.barrier()
    dist.destroy_process_group()


def _print_summary(view: JobView) -> None:
    if view.state is JobState.FAILED and view.error and not view.total:  # refused before any work: a setup problem
        raise CommandError(f"job {view.job_id} failed: {view.error}")
    if view.state is JobState.FINISHED and not view.total:
        log.warning("Nothing to compute: no samples or images found under %s", view.data_root)
        return
    log.info(
        "%s: %d total, %d computed, %d skipped, %d failed",
        view.state.value,
        view.total,
        view.computed,
        view.skipped,
        view.failed,
    )
    if view.options.verify:
        log.info(
            "Verified: each of the %d entries computed was read back and validated against the spec "
            "(an entry that did not validate counts as failed)",
            view.computed,
        )
    if view.kept or view.replaced:
        log.info(
            "Entries computed with another clip: %d kept, %d replaced (--overwrite replaces them)",
            view.kept,
            view.replaced,
        )
    for f in (view.failures or [])[:20]:
        log.warning("Failed %s: %s", f["image"], f["reason"])


def _check_server_spec(args: argparse.Namespace, service) -> None:
    """Spec flags given with `--server` must name the service's spec: it computes with its own, never theirs."""
    from vggt_cache.client.service import spec_of_status

    given = given_options(args)
    if not given:
        return
    body = service.status()
    try:
        theirs = spec_of_status(body)
    except ValueError as exc:  # no model loaded yet: nothing to compare the flags with
        raise CommandError(
            f"cannot check the spec flags against {args.server}: {exc}; retry once it is ready, or drop the spec flags"
        ) from None
    try:
        wanted = dataclasses.replace(theirs, **given)
    except ValueError as exc:
        raise CommandError(f"the spec flags do not make a spec: {exc}") from None
    differ = theirs.differences(wanted)
    if differ:
        fields = ", ".join(f"{f} {getattr(wanted, f)} here, {getattr(theirs, f)} there" for f in differ)
        raise CommandError(
            f"the service at {args.server} computes another spec than the flags given ({fields}): "
            f"drop the spec flags to use its spec, or serve this one with `vggt-cache serve "
            f"--model {(body.get('model') or {}).get('source', 'MODEL')} {serve_flags(wanted)} ...`"
        )


def _precompute_remote(args: argparse.Namespace, data_root: str) -> int:
    from vggt_cache.client.service import ServiceError

    options = {**JobOptions.of(args).to_dict(), "dry_run": args.dry_run}
    with client(args, down_s=0) as service:  # keep trying while it restarts
        _check_server_spec(args, service)
        answer = service.precompute(data_root, timeout=None if args.dry_run else 30.0, **options)
        if args.dry_run:
            print_plan(answer["plan"], answer["summary"], answer["spec_digest"])
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
                raise CommandError(f"lost track of job {job_id}: {exc}") from exc

        view = follow_job(
            poll, lambda v: v is not None and not v.state.active, lambda: time.sleep(PROGRESS_POLL_S), "precompute"
        )
    assert view is not None  # follow_job returns once done(view), which holds for a view only
    _print_summary(view)
    return 0 if view.state is JobState.FINISHED and not view.failed else 1
