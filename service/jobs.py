"""Bulk precompute jobs: plan a data root into units, feed them to the engine at bulk priority, record progress."""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TypeVar

from vggt_cache.client.cachefile import is_temp_file
from vggt_cache.client.manifest import is_manifest_temp_file, write_manifest
from vggt_cache.client.safeopen import open_folder
from vggt_cache.client.spec import FeatureSpec, matching_preset
from vggt_cache.client.wire import EntryStatus
from vggt_cache.service.engine import Engine, EngineStopped, Priority, UnitResult, Withdrawn
from vggt_cache.service.frametable import FrameTable
from vggt_cache.service.jobview import TERMINAL, JobState, JobView
from vggt_cache.service.paths import AllowedRoots, PathNotAllowed, printable
from vggt_cache.service.plan import Plan, plan_job
from vggt_cache.service.preprocess import MAX_IMAGE_BYTES
from vggt_cache.service.samples import DEFAULT_MAX_HISTORY, MAX_SAMPLE_BYTES, check_history
from vggt_cache.service.settings import ServiceSettings
from vggt_cache.service.sources import ScanResult, scan_data_root, shard
from vggt_cache.service.store import JobRecord, JobStore
from vggt_cache.service.units import Unit

T = TypeVar("T")

log = logging.getLogger("vggt_cache")

_DEFAULTS = ServiceSettings()  # the one place job settings have their defaults
MANIFEST_FAILURES = 1000
VIEW_FAILURES = 100  # failures a job view lists
POISON_ATTEMPTS = 2  # a unit on a device at this many deaths of the service is failed, not resumed again


@dataclass(frozen=True)
class Retention:
    """How many ended jobs (with their units and failures) the store keeps, and for how long."""

    keep: int = 1000
    days: float = 30.0


@dataclass
class _Rate:
    """Entries computed since this process started (or resumed) the job: what rate and ETA come from."""

    t0: float
    computed0: int


def lane_chunks(pending: list[T], lanes: int, chunk_units: int) -> Iterator[tuple[list[T], list[int] | None]]:
    """Submission order, in chunks of `chunk_units`, with each unit's lane (None: one lane).

    With several lanes, `pending` is cut into one contiguous stretch per lane, taken a unit of
    each in turn: each device works through one stretch of the plan, whose samples share
    frames, as a torchrun rank would (`shard`), and the bulk backlog holds every lane's next units.
    """
    order, lane_of = pending, None
    if lanes > 1:
        stretches = [shard(pending, lane, lanes) for lane in range(lanes)]
        order, lane_of = [], []
        for i in range(max(map(len, stretches))):
            for lane, stretch in enumerate(stretches):
                if i < len(stretch):
                    order.append(stretch[i])
                    lane_of.append(lane)
    for start in range(0, len(order), chunk_units):
        yield order[start:start + chunk_units], None if lane_of is None else lane_of[start:start + chunk_units]


def target_results(idx: int, unit: Unit, fut: Future) -> list[tuple[int, EntryStatus, str | None, str, str | None]]:
    """(idx, outcome, reason, image, write) for every target of a finished unit, as the store records them."""
    exc = fut.exception()
    if exc is not None:
        return [(idx, EntryStatus.FAILED, f"{type(exc).__name__}: {exc}", t, None) for t in unit.targets]
    result: UnitResult = fut.result()
    return [(idx, EntryStatus(e.status), e.error, e.image, e.write) for e in result.entries]


class JobManager:
    """One runner thread takes jobs in order; state lives in SQLite so a restarted service resumes."""

    def __init__(self, store: JobStore, engine: Engine, spec: FeatureSpec, roots: AllowedRoots,
                 model_info: dict, rank: int = 0, world_size: int = 1, started_at: float | None = None,
                 max_frames_per_sample: int = _DEFAULTS.max_frames_per_sample,
                 retention: Retention = Retention(), max_sample_bytes: int = MAX_SAMPLE_BYTES) -> None:
        """`started_at`: when this process started (before its model load); temporary files older than it
        are orphans of a killed run, a younger one may be a peer's write in flight.
        `max_frames_per_sample`: a unit of more frames is failed at planning, with the reason.
        `retention`: ended jobs kept, pruned at start and after each job. `max_sample_bytes`: the most a
        sample of a sample file may take (a larger one is a problem of the plan)."""
        self.store = store
        self.engine = engine
        self.spec = spec
        self.roots = roots
        self.model_info = model_info
        self.rank, self.world_size = rank, world_size
        self.max_frames_per_sample = max_frames_per_sample
        self.retention = retention
        self.max_sample_bytes = max_sample_bytes
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._stopping = threading.Event()
        self._rates: dict[str, _Rate] = {}
        self._enqueued: set[str] = set()
        self._lock = threading.Lock()  # _enqueued and _submitted
        self._submitted: dict[str, list[Future]] = {}  # the running job's units in the engine
        self._on_device: dict[str, set[int]] = {}  # per running job: units in a forward now
        self._thread: threading.Thread | None = None
        self._started_at = time.time() if started_at is None else started_at
        # Bulk units submitted per engine call: enough to fill a few batches, small enough to cancel promptly.
        self.chunk_units = max(8, 2 * engine.max_batch_frames)

    # -- service side -------------------------------------------------------------------------
    def start(self) -> None:
        self.prune()
        for rec in self.store.unfinished_jobs():
            log.info("Resuming job %s over %s (%d/%d done)", rec.job_id, rec.data_root, rec.done, rec.total)
            self._enqueue(rec.job_id)
        self._thread = threading.Thread(target=self._loop, name="job-runner", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        self._stopping.set()
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    def abandon(self) -> None:
        """A clean shutdown left batches on a device past its grace: their units' attempts are taken back,
        so only deaths of the service (a kill, a crash) count towards poison."""
        with self._lock:
            running = {job_id: sorted(idxs) for job_id, idxs in self._on_device.items() if idxs}
        for job_id, idxs in running.items():
            self.store.start_units(job_id, idxs, step=-1)

    def _enqueue(self, job_id: str) -> None:
        with self._lock:
            if job_id in self._enqueued:
                return
            self._enqueued.add(job_id)
        self._queue.put(job_id)

    def _loop(self) -> None:
        while not self._stopping.is_set():
            job_id = self._queue.get()
            if job_id is None:
                return
            try:
                self.run(job_id)
            except Exception as exc:  # a broken job must not take the runner down with it
                log.exception("Job %s failed", job_id)
                try:
                    self.store.set_state(job_id, JobState.FAILED, error=f"{type(exc).__name__}: {exc}")
                except Exception:  # already terminal, or the state dir itself is failing
                    log.exception("Cannot record the failure of job %s", job_id)
            try:
                self.prune()
            except Exception:  # the state dir failing: the next job says so again
                log.exception("Cannot prune old jobs")

    def prune(self) -> int:
        """Drop ended jobs past the retention (count or age) from the store; returns how many."""
        pruned = self.store.prune(self.retention.keep, self.retention.days * 86400.0)
        if pruned:
            log.info("Pruned %d ended job(s) past the retention (%d jobs, %g days)", pruned,
                     self.retention.keep, self.retention.days)
        return pruned

    def submit(self, data_root: str, skip_existing: bool = True, verify: bool = False,
               data_path: str | None = None, max_history_images: int = DEFAULT_MAX_HISTORY,
               force: bool = False, data_files: list[str] | None = None, overwrite: bool = False) -> JobView:
        """Queue a job (or return the active one over the same root and spec).

        `force`: start even when the plan says the new entries will not fit on the file system.
        `overwrite`: replace valid entries computed with another clip (else kept, and counted `kept`).
        `data_files`: the sample files to read (relative to the data root unless absolute), not every one.
        """
        check_history(max_history_images)
        options = {"skip_existing": skip_existing, "verify": verify, "data_path": data_path,
                   "max_history_images": max_history_images, "force": force, "data_files": data_files,
                   "overwrite": overwrite}
        check_options(data_root, options, self.roots)
        rec = self.store.create_job(data_root, self.spec.digest, self.spec.canonical_json(), options)
        if self._thread is not None:
            self._enqueue(rec.job_id)
        return self._view(rec)

    def cancel(self, job_id: str) -> JobView | None:
        rec = self.store.get(job_id)
        if rec is None:
            return None
        self.store.request_cancel(job_id)
        self._withdraw(job_id)
        return self.view(job_id)

    def _withdraw(self, job_id: str) -> None:
        """Take a cancelled job's queued units back from the engine: only what is on a device finishes."""
        with self._lock:
            futures = list(self._submitted.get(job_id, ()))
        taken = self.engine.withdraw(futures) if futures else 0
        if taken:
            log.info("Job %s: %d queued unit(s) taken back (cancelled); they stay pending", job_id, taken)

    def view(self, job_id: str) -> JobView | None:
        rec = self.store.get(job_id)
        return None if rec is None else self._view(rec)

    def list_views(self, limit: int = 50) -> list[JobView]:
        """The newest jobs without their failures (what `/status` summarises)."""
        return [self._view(rec, with_failures=False) for rec in self.store.list_jobs(limit=limit)]

    def _view(self, rec: JobRecord, with_failures: bool = True) -> JobView:
        done = rec.done
        progress = round(done / rec.total, 4) if rec.total else (1.0 if rec.state is JobState.FINISHED else 0.0)
        rate = self._rates.get(rec.job_id)
        rate_per_s = eta_s = None
        # Entries computed, not skipped: a skipped entry costs a metadata read, so it would make the rate a lie.
        if rate is not None and rec.state is JobState.RUNNING:
            elapsed = time.monotonic() - rate.t0
            per_s = (rec.computed - rate.computed0) / elapsed if elapsed > 0 else 0.0
            rate_per_s = round(per_s, 2)
            if per_s > 0:
                eta_s = round(_left_to_compute(rec) / per_s, 1)
        elif rec.finished_at and rec.started_at and rec.finished_at > rec.started_at:
            # An ended job shows its average over its whole run (restarts included).
            rate_per_s = round(rec.computed / (rec.finished_at - rec.started_at), 2)
        failures = None
        if rec.failed and with_failures:
            failures = [{"image": img, "reason": why} for img, why in self.store.failures(rec.job_id, VIEW_FAILURES)]
        return JobView(rec.job_id, rec.data_root, rec.state, rec.total, rec.computed, rec.skipped, rec.failed,
                       progress, rate_per_s, eta_s, rec.spec_digest, rec.options, rec.planned, rec.cancel_requested,
                       rec.created_at, rec.started_at, rec.finished_at, rec.error, rec.plan, failures,
                       rec.kept, rec.replaced)

    # -- the work -------------------------------------------------------------------------------
    def run(self, job_id: str) -> JobView | None:
        """Run a job to its end (or to a shutdown, which leaves it to resume); the runner thread calls it."""
        rec = self.store.get(job_id)
        if rec is None or rec.state in TERMINAL:
            return self.view(job_id)
        t_start = time.time()
        interrupted = rec.state is JobState.RUNNING  # a process running it died (or was killed) mid-job
        self.store.set_state(job_id, JobState.RUNNING)
        if not rec.planned and not self._plan(rec):
            return self.view(job_id)
        rec = self.store.get(job_id)
        self._rates[job_id] = _Rate(time.monotonic(), rec.computed)
        options = rec.options
        self._fail_poison(job_id)
        pending = self.store.pending_units(job_id)
        # A manifest write killed by another run (of any service or CLI) over this root leaves its temporary file.
        self._remove_orphaned_temp_files(job_id, [rec.data_root], is_manifest_temp_file)
        if interrupted:
            self._remove_orphaned_temp_files(job_id, sorted({os.path.dirname(t) for _, u in pending
                                                             for t in u.targets}), is_temp_file)
        log.info("Job %s: %d units to do (%d entries already done)", job_id, len(pending), rec.done)

        results: queue.Queue[tuple[int, Unit, Future]] = queue.Queue()
        submitted = 0
        recorded = 0

        def record(block: bool) -> int:
            """Store what has finished; returns how many units were taken off the results queue."""
            batch, taken = [], 0
            while True:
                try:
                    idx, unit, fut = results.get(block=block and taken == 0, timeout=1.0)
                except queue.Empty:
                    break
                taken += 1
                # Stopped: it stays pending for the next start; withdrawn (cancelled): pending, as the rest.
                if not isinstance(fut.exception(), (EngineStopped, Withdrawn)):
                    batch.extend(target_results(idx, unit, fut))
            if batch:
                self.store.record_results(job_id, batch)
            return taken

        idxs_of: dict[Unit, list[int]] = {}
        for idx, unit in pending:
            idxs_of.setdefault(unit, []).append(idx)

        def started(units: list[Unit], step: int) -> None:  # on a device thread, before and after the forward
            idxs = [idx for unit in units for idx in idxs_of.get(unit, ())]
            with self._lock:
                (on_device.update if step > 0 else on_device.difference_update)(idxs)
            self.store.start_units(job_id, idxs, step)

        with self._lock:
            in_engine = self._submitted[job_id] = []
            on_device = self._on_device[job_id] = set()
        try:
            for chunk, lanes in lane_chunks(pending, self.engine.lanes, self.chunk_units):
                if self._stopping.is_set() or self.store.cancel_requested(job_id):
                    break
                futures = self.engine.submit([u for _, u in chunk], Priority.BULK,
                                             skip_existing=options.get("skip_existing", True),
                                             verify=options.get("verify", False), return_features=False,
                                             lanes=lanes, overwrite=options.get("overwrite", False),
                                             on_start=started)
                with self._lock:
                    in_engine += futures
                for (idx, unit), fut in zip(chunk, futures):
                    fut.add_done_callback(lambda f, idx=idx, unit=unit: results.put((idx, unit, f)))
                submitted += len(chunk)
                recorded += record(block=False)
            if self.store.cancel_requested(job_id):
                self._withdraw(job_id)  # what was admitted while the cancel came in
            while recorded < submitted:
                recorded += record(block=True)
        finally:
            with self._lock:
                del self._submitted[job_id]
                del self._on_device[job_id]

        rec = self.store.get(job_id)
        if self.store.cancel_requested(job_id):
            state = JobState.CANCELLED
        elif (self._stopping.is_set() or self._no_device_left()) and self.store.pending_units(job_id):
            why = "shutdown" if self._stopping.is_set() else "every device was lost"
            log.info("Job %s paused at %d/%d (%s); it resumes on the next start", job_id, rec.done, rec.total, why)
            return self._view(rec)
        else:
            state = JobState.FINISHED
        # The manifest before the state: whoever sees the job end finds its manifest written. Under
        # torchrun each rank has a share of the job; rank 0 writes one manifest for all (the CLI).
        if self.world_size == 1:
            try:
                self.write_manifest(rec, time.time() - t_start, state)
            except OSError as exc:  # a full disk or a vanished data root; the job's record is in SQLite
                log.warning("Job %s: cannot write the manifest in %s: %s", job_id, rec.data_root, exc)
        rec = self.store.set_state(job_id, state)
        log.info("Job %s %s: %d computed, %d skipped, %d failed of %d", job_id, rec.state.value,
                 rec.computed, rec.skipped, rec.failed, rec.total)
        return self._view(rec)

    def _no_device_left(self) -> bool:
        """Every device given up (fatal CUDA errors): what stayed pending waits for a restart, not a verdict."""
        lost = self.engine.lost_devices
        return bool(lost) and len(lost) == len(self.engine.devices)

    def _fail_poison(self, job_id: str) -> None:
        """Fail the units that were on a device each time the service died: resumed, they would jam it again."""
        poison = self.store.tried_units(job_id, POISON_ATTEMPTS)
        if not poison:
            return
        why = (f"poison: the service died {POISON_ATTEMPTS} times while this sample was running; not retried "
               "(check its frames, or precompute it alone)")
        self.store.record_results(job_id, [(idx, EntryStatus.FAILED, why, t) for idx, unit in poison
                                           for t in unit.targets])
        log.error("Job %s: %d unit(s) failed as poison, the service died %d times while they ran: %s", job_id,
                  len(poison), POISON_ATTEMPTS, printable(poison[0][1].targets[-1]))

    def _remove_orphaned_temp_files(self, job_id: str, folders: list[str], ours: Callable[[str], bool]) -> None:
        """Delete the temporary files (the names `ours` recognises: an entry's, a manifest's) that a killed
        process left in `folders`.

        Only files older than this process: a write in flight elsewhere (another
        service on shared storage) is younger than a model load and stays. Each folder is
        listed and cleaned through one descriptor checked inside the roots, so a folder
        swapped for a symlink meanwhile is left alone.
        """
        removed = 0
        for folder in folders:
            try:
                with open_folder(folder, self.roots.real) as dfd:
                    for entry in list(os.scandir(dfd)):
                        if not ours(entry.name):
                            continue
                        try:
                            if entry.stat(follow_symlinks=False).st_mtime < self._started_at:
                                os.unlink(entry.name, dir_fd=dfd)
                                removed += 1
                        except OSError:
                            continue  # gone already, or not ours to remove
            except OSError:  # no such folder, or outside the roots (OutsideRoots): left alone
                continue
        if removed:
            log.info("Job %s: removed %d temporary file(s) left by an interrupted run", job_id, removed)

    def _plan(self, rec: JobRecord) -> bool:
        """Scan the data root once; False if the job was refused (its new entries would not fit)."""
        work = plan_work(rec.data_root, self.spec, self.roots, rec.options, self.rank, self.world_size,
                         self.engine.max_image_bytes, self.max_frames_per_sample, self.max_sample_bytes)
        plan = work.plan
        self.store.record_plan(rec.job_id, plan.to_dict())
        log.info("Job %s plan: %s", rec.job_id, plan.summary())
        if not plan.fits and not rec.options.get("force"):
            self.store.set_state(rec.job_id, JobState.FAILED, error=f"not enough free space: {plan.summary()}; "
                                                              "free some, or force the job (--force)")
            log.error("Job %s refused, its entries would not fit: %s", rec.job_id, plan.summary())
            return False
        # Every rank scans the whole root; its problems are recorded once, by rank 0.
        self.store.set_plan(rec.job_id, work.units, work.scan.problems if self.rank == 0 else [])
        if work.refused:
            self.store.record_results(rec.job_id, [(i, EntryStatus.FAILED, why, t) for i, why in work.refused.items()
                                                   for t in work.units[i].targets])
        log.info("Job %s planned: %d units from %d samples (%s; %d refused, %d malformed samples)", rec.job_id,
                 len(work.units), work.scan.num_samples, work.scan.source_kind, len(work.refused),
                 len(work.scan.problems))
        return True

    def write_manifest(self, rec: JobRecord, seconds: float, state: JobState) -> str:
        failures = [{"image": img, "reason": why} for img, why in self.store.failures(rec.job_id, MANIFEST_FAILURES)]
        counts = {"total": rec.total, "computed": rec.computed, "skipped": rec.skipped, "failed": rec.failed,
                  "kept": rec.kept, "replaced": rec.replaced}
        return write_manifest(rec.data_root, manifest_record(rec.job_id, state, counts, self.spec, rec.plan,
                                                             self.model_info, seconds, failures,
                                                             verified=bool(rec.options.get("verify"))),
                              self.roots.real, self.engine.file_mode)


def _left_to_compute(rec: JobRecord) -> int:
    """Entries still to compute: the plan's count of those without a valid entry, less those computed."""
    left = rec.total - rec.done
    if rec.plan and "to_compute" in rec.plan:
        left = min(left, max(0, rec.plan["to_compute"] - rec.computed))
    return left


def manifest_record(job_id: str, state: JobState, counts: dict, spec: FeatureSpec, plan: dict | None,
                    model_info: dict, seconds: float, failures: list[dict], ranks: int = 1,
                    verified: bool = False) -> dict:
    """What `vggt_cache_manifest.json` says of a job (one process's, or torchrun's ranks merged).

    `verified`: every entry computed was read back and validated (`--verify`); `verified_entries` counts them.
    """
    return {"job_id": job_id, "state": state.value, "ranks": ranks, **counts, "verified": verified,
            "verified_entries": counts["computed"] if verified else 0, "spec": spec.to_dict(),
            "spec_digest": spec.digest, "preset": matching_preset(spec), "plan": plan, "model": model_info,
            "seconds": round(seconds, 2), "failures": failures}


def check_options(data_root: str, options: dict, roots: AllowedRoots) -> None:
    """The folders a job's options name (its sample files, its `data_path`) are inside the roots
    (PathNotAllowed): an absolute `data_path` must not take the samples' images out of them."""
    named = [*(options.get("data_files") or ())]
    if options.get("data_path") is not None:
        named.append(options["data_path"])
    for name in named:
        roots.contain(os.path.normpath(os.path.join(data_root, name)), writes_sibling=False)


@dataclass
class Work:
    """A data root planned into units: this rank's share, those it may not touch, and the plan."""

    scan: ScanResult
    units: list[Unit]
    refused: dict[int, str]  # unit index -> why (a frame outside the roots, too many frames): failed before any decode
    plan: Plan


def plan_work(data_root: str, spec: FeatureSpec, roots: AllowedRoots, options: dict, rank: int = 0,
              world_size: int = 1, max_image_bytes: int = MAX_IMAGE_BYTES,
              max_frames: int = _DEFAULTS.max_frames_per_sample, max_sample_bytes: int = MAX_SAMPLE_BYTES) -> Work:
    """Scan `data_root` and plan it (a job's first step, and all that a dry run does); images over
    `max_image_bytes` are counted unreadable, as the engine of that limit will fail them. A unit of
    more than `max_frames` frames is refused: one sample must not hold the device for everyone; a
    sample over `max_sample_bytes` is a problem."""
    check_options(data_root, options, roots)
    files = options.get("data_files")
    table = FrameTable(roots)  # each frame looked at once, however many samples name it
    scan = scan_data_root(data_root, spec.attention, options.get("data_path"),
                          options.get("max_history_images", DEFAULT_MAX_HISTORY), files, roots, max_sample_bytes,
                          table)
    units = shard(scan.units, rank, world_size)
    refused: dict[int, str] = {}
    for idx, unit in enumerate(units):
        if len(unit.frames) > max_frames:
            refused[idx] = (f"a sample of {len(unit.frames)} frames; the limit is {max_frames} per sample "
                            "(--max-frames-per-sample)")
            continue
        try:
            for frame in unit.frames:
                table.contain(frame)
        except (PathNotAllowed, ValueError) as exc:
            refused[idx] = str(exc)
    allowed = [u for i, u in enumerate(units) if i not in refused]
    plan = plan_job(scan, spec, data_root, options.get("skip_existing", True), allowed, len(refused), world_size,
                    roots.real, max_image_bytes, table)
    return Work(scan, units, refused, plan)
