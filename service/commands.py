"""What each `vggt-cache` subcommand does (argument parsing lives in cli.py).

A command that cannot go on raises `CommandError` (what is wrong and what to do); cli.py prints it as
one `[ERROR]` line.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, wait

from vggt_cache.client.text import displayable
from vggt_cache.service.errors import CommandError
from vggt_cache.service.jobs.options import JobLimits, JobOptions
from vggt_cache.service.jobs.view import JobState, JobView
from vggt_cache.service.progress import follow_job
from vggt_cache.service.samples import DEFAULT_MAX_HISTORY
from vggt_cache.service.settings import ServiceSettings, parse_devices, rank_device
from vggt_cache.service.specflags import given_options, serve_flags, spec_options

log = logging.getLogger("vggt_cache")
PROGRESS_POLL_S = 1.0  # how often a followed job's progress is read (not a test's synchronisation)


def _say(line: str) -> None:
    """One line of a command's output: names in it come from others' files, so it is made `displayable`."""
    print(displayable(line))


def _say_json(body: object) -> None:
    """`--json` output: ASCII-escaped, so no name in it reaches the terminal as a control character."""
    print(json.dumps(body, indent=2, ensure_ascii=True))


def _settings(args: argparse.Namespace, **overrides: object) -> ServiceSettings:
    s = ServiceSettings(
        model=args.model, device=args.device, state_dir=os.path.expanduser(args.state_dir),
        spec=spec_options(args), max_batch_frames=args.max_batch_frames, decode_workers=args.decode_workers,
        write_workers=args.write_workers, patch_cache_mb=args.patch_cache_mb, fp32_weights=args.fp32_weights,
        compile=args.compile, max_image_bytes=args.max_image_bytes, file_mode=args.file_mode,
        max_frames_per_sample=args.max_frames_per_sample,
        job_retention=args.job_retention, job_retention_days=args.job_retention_days,
        max_sample_bytes=args.max_sample_bytes,
    )
    for key, value in overrides.items():
        setattr(s, key, value)
    try:
        s.check()  # before any model is loaded
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    return s


def _check_device(device: str) -> None:
    """A `--device` this machine cannot give is said before anything is loaded."""
    try:
        parse_devices(device)
    except ValueError as exc:
        raise CommandError(str(exc)) from None


@contextlib.contextmanager
def _loading_model(source: str, *errors: type[Exception]) -> Iterator[None]:
    """A model that cannot be read or does not fit (`errors`) is the user's to fix: one line naming the source."""
    try:
        yield
    except errors as exc:
        raise CommandError(f"cannot load the VGGT model {source}: {exc} (check --vggt_model_path / --model)") from exc


def _no_folder(path: str) -> CommandError:
    return CommandError(f"no such folder: {path} (give the data root that holds the images and sample files)")


def listen(host: str, port: int) -> socket.socket:
    """A socket listening on host:port (port 0: a free one); a port in use or a bad host is a CommandError."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise CommandError(f"--host {host}: {exc.strerror}; give an address of this machine "
                           "(127.0.0.1, or 0.0.0.0 for every interface)") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a restart reuses the port at once
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise CommandError(f"port {port} on {host} is already in use (another vggt-cache serve?): stop that "
                               "process, or pass --port N") from None
        raise CommandError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


def api_token(args: argparse.Namespace) -> str | None:
    """The bearer token: `--api-token-file`, else `--api-token` (with a warning: `ps` shows it), else the variable."""
    from vggt_cache.client.service import TOKEN_ENV, read_token_file

    if args.api_token is not None and args.api_token_file:
        raise CommandError("give --api-token or --api-token-file, not both")
    if args.api_token_file:
        try:
            return read_token_file(args.api_token_file)
        except (OSError, ValueError) as exc:
            raise CommandError(f"--api-token-file {args.api_token_file}: {exc}") from None
    if args.api_token is not None:
        log.warning("--api-token on the command line can be read by every user of this machine (ps): put it in a "
                    "file readable by you alone (--api-token-file) or in $%s", TOKEN_ENV)
        return args.api_token
    return os.environ.get(TOKEN_ENV)


def serve(args: argparse.Namespace) -> int:
    import uvicorn
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    from vggt_cache.service.api import create_app
    from vggt_cache.service.api.connections import ACCEPT_BACKLOG, connection_cap, guarded_protocol, raise_descriptor_limit
    from vggt_cache.service.runtime import ServiceRuntime

    settings = _settings(args, host=args.host, port=args.port, allowed_roots=args.allowed_roots,
                         api_token=api_token(args), max_items_per_request=args.max_items_per_request,
                         max_pending_units=args.max_pending, body_timeout_s=args.body_timeout,
                         header_timeout_s=args.header_timeout, max_connections=args.max_connections,
                         max_plans=args.max_plans, allowed_hosts=args.allowed_hosts,
                         shutdown_grace_s=args.shutdown_grace)
    _check_device(settings.device)
    try:
        runtime = ServiceRuntime(settings)
    except ValueError as exc:  # settings that cannot be meant (ServiceSettings.check)
        raise CommandError(str(exc)) from None
    # Idle connections must not take the descriptors the engine needs for images and entries.
    protocol = guarded_protocol(AutoHTTPProtocol, settings.header_timeout_s,
                                connection_cap(settings.max_connections, raise_descriptor_limit()))
    sock = listen(settings.host, settings.port)  # before the model loads: a port in use is said at once
    settings.port = sock.getsockname()[1]
    app = create_app(runtime)  # its lifespan starts the runtime and, when uvicorn shuts down, stops it
    log.info("Serving on http://%s:%d (allowed roots: %s; auth: %s)", settings.host, settings.port,
             ", ".join(runtime.roots.given), "bearer token" if settings.api_token else "off")
    # uvicorn shuts down gracefully on SIGTERM or SIGINT, then raises the signal again for the handler
    # it found: take it quietly, so the process exits 0 after the lifespan has stopped jobs and engine.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: None)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: object) -> None:
            runtime.begin_shutdown()  # the grace counts from the signal: requests and work share it
            super().handle_exit(sig, frame)

    Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning", access_log=False,
                          lifespan="on", http=protocol, backlog=ACCEPT_BACKLOG,
                          timeout_graceful_shutdown=settings.shutdown_grace_s)).run(sockets=[sock])
    log.info("Stopped")
    if not runtime.stopped_cleanly:
        # A device thread is still inside its forward: leave without waiting for it (or for the interpreter's
        # exit handlers, which join worker threads).
        logging.shutdown()
        os._exit(0)
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
    from vggt_cache.service.paths import AllowedRoots
    from vggt_cache.service.runtime import ModelUnavailable, build_components

    if not os.path.isdir(data_root):
        raise _no_folder(data_root)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = args.device
    if world > 1 and not args.dry_run:
        _check_device(device)
        if device in ("cuda", "auto") and parse_devices(device) != ["cpu"]:
            device = rank_device(device, local_rank)  # under torchrun each rank drives its own GPU
    batch = args.batch_size or args.max_batch_frames
    state_dir = os.path.join(os.path.expanduser(args.state_dir), f"rank{rank}" if world > 1 else "")
    settings = _settings(args, device=device, max_batch_frames=batch, state_dir=state_dir)
    roots = AllowedRoots.of([data_root, *(args.allowed_roots or [])])
    if args.dry_run:
        return _dry_run_local(args, settings, data_root, roots)
    _check_device(settings.device)
    with _loading_model(settings.model, ModelUnavailable):
        components = build_components(settings, roots, rank, world)
    engine, jobs = components.engine, components.jobs
    if world > 1:
        log.info("Rank %d of %d: taking shard %d", rank, world, rank)
    job = jobs.submit(data_root, _job_options(args))
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
    from vggt_cache.service.jobs.planning import plan_work
    from vggt_cache.service.model import identify_model
    from vggt_cache.service.model.features import model_spec
    from vggt_cache.service.model.loader import is_hub_id

    with _loading_model(settings.model, OSError, ValueError):  # weights there but unreadable: the user's to fix
        try:
            identity = identify_model(settings.model)  # reads nothing else
        except FileNotFoundError as exc:
            if not is_hub_id(settings.model):  # a path that is not there: a typo, said as one
                raise
            identity = _unknown_model(settings.model, exc)
    spec = model_spec(identity, **settings.spec)
    work = plan_work(data_root, spec, roots, _job_options(args), JobLimits.of(settings))
    if identity.fingerprint == UNKNOWN_FINGERPRINT:
        _say(f"model        {settings.model}: not on this machine, identity unknown (every entry counted to "
              "compute; the digest below changes once the weights are there)")
    _print_plan(work.plan.to_dict(), work.plan.summary(), spec.digest)
    return 0


# What a plan's `source` counts, in words ("3 episode folder(s)", not "3 episodes source(s)").
_SOURCE_WORDS = {"jsonl": "JSONL file(s)", "json": "JSON sample file(s)", "jsonl+json": "sample file(s)",
                 "episodes": "episode folder(s)", "images": "image(s) (no sample files)"}


# Stands for weights that are not on this machine: no entry on disk carries it, so a plan made with it
# counts every entry to compute (an upper bound, as a plan errs large).
UNKNOWN_FINGERPRINT = "sha256:" + "0" * 64


def _unknown_model(source: str, missing: FileNotFoundError):
    """A dry run without the weights: VGGT-1B's architecture (or the config beside them), fingerprint unknown."""
    from vggt_cache.service.model import ModelIdentity
    from vggt_cache.service.model.config import AggregatorConfig

    log.warning("The weights of %s are not on this machine (%s): planning from the spec alone. The model's "
                "identity is unknown, so entries already written cannot be checked: every entry counts as to "
                "compute", source, missing)
    return ModelIdentity(AggregatorConfig(), UNKNOWN_FINGERPRINT, source)


def _print_plan(plan: dict, summary: str, digest: str) -> None:
    source = plan["source"]
    history = f", max_history_images {source['max_history_images']}" if source.get("max_history_images") else ""
    log.info("Dry run, spec %s: nothing is computed or written", digest)
    kind = _SOURCE_WORDS.get(source["source"], source["source"])
    _say(f"samples      {source['samples']} from {source['files']} {kind}{history}")
    recomputed = " (recomputed: --no-skip-existing)" if plan["valid"] + plan["to_compute"] > plan["entries"] else ""
    _say(f"entries      {plan['entries']} ({plan['units']} forward units): {plan['valid']} valid{recomputed}, "
          f"{plan['to_compute']} to compute")
    if plan["problems"] or plan["refused"] or plan["unreadable"]:
        _say(f"problems     {plan['problems']} malformed sample(s), missing image(s) or unlisted folder(s) "
             f"({plan.get('unlisted', 0)} of these), {plan['refused']} refused (outside the allowed roots or too "
             f"many frames), {plan['unreadable']} unreadable image(s)")
        for item in plan.get("first_problems", []):
            _say(f"  {item['where']}: {item['reason']}")
    replaced = f", net of {plan['replaced_bytes']:,} bytes they replace" if plan.get("replaced_bytes") else ""
    _say(f"to write     {plan['bytes_to_write']:,} bytes ({plan.get('entry_bytes', 0):,} bytes an entry{replaced})")
    _say(f"free         {plan['free_bytes']:,} bytes on the file system of {plan['data_root']}"
          f" ({'fits' if plan['fits'] else 'DOES NOT FIT'})")
    _say(summary)


def _job_options(args: argparse.Namespace) -> JobOptions:
    """`vggt-cache precompute`'s flags as a job's options (local, dry run, or the body sent to a service)."""
    return JobOptions(skip_existing=args.skip_existing, verify=args.verify, data_path=args.data_path,
                      max_history_images=args.max_history_images, force=args.force, data_files=args.data_files,
                      overwrite=args.overwrite)


def _merge_rank_manifests(jobs, view: JobView, seconds: float, rank: int, world: int) -> None:
    """torchrun: every rank sends its view to rank 0, which writes the one manifest."""
    import torch.distributed as dist

    from vggt_cache.service.jobs.manifest import merged_report, write_job_manifest

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    parts: list[dict | None] = [None] * world
    dist.all_gather_object(parts, view.to_dict())
    if rank == 0:
        report = merged_report([JobView.from_dict(p) for p in parts], seconds)
        write_job_manifest(view.data_root, report, jobs.spec, jobs.model_info, jobs.roots, jobs.engine.file_mode)
    dist.barrier()
    dist.destroy_process_group()


def _print_summary(view: JobView) -> None:
    if view.state is JobState.FAILED and view.error and not view.total:  # refused before any work: a setup problem
        raise CommandError(f"job {view.job_id} failed: {view.error}")
    if view.state is JobState.FINISHED and not view.total:
        log.warning("Nothing to compute: no samples or images found under %s", view.data_root)
        return
    log.info("%s: %d total, %d computed, %d skipped, %d failed", view.state.value, view.total, view.computed,
             view.skipped, view.failed)
    if view.options.verify:
        log.info("Verified: each of the %d entries computed was read back and validated against the spec "
                 "(an entry that did not validate counts as failed)", view.computed)
    if view.kept or view.replaced:
        log.info("Entries computed with another clip: %d kept, %d replaced (--overwrite replaces them)",
                 view.kept, view.replaced)
    for f in (view.failures or [])[:20]:
        log.warning("Failed %s: %s", f["image"], f["reason"])


def _client(args: argparse.Namespace, **options: object):
    """A ServiceClient of `--server`; a URL that is not one is the user's to fix."""
    from vggt_cache.client.service import ServiceClient

    try:
        return ServiceClient(args.server, api_token(args), **options)
    except ValueError as exc:
        raise CommandError(f"--server {args.server}: {exc}") from None


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
        raise CommandError(f"cannot check the spec flags against {args.server}: {exc}; retry once it is ready, "
                           "or drop the spec flags") from None
    try:
        wanted = dataclasses.replace(theirs, **given)
    except ValueError as exc:
        raise CommandError(f"the spec flags do not make a spec: {exc}") from None
    differ = theirs.differences(wanted)
    if differ:
        fields = ", ".join(f"{f} {getattr(wanted, f)} here, {getattr(theirs, f)} there" for f in differ)
        raise CommandError(f"the service at {args.server} computes another spec than the flags given ({fields}): "
                           f"drop the spec flags to use its spec, or serve this one with `vggt-cache serve "
                           f"--model {(body.get('model') or {}).get('source', 'MODEL')} {serve_flags(wanted)} ...`")


def _precompute_remote(args: argparse.Namespace, data_root: str) -> int:
    from vggt_cache.client.service import ServiceError

    options = {**_job_options(args).to_dict(), "dry_run": args.dry_run}
    with _client(args, down_s=0) as service:  # keep trying while it restarts
        _check_server_spec(args, service)
        answer = service.precompute(data_root, timeout=None if args.dry_run else 30.0, **options)
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
                raise CommandError(f"lost track of job {job_id}: {exc}") from exc

        view = follow_job(poll, lambda v: v is not None and not v.state.active,
                          lambda: time.sleep(PROGRESS_POLL_S), "precompute")
    _print_summary(view)
    return 0 if view.state is JobState.FINISHED and not view.failed else 1


def verify(args: argparse.Namespace) -> int:
    from vggt_cache.client.manifest import MANIFEST_NAME, read_manifest
    from vggt_cache.client.spec import FeatureSpec
    from vggt_cache.service.verify import verify_data_root

    data_root = os.path.abspath(args.data_root)
    if not os.path.isdir(data_root):
        raise _no_folder(data_root)
    if args.estimate_storage:
        return _estimate_storage(data_root, args.samples, args.json)
    history, files = args.max_history_images, args.data_files
    if args.server:
        from vggt_cache.client.service import spec_of_status

        with _client(args) as service:
            body = service.status()
        try:
            spec = spec_of_status(body)
        except ValueError as exc:
            raise CommandError(f"{args.server} gives no spec to verify against: {exc}") from None
    else:
        try:
            manifest = read_manifest(data_root)
        except ValueError as exc:
            raise CommandError(f"{exc}; pass --server URL to take the spec from a service") from None
        if manifest is None:
            raise CommandError(f"no {MANIFEST_NAME} in {data_root} (no job has finished there): pass --server URL "
                               "to take the spec from a service")
        spec = FeatureSpec.from_dict(manifest["spec"])
        scanned = (manifest.get("plan") or {}).get("source") or {}  # what the job that wrote it read
        history = scanned.get("max_history_images") if history is None else history
        files = scanned.get("sample_files") if files is None else files
    report = verify_data_root(data_root, spec, data_path=args.data_path,
                              max_history_images=DEFAULT_MAX_HISTORY if history is None else history, files=files,
                              max_sample_bytes=args.max_sample_bytes)
    if args.json:
        _say_json(report)
    else:
        counts = report["counts"]
        _say(f"{data_root}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        for item in report["problems"][:50]:
            _say(f"  {item['outcome']:13s} {item['image']}: {item['reason']}")
    return 0 if report["ok"] else 1


def _estimate_storage(data_root: str, samples: int, as_json: bool) -> int:
    from vggt_cache.service.convert import estimate_storage
    from vggt_cache.service.jobs.plan import human_bytes

    report = estimate_storage(data_root, samples)
    if as_json:
        print(json.dumps(report, indent=2))
        return 0
    _say(f"{data_root}: {report['entries']} entries, {human_bytes(report['bytes_now'])} now; "
          f"{report['sampled']} valid entries sampled")
    for storage, row in report["storages"].items():
        error = row.get("error")
        shown = (f"; error max {error['max_rel']:.2%} mean {error['mean_rel']:.2%} of the magnitudes, lowest "
                 f"token cosine {error['min_cosine']:.5f}") if error else ""
        _say(f"  {storage:7s} {human_bytes(row['bytes'])} ({row['ratio']:.2f}x smaller than raw){shown}")
    return 0


def convert(args: argparse.Namespace) -> int:
    from vggt_cache.service.convert import convert_entries
    from vggt_cache.service.jobs.plan import human_bytes

    data_root = os.path.abspath(args.data_root)
    if not os.path.isdir(data_root):
        raise _no_folder(data_root)
    report = convert_entries(data_root, args.storage)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _say(f"{data_root}: {report['converted']} entries converted to {args.storage}, "
              f"{human_bytes(report['bytes_saved'])} saved ({human_bytes(report['bytes_before'])} -> "
              f"{human_bytes(report['bytes_after'])}); "
              f"{report['already']} already {args.storage}, {report['invalid']} not valid (left alone), "
              f"{report['lossy_source']} fp8 (not converted), {report['failed']} failed")
        for item in report.get("failures", [])[:50]:
            _say(f"  failed {item['image']}: {item['reason']}")
    return 0 if not report["failed"] else 1


def _per_priority(counts: dict | None) -> str:
    """`{'on_demand': 2, 'bulk': 5}` as `2 on demand, 5 bulk`."""
    return ", ".join(f"{n} {p.replace('_', ' ')}" for p, n in (counts or {}).items()) or "0"


def status(args: argparse.Namespace) -> int:
    from vggt_cache.service.progress import duration

    with _client(args) as service:
        body = service.status()
    if args.json:
        _say_json(body)
        return 0
    svc, model, eng = body["service"], body.get("model"), body.get("engine")
    _say(f"service  {args.server}  state={svc['state']}  uptime {duration(svc['uptime_s'])}")
    if svc.get("error"):
        _say(f"error    {svc['error']}")
    for warning in svc.get("warnings") or []:
        _say(f"warning  {warning}")
    if model:
        _say(f"model    {model['source']}  {model['fingerprint']}  on {', '.join(model['devices'])}")
    spec = body.get("spec")
    if spec:
        _say(f"spec     {body.get('preset') or 'custom'} ({spec['attention']} attention, {spec['preprocess']} "
              f"{spec['size']} px, align {spec['align']}, {spec['dtype']}, reference frame "
              f"{spec.get('reference_frame', 'first')})  digest {spec['digest']}")
    if eng:
        _say(f"engine   queued {_per_priority(eng.get('queued'))}; {eng.get('images_per_s', 0):g} images/s "
              f"over the last {eng.get('window_s', 0):g} s")
        lookups = eng.get("on_demand_lookups")
        if lookups:
            _say("requests " + ", ".join(f"{k} {v}" for k, v in lookups.items()) + " (on-demand units)")
    for job in body.get("jobs", []):
        eta = f"  eta {duration(job['eta_s'])}" if job.get("eta_s") else ""
        _say(f"job {job['job_id']}  {job['state']:9s} {job['progress']*100:5.1f}%  "
              f"{job['computed']} computed {job['skipped']} skipped {job['failed']} failed  {job['data_root']}{eta}")
        if job.get("error"):
            _say(f"    error: {job['error']}")
    return 0


def demo(args: argparse.Namespace) -> int:
    from vggt_cache.service.demo import run_demo

    return run_demo(keep=args.keep, port=args.port)
