"""A job planned while it runs: a thread plans the data root a piece at a time (`plan_pieces`) and records
each piece; the runner computes the pieces recorded while the next is planned, so the first entries do not
wait for the whole plan, and a job resumed while planning goes on from the last piece recorded."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator

from vggt_cache.client.spec import FeatureSpec
from vggt_cache.service.jobs.options import JobLimits
from vggt_cache.service.jobs.plan import Plan, resumed
from vggt_cache.service.jobs.planning import PIECE_SAMPLES, Piece, known_results, plan_pieces
from vggt_cache.service.jobs.records import JobRecord
from vggt_cache.service.jobs.store import JobStore
from vggt_cache.service.paths import AllowedRoots
from vggt_cache.service.units import Unit

__all__ = ["PIECE_SAMPLES", "Planner"]

log = logging.getLogger("vggt_cache")


class Planner:
    """The plan of one running job, made on a thread of its own while the runner computes it."""

    def __init__(
        self, store: JobStore, spec: FeatureSpec, allowed: AllowedRoots, limits: JobLimits, rec: JobRecord
    ) -> None:
        self.store, self.spec, self.allowed, self.limits, self.rec = store, spec, allowed, limits, rec
        self.refused: Plan | None = None  # the plan that showed the new entries would not fit
        # What the runner is told: units recorded (their indices), the plan refused, the plan's error, the end.
        self._events: queue.Queue[range | Plan | Exception | None] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"job-planner-{rec.job_id}", daemon=True)
        self._thread.start()

    def batches(self, pending: list[tuple[int, Unit]], halted: Callable[[], bool]) -> Iterator[list[tuple[int, Unit]]]:
        """`pending` (the units recorded before), then each piece's pending units as it is recorded, until the
        plan ends, is refused (`refused`) or `halted()` (checked each second while a piece is planned)."""
        if pending:
            yield pending
        while True:
            try:
                event = self._events.get(timeout=1.0)
            except queue.Empty:
                if halted():
                    self.halt()
                    return
                continue
            if event is None:
                return
            if isinstance(event, Plan):
                self.refused = event
                return
            if isinstance(event, Exception):
                raise event
            yield self.store.pending_units(self.rec.job_id, event.start, event.stop)

    def halt(self) -> None:
        """Stop planning at the next sample read, without waiting (the job is cancelled or stopping)."""
        self._stop.set()

    def stop(self) -> None:
        """Stop planning at the next sample read (or once the walk or the piece being checked ends); the pieces
        recorded stay, and a resumed job goes on after them."""
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        rec = self.rec
        valid = 0
        try:
            pieces = plan_pieces(
                rec.data_root,
                self.spec,
                self.allowed,
                rec.options,
                self.limits,
                rec.planned_samples,
                PIECE_SAMPLES,
                self._stop,
                self.store.recorded_units(rec.job_id) if rec.planned_samples else frozenset(),
            )
            for piece in pieces:
                if self._stop.is_set():
                    break
                if not piece.plan.fits and not rec.options.force:
                    self._events.put(piece.plan)
                    return
                first = self._record(piece)
                valid += len(piece.valid)
                if piece.units:
                    self._events.put(range(first, first + len(piece.units)))
                if piece.last:
                    self._log_plan(piece, valid)
        except Exception as exc:  # the runner fails the job with it
            self._events.put(exc)
            return
        finally:
            self.store.release()
        self._events.put(None)

    def _record(self, piece: Piece) -> int:
        """Record `piece` (its refused units failed, its units found valid skipped); returns its first index."""
        known = known_results(piece.units, piece.refused, piece.valid)
        plan = resumed(self.rec.plan if self.rec.planned_samples else None, piece.plan)
        return self.store.record_piece(
            self.rec.job_id, plan, piece.units, piece.problems, known, piece.samples, piece.last
        )[1]

    def _log_plan(self, piece: Piece, valid: int) -> None:
        plan, job_id = piece.plan, self.rec.job_id
        log.info("Job %s plan: %s", job_id, plan.summary())
        log.info(
            "Job %s planned: %d units from %d samples (%s; %d refused, %d already valid, %d malformed samples)",
            job_id,
            plan.units,
            piece.samples,
            plan.source["source"],
            plan.refused,
            valid,
            plan.problems,
        )
