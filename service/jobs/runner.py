"""The job runner: takes planned jobs in order, feeds their units to the engine at bulk priority, records results."""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from functools import partial
from typing import TypeVar

from vggt_cache.client.cachefile import is_temp_file
from vggt_cache.client.manifest import MAX_FAILURES, is_manifest_temp_file
from vggt_cache.client.safeopen import open_folder
from vggt_cache.client.spec import FeatureSpec
from vggt_cache.client.text import error_text
from vggt_cache.client.wire import EntryStatus
from vggt_cache.service.engine import Engine, EngineStopped, Priority, UnitResult, Withdrawn
from vggt_cache.service.jobs.manifest import JobReport, write_job_manifest
from vggt_cache.service.jobs.options import JobLimits, JobOptions
from vggt_cache.service.jobs.plan import Plan
from vggt_cache.service.jobs.planner import PIECE_SAMPLES, Planner
from vggt_cache.service.jobs.planning import known_results, plan_work
from vggt_cache.service.jobs.recorder import Recorder
from vggt_cache.service.jobs.records import JobRecord, TargetResult
from vggt_cache.service.jobs.store import JobStore
from vggt_cache.service.jobs.view import TERMINAL, JobState, JobView, Rate, job_view
from vggt_cache.service.paths import AllowedRoots, printable
from vggt_cache.service.sources import shard
from vggt_cache.service.units import Unit

T = TypeVar("T")

log = logging.getLogger("vggt_cache")

VIEW_FAILURES = 100  # failures a job view lists
POISON_ATTEMPTS = 2  # a unit on a device at this many deaths of the service is failed, not resumed again


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
        yield order[start : start + chunk_units], None if lane_of is None else lane_of[start : start + chunk_units]


def target_results(idx: int, unit: Unit, fut: Future) -> list[TargetResult]:
    """The result of every target of a finished unit, as the store records them."""
    exc = fut.exception()
    if exc is not None:
        return [TargetResult(idx, EntryStatus.FAILED, error_text(exc), t) for t in unit.targets]
    result: UnitResult = fut.result()
    return [TargetResult(idx, EntryStatus(e.status), e.error, e.image, e.write) for e in result.entries]


class JobManager:
    """One runner thread takes jobs in order; state lives in SQLite so a restarted service resumes."""

    def __init__(
        self,
        store: JobStore,
        engine: Engine,
        spec: FeatureSpec,
        allowed: AllowedRoots,
        model_info: dict,
        rank: int = 0,
        world_size: int = 1,
        started_at: float | None = None,
        limits: JobLimits = JobLimits(),
    ) -> None:
        """`started_at`: when this process started (before its model load); temporary files older than it
        are orphans of a killed run, a younger one may be a peer's write in flight."""
        self.store = store
        self.engine = engine
        self.spec = spec
        self.allowed = allowed
        self.model_info = model_info
        self.rank, self.world_size = rank, world_size
        # The engine's image limit is the one that fails an image: a plan counts by it.
        self.limits = dataclasses.replace(limits, max_image_bytes=engine.max_image_bytes)
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._stopping = threading.Event()
        self._rates: dict[str, Rate] = {}
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
                    self.store.finish(job_id, JobState.FAILED, error=error_text(exc))
                except Exception:  # already terminal, or the state dir itself is failing
                    log.exception("Cannot record the failure of job %s", job_id)
            try:
                self.prune()
            except Exception:  # the state dir failing: the next job says so again
                log.exception("Cannot prune old jobs")

    def prune(self) -> int:
        """Drop ended jobs past the retention (count or age) from the store; returns how many."""
        retention = self.limits.retention
        pruned = self.store.prune(retention.keep, retention.days * 86400.0)
        if pruned:
            log.info(
                "Pruned %d ended job(s) past the retention (%d jobs, %g days)", pruned, retention.keep, retention.days
            )
        return pruned

    def submit(self, data_root: str, options: JobOptions = JobOptions()) -> JobView:
        """Queue a job (or return the active one over the same root and spec)."""
        options.contain(data_root, self.allowed)
        rec = self.store.create(data_root, self.spec.digest, self.spec.canonical_json(), options)
        if self._thread is not None:
            self._enqueue(rec.job_id)
        return self._view(rec)

    def cancel(self, job_id: str) -> JobView | None:
        rec = self.store.get(job_id)
        if rec is None:
            return None
        self.store.cancel(job_id)
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
        failures = None
        if rec.failed and with_failures:
            failures = [{"image": img, "reason": why} for img, why in self.store.failures(rec.job_id, VIEW_FAILURES)]
        return job_view(rec, self._rates.get(rec.job_id), failures)

    # -- the work -------------------------------------------------------------------------------
    def run(self, job_id: str) -> JobView | None:
        """Run a job to its end (or to a shutdown, which leaves it to resume); the runner thread calls it."""
        rec = self.store.get(job_id)
        if rec is None or rec.state in TERMINAL:
            return self.view(job_id)
        t_start = time.time()
        interrupted = rec.state is JobState.RUNNING  # a process running it died (or was killed) mid-job
        rec = self.store.start(job_id)
        if not rec.planned and self.world_size > 1:  # a rank's share is a stretch of the whole plan
            rec = self._plan(rec)
            if rec.state is JobState.FAILED:
                return self._view(rec)
        self._rates[job_id] = Rate(time.monotonic(), rec.computed)
        options = rec.options
        self._fail_poison(job_id)
        pending = self.store.pending_units(job_id)  # recorded before: the whole plan, or a plan's first pieces'
        # A manifest write killed by another run (of any service or CLI) over this root leaves its temporary file.
        self._remove_orphaned_temp_files(job_id, [rec.data_root], is_manifest_temp_file)
        if interrupted:
            self._remove_orphaned_temp_files(
                job_id, sorted({os.path.dirname(t) for _, u in pending for t in u.targets}), is_temp_file
            )
        if rec.planned:
            log.info("Job %s: %d units to do (%d entries already done)", job_id, len(pending), rec.done)
        else:
            log.info(
                "Job %s: planning %s %d samples at a time while computing (%d units recorded to do, %d samples "
                "planned before)",
                job_id,
                printable(rec.data_root),
                PIECE_SAMPLES,
                len(pending),
                rec.planned_samples,
            )

        results: queue.Queue[tuple[int, Unit, Future]] = queue.Queue()

        def landed(idx: int, unit: Unit, fut: Future) -> None:
            results.put((idx, unit, fut))

        submitted = 0

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

        def started(units: list[Unit], step: int) -> None:  # on a device thread, before and after the forward
            idxs = [idx for unit in units for idx in idxs_of.get(unit, ())]
            with self._lock:
                (on_device.update if step > 0 else on_device.difference_update)(idxs)
            self.store.start_units(job_id, idxs, step)

        with self._lock:
            in_engine = self._submitted[job_id] = []
            on_device = self._on_device[job_id] = set()
        # Results are recorded as they land, on a thread of their own: the runner blocks in `submit` while
        # the bulk backlog is full, and the job's counts must move meanwhile (the status page's row).
        recorder = Recorder(record, self.store.release)
        recorder.start(f"job-recorder-{job_id}")
        stopped = False  # the engine refused a unit: it stopped (a shutdown)

        def halted() -> bool:
            return stopped or self._stopping.is_set() or self.store.cancel_requested(job_id)

        # A streamed plan's pieces as they are recorded (what was recorded before first), else the whole plan's.
        planner = None if rec.planned else Planner(self.store, self.spec, self.allowed, self.limits, rec)
        batches = [pending] if planner is None else planner.batches(pending, halted)
        chunks = (c for batch in batches for c in lane_chunks(batch, self.engine.lanes, self.chunk_units))
        failure: Exception | None = None  # the plan's, met mid-way: raised once what went in has landed
        try:
            try:
                for chunk, lanes in chunks:
                    if halted():
                        break
                    for idx, unit in chunk:
                        idxs_of.setdefault(unit, []).append(idx)
                    # A unit at a time: `submit` blocks while the backlog is full, and each future must have its
                    # callback (to the recorder) as soon as it is admitted, not once the whole chunk is.
                    for i, (idx, unit) in enumerate(chunk):
                        try:
                            fut = self.engine.submit(
                                [unit],
                                Priority.BULK,
                                skip_existing=options.skip_existing,
                                verify=options.verify,
                                return_features=False,
                                lanes=None if lanes is None else lanes[i : i + 1],
                                overwrite=options.overwrite,
                                on_start=started,
                            )[0]
                        except EngineStopped:  # a shutdown while this chunk went in: the rest stays pending
                            stopped = True
                            break
                        with self._lock:
                            in_engine.append(fut)
                        fut.add_done_callback(partial(landed, idx, unit))
                        submitted += 1
            except Exception as exc:
                failure = exc
            if planner is not None:
                planner.halt()  # done with, or halted: what is still planned would not be run now
            refused = planner is not None and planner.refused is not None
            if failure is not None or refused or self.store.cancel_requested(job_id):
                self._withdraw(job_id)  # what was admitted while the cancel (or the verdict) came in
            recorder.finish(submitted)
        finally:
            recorder.stop()
            if planner is not None:
                planner.stop()
            with self._lock:
                del self._submitted[job_id]
                del self._on_device[job_id]

        if failure is not None:
            raise failure
        if planner is not None and planner.refused is not None:
            return self._view(self._refuse(job_id, planner.refused))
        rec = self.store.get(job_id)
        assert rec is not None  # a running job is never pruned
        left = not rec.planned or self.store.pending_units(job_id, end=None)
        if self.store.cancel_requested(job_id):
            state = JobState.CANCELLED
        elif (stopped or self._stopping.is_set() or self._no_device_left()) and left:
            why = "every device was lost" if self._no_device_left() else "shutdown"
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
        rec = self.store.finish(job_id, state)
        log.info(
            "Job %s %s: %d computed, %d skipped, %d failed of %d",
            job_id,
            rec.state.value,
            rec.computed,
            rec.skipped,
            rec.failed,
            rec.total,
        )
        return self._view(rec)

    def _no_device_left(self) -> bool:
        """Every device given up (fatal CUDA errors): what stayed pending waits for a restart, not a verdict."""
        lost = self.engine.lost_devices
        return bool(lost) and len(lost) == len(self.engine.devices)

    def _fail_poison(self, job_id: str) -> None:
        """Fail the units that were on a device each time the service died: resumed, they would jam it again."""
        why = (
            f"poison: the service died {POISON_ATTEMPTS} times while this sample was running; not retried "
            "(check its frames, or precompute it alone)"
        )
        poison = self.store.fail_tried(job_id, POISON_ATTEMPTS, why)
        if not poison:
            return
        log.error(
            "Job %s: %d unit(s) failed as poison, the service died %d times while they ran: %s",
            job_id,
            len(poison),
            POISON_ATTEMPTS,
            printable(poison[0][1].targets[-1]),
        )

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
                with open_folder(folder, self.allowed.real) as dfd:
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

    def _plan(self, rec: JobRecord) -> JobRecord:
        """Scan the data root once and record the plan; the job fails if its new entries would not fit."""
        work = plan_work(rec.data_root, self.spec, self.allowed, rec.options, self.limits, self.rank, self.world_size)
        plan = work.plan
        log.info("Job %s plan: %s", rec.job_id, plan.summary())
        if not plan.fits and not rec.options.force:
            return self._refuse(rec.job_id, plan)
        # Refused units fail untouched; units found valid are skipped here, not read again by the engine.
        known = known_results(work.units, work.refused, work.valid)
        # Every rank scans the whole root; its problems are recorded once, by rank 0.
        rec = self.store.record_plan(
            rec.job_id, plan.to_dict(), work.units, work.scan.problems if self.rank == 0 else [], known
        )
        log.info(
            "Job %s planned: %d units from %d samples (%s; %d refused, %d already valid, %d malformed samples)",
            rec.job_id,
            len(work.units),
            work.scan.num_samples,
            work.scan.source_kind,
            len(work.refused),
            len(work.valid),
            len(work.scan.problems),
        )
        return rec

    def _refuse(self, job_id: str, plan: Plan) -> JobRecord:
        """The job fails on its plan: its new entries would not fit (those computed before stay)."""
        log.error("Job %s refused, its entries would not fit: %s", job_id, plan.summary())
        return self.store.refuse(
            job_id, plan.to_dict(), f"not enough free space: {plan.summary()}; free some, or force the job (--force)"
        )

    def write_manifest(self, rec: JobRecord, seconds: float, state: JobState) -> str:
        failures = [{"image": img, "reason": why} for img, why in self.store.failures(rec.job_id, MAX_FAILURES)]
        counts = {
            "total": rec.total,
            "computed": rec.computed,
            "skipped": rec.skipped,
            "failed": rec.failed,
            "kept": rec.kept,
            "replaced": rec.replaced,
        }
        report = JobReport(rec.job_id, state, counts, rec.plan, seconds, failures, rec.options.verify)
        return write_job_manifest(
            rec.data_root, report, self.spec, self.model_info, self.allowed, self.engine.file_mode
        )
