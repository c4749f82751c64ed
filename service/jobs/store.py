"""Persistent job state: one SQLite file (WAL) under the service's state dir.

Every change is one transaction, so a process killed at any point leaves
counters that agree with the per-unit rows, and a restarted service resumes
exactly the units still pending.
"""

from __future__ import annotations

import itertools
import json
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

from vggt_cache.client.text import bounded, printable
from vggt_cache.client.wire import EntryStatus
from vggt_cache.service.errors import UnusableInput
from vggt_cache.service.jobs.options import JobOptions
from vggt_cache.service.jobs.records import JobRecord, TargetResult
from vggt_cache.service.jobs.schema import ACTIVE_STATES, JOB_COLUMNS, UnitState, create_or_upgrade
from vggt_cache.service.jobs.view import COUNTER, TERMINAL, JobState
from vggt_cache.service.units import Unit, unit_key

DB_NAME = "jobs.sqlite3"
# Failure rows kept per job (each string `bounded`): the counters count every failure, the rows
# show the first ones, so one job of bad data cannot grow the database without end.
MAX_FAILURE_ROWS = 10_000
_FEW_UNITS = 512  # fewer pending units than this look up their own paths; more load the job's path table


class JobStore:
    """Thread-safe job store: one SQLite connection per thread, writes in IMMEDIATE transactions."""

    def __init__(self, state_dir: str, busy_timeout_s: float = 30.0) -> None:
        os.makedirs(state_dir, exist_ok=True)
        self.path = os.path.join(state_dir, DB_NAME)
        self._busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._all_lock = threading.Lock()
        create_or_upgrade(self._conn())

    # -- connections -----------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            # Autocommit mode: transactions are opened explicitly, so nothing is left half-open.
            db = sqlite3.connect(self.path, timeout=self._busy_timeout_s, isolation_level=None, check_same_thread=False)
            db.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_s * 1000)}")
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")  # WAL + NORMAL: durable against process kills
            self._local.db = db
            with self._all_lock:
                self._all.append(db)
        return db

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        # IMMEDIATE takes the write lock up front: read-then-write races cannot interleave.
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def release(self) -> None:
        """Close the calling thread's connection: a thread of one job (its recorder, its planner) is done with
        the store, and a service running for weeks must not keep a connection open for each job it ran."""
        db = getattr(self._local, "db", None)
        if db is None:
            return
        with self._all_lock:
            self._all.remove(db)
        db.close()
        self._local.db = None

    def close(self) -> None:
        """Close every connection this store opened (the store is unusable afterwards)."""
        with self._all_lock:
            for db in self._all:
                db.close()
            self._all.clear()
        self._local = threading.local()

    # -- jobs ------------------------------------------------------------------------

    def _job(self, db: sqlite3.Connection, job_id: str) -> JobRecord:
        row = db.execute(f"SELECT {JOB_COLUMNS} FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        if row is None:
            raise KeyError(f"unknown job {job_id!r}")
        return JobRecord.from_row(row)

    def create(self, data_root: str, spec_digest: str, spec_json: str, options: JobOptions) -> JobRecord:
        """A new queued job, or the active (queued/running) one for the same data root and spec."""
        data_root = os.path.normpath(os.path.abspath(data_root))
        if printable(data_root) != data_root:
            raise UnusableInput(f"data_root {printable(data_root)} is not valid UTF-8; rename the folder")
        with self._write() as db:
            row = db.execute(
                f"SELECT {JOB_COLUMNS} FROM jobs WHERE data_root = ? AND spec_digest = ? AND state IN {ACTIVE_STATES}",
                (data_root, spec_digest),
            ).fetchone()
            if row is not None:
                return JobRecord.from_row(row)
            job_id = uuid.uuid4().hex
            db.execute(
                "INSERT INTO jobs (job_id, data_root, spec_digest, spec_json, options_json, state, "
                "created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    job_id,
                    data_root,
                    spec_digest,
                    spec_json,
                    json.dumps(options.to_dict(), sort_keys=True),
                    JobState.QUEUED.value,
                    time.time(),
                ),
            )
            return self._job(db, job_id)

    def get(self, job_id: str) -> JobRecord | None:
        try:
            return self._job(self._conn(), job_id)
        except KeyError:
            return None

    def list_jobs(self, limit: int = 100) -> list[JobRecord]:
        """Newest first."""
        rows = (
            self._conn()
            .execute(f"SELECT {JOB_COLUMNS} FROM jobs ORDER BY created_at DESC, rowid DESC LIMIT ?", (limit,))
            .fetchall()
        )
        return [JobRecord.from_row(r) for r in rows]

    def unfinished_jobs(self) -> list[JobRecord]:
        """Queued or running jobs, oldest first: what a restarted service resumes."""
        rows = (
            self._conn()
            .execute(f"SELECT {JOB_COLUMNS} FROM jobs WHERE state IN {ACTIVE_STATES} ORDER BY created_at, rowid")
            .fetchall()
        )
        return [JobRecord.from_row(r) for r in rows]

    def count_by_state(self) -> dict[JobState, int]:
        """Jobs per state, in one query (the metrics gauge)."""
        rows = self._conn().execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        return {JobState(state): n for state, n in rows}

    def start(self, job_id: str) -> JobRecord:
        """The job runs (again, when a process running it died); started_at is stamped once."""
        with self._write() as db:
            return self._set_state(db, job_id, JobState.RUNNING)

    def finish(self, job_id: str, state: JobState | str, error: str | None = None) -> JobRecord:
        """End a job (finished, failed with `error`, cancelled); an ended job's state is final."""
        state = _job_state(state)
        if state not in TERMINAL:
            raise ValueError(f"a job ends {'|'.join(s.value for s in TERMINAL)}, not {state.value}")
        with self._write() as db:
            return self._set_state(db, job_id, state, error)

    def _set_state(self, db: sqlite3.Connection, job_id: str, state: JobState, error: str | None = None) -> JobRecord:
        job = self._job(db, job_id)
        if not job.state.active and state != job.state:
            raise ValueError(f"job {job_id} is already {job.state.value}; cannot become {state.value}")
        now = time.time()
        db.execute(
            "UPDATE jobs SET state = ?, error = COALESCE(?, error), "
            "started_at = CASE WHEN ? THEN COALESCE(started_at, ?) ELSE started_at END, "
            "finished_at = CASE WHEN ? THEN NULL ELSE COALESCE(finished_at, ?) END WHERE job_id = ?",
            (state.value, error and bounded(error), state is JobState.RUNNING, now, state.active, now, job_id),
        )
        return self._job(db, job_id)

    def cancel(self, job_id: str) -> JobRecord:
        """Flag a job for cancellation; a queued one is cancelled at once, an ended one is left."""
        with self._write() as db:
            job = self._job(db, job_id)
            if job.state is JobState.QUEUED:
                db.execute(
                    "UPDATE jobs SET state = ?, cancel_requested = 1, finished_at = ? WHERE job_id = ?",
                    (JobState.CANCELLED.value, time.time(), job_id),
                )
            elif job.state is JobState.RUNNING:
                db.execute("UPDATE jobs SET cancel_requested = 1 WHERE job_id = ?", (job_id,))
            return self._job(db, job_id)

    def cancel_requested(self, job_id: str) -> bool:
        row = self._conn().execute("SELECT cancel_requested FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        if row is None:
            raise KeyError(f"unknown job {job_id!r}")
        return bool(row[0])

    # -- units and results -----------------------------------------------------------

    def record_plan(
        self,
        job_id: str,
        plan: dict,
        units: Sequence[Unit],
        problems: Iterable[tuple[str, str]] = (),
        results: Iterable[TargetResult] = (),
    ) -> JobRecord:
        """Record a job's whole plan at once (`record_piece` of one last piece)."""
        return self.record_piece(job_id, plan, units, problems, results, 0, True)[0]

    def record_piece(
        self,
        job_id: str,
        plan: dict,
        units: Sequence[Unit],
        problems: Iterable[tuple[str, str]],
        results: Iterable[TargetResult],
        samples: int,
        last: bool,
    ) -> tuple[JobRecord, int]:
        """Record a piece of a job's plan in one transaction: the plan so far (`Plan.to_dict()`), the piece's units
        (numbered on from the job's last), its scan problems, the results known before any decode (units refused,
        entries found valid; `idx` within the piece) and `samples`, the samples read to its end (where a resumed
        plan goes on); `last`: the plan is complete. Returns the job and the index of the piece's first unit.

        Scan problems count as failures, so the final counters add up to `total`.
        """
        problems = list(problems)
        with self._write() as db:
            job = self._job(db, job_id)
            if job.planned:
                raise ValueError(f"job {job_id} is already planned")
            first = db.execute("SELECT COALESCE(MAX(idx) + 1, 0) FROM units WHERE job_id = ?", (job_id,)).fetchone()[0]
            # Paths interned per piece: a frame shared across two pieces (an episode cut between them) twice.
            base = db.execute("SELECT COALESCE(MAX(pid) + 1, 0) FROM paths WHERE job_id = ?", (job_id,)).fetchone()[0]
            pids: dict[str, int] = {}

            def interned(paths: Sequence[str]) -> str:
                return json.dumps([pids.setdefault(p, base + len(pids)) for p in paths], separators=(",", ":"))

            rows = [(job_id, first + i, interned(u.frames), interned(u.targets)) for i, u in enumerate(units)]
            db.executemany(
                "INSERT INTO paths (job_id, pid, path) VALUES (?, ?, ?)",
                ((job_id, i, os.fsencode(p)) for p, i in pids.items()),
            )
            db.executemany("INSERT INTO units (job_id, idx, frames_json, targets_json) VALUES (?, ?, ?, ?)", rows)
            _insert_failures(db, job_id, problems)
            targets = sum(len(u.targets) for u in units)
            db.execute(
                "UPDATE jobs SET planned = ?, planned_samples = MAX(planned_samples, ?), plan_json = ?, "
                "total = total + ?, failed = failed + ? WHERE job_id = ?",
                (int(last), samples, json.dumps(plan), targets + len(problems), len(problems), job_id),
            )
            _record_results(db, job_id, (TargetResult(*r)._replace(idx=first + r[0]) for r in results))
            return self._job(db, job_id), first

    def refuse(self, job_id: str, plan: dict, error: str) -> JobRecord:
        """The job failed on its plan (its entries would not fit): the plan kept with it, no unit recorded."""
        with self._write() as db:
            self._job(db, job_id)
            db.execute("UPDATE jobs SET plan_json = ? WHERE job_id = ?", (json.dumps(plan), job_id))
            return self._set_state(db, job_id, JobState.FAILED, error)

    def pending_units(self, job_id: str, first: int = 0, end: int | None = None) -> list[tuple[int, Unit]]:
        """Units without recorded results, in plan order (those numbered `first` to `end`, excluded)."""
        return _units(self._conn(), job_id, 0, first, end)

    def recorded_units(self, job_id: str) -> set[bytes]:
        """The key (`Unit.key`) of every unit a job's plan recorded, whatever its state: a plan resumed after a
        restart skips them, and holds 16 bytes of each, not the unit."""
        db = self._conn()
        names = _paths(db, job_id, None)
        rows = db.execute("SELECT frames_json, targets_json FROM units WHERE job_id = ?", (job_id,))
        return {unit_key(_named(json.loads(f), names), _named(json.loads(t), names)) for f, t in rows}

    def start_units(self, job_id: str, idxs: Iterable[int], step: int = 1) -> None:
        """Count an attempt of each pending unit in `idxs`: they go on a device now (`step` -1: take it
        back, for a unit a clean shutdown abandoned: the service did not die while it ran).

        Committed before the forward, so a restart knows which units were running when the service died.
        """
        with self._write() as db:
            db.executemany(
                "UPDATE units SET attempts = MAX(0, attempts + ?) WHERE job_id = ? AND idx = ? AND state = ?",
                ((step, job_id, idx, UnitState.PENDING.value) for idx in idxs),
            )

    def fail_tried(self, job_id: str, attempts: int, reason: str) -> list[tuple[int, Unit]]:
        """Fail, with `reason`, the pending units that went on a device at least `attempts` times without a
        recorded result (poison: resumed, they would jam it again); returns them."""
        with self._write() as db:
            tried = _units(db, job_id, attempts)
            _record_results(
                db,
                job_id,
                [TargetResult(idx, EntryStatus.FAILED, reason, t) for idx, unit in tried for t in unit.targets],
            )
            return tried

    def record_results(self, job_id: str, results: Iterable[TargetResult]) -> JobRecord:
        """Record a result per target (`TargetResult`), the job's counters in the same transaction.

        Pass all targets of a unit in one call: the unit is then done (failed if any
        target failed). Results for a unit already recorded are ignored, so a replay
        after a crash never counts twice.
        """
        with self._write() as db:
            _record_results(db, job_id, results)
            return self._job(db, job_id)

    def failures(self, job_id: str, limit: int = 100) -> list[tuple[str, str]]:
        """(image or "file:line", reason), in the order they were recorded."""
        return (
            self._conn()
            .execute("SELECT image, reason FROM failures WHERE job_id = ? ORDER BY id LIMIT ?", (job_id, limit))
            .fetchall()
        )

    # -- retention -------------------------------------------------------------------

    def prune(self, keep: int, max_age_s: float, now: float | None = None) -> int:
        """Delete ended jobs past the newest `keep` or ended more than `max_age_s` ago, with their units
        and failures; returns how many. Active jobs are never pruned."""
        cutoff = (time.time() if now is None else now) - max_age_s
        with self._write() as db:
            ended = [
                row[0]
                for row in db.execute(
                    f"SELECT job_id FROM jobs WHERE state NOT IN {ACTIVE_STATES} "
                    "ORDER BY COALESCE(finished_at, created_at) DESC, rowid DESC"
                ).fetchall()
            ]
            old = {
                row[0]
                for row in db.execute(
                    f"SELECT job_id FROM jobs WHERE state NOT IN {ACTIVE_STATES} "
                    "AND COALESCE(finished_at, created_at) < ?",
                    (cutoff,),
                ).fetchall()
            }
            doomed = [(job_id,) for i, job_id in enumerate(ended) if i >= keep or job_id in old]
            for table in ("failures", "units", "paths", "jobs"):
                db.executemany(f"DELETE FROM {table} WHERE job_id = ?", doomed)
        return len(doomed)


def _job_state(state: JobState | str) -> JobState:
    try:
        return JobState(state)
    except ValueError:
        raise ValueError(f"state must be one of {'|'.join(s.value for s in JobState)}, got {state!r}") from None


def _units(
    db: sqlite3.Connection, job_id: str, attempts: int, first: int = 0, end: int | None = None
) -> list[tuple[int, Unit]]:
    """Pending units numbered `first` to `end` that went on a device at least `attempts` times, in plan order;
    decoded as they are read (612k units must not be held twice): a few, or a piece's, look up their own
    paths; many load the job's first."""
    rows = db.execute(
        "SELECT idx, frames_json, targets_json FROM units WHERE job_id = ? AND state = ? AND attempts >= ? "
        "AND idx >= ? AND idx < ? ORDER BY idx",
        (job_id, UnitState.PENDING.value, attempts, first, (1 << 62) if end is None else end),
    )
    head = rows.fetchall() if end is not None else rows.fetchmany(_FEW_UNITS)  # a piece's: a few thousand
    lists: Iterable[tuple[int, list, list]]
    if len(head) < _FEW_UNITS or end is not None:
        lists = [(idx, json.loads(f), json.loads(t)) for idx, f, t in head]
        names = _paths(db, job_id, {p for _, f, t in lists for p in (*f, *t) if isinstance(p, int)})
    else:
        names = _paths(db, job_id, None)
        lists = ((idx, json.loads(f), json.loads(t)) for idx, f, t in itertools.chain(head, rows))

    return [(idx, Unit(_named(f, names), _named(t, names))) for idx, f, t in lists]


def _named(items: list, names: dict[int, str]) -> tuple[str, ...]:
    """A unit's frames or targets from its row: pids, or paths (an older release's row)."""
    return tuple(names[p] if isinstance(p, int) else p for p in items)


def _paths(db: sqlite3.Connection, job_id: str, pids: set[int] | None) -> dict[int, str]:
    """The paths of `pids` (None: all of the job's), looked up a chunk at a time."""
    if pids is None:
        rows = db.execute("SELECT pid, path FROM paths WHERE job_id = ?", (job_id,))
        return {pid: os.fsdecode(path) for pid, path in rows}
    found: dict[int, str] = {}
    wanted = sorted(pids)
    for start in range(0, len(wanted), 500):
        chunk = wanted[start : start + 500]
        marks = ", ".join("?" * len(chunk))
        query = f"SELECT pid, path FROM paths WHERE job_id = ? AND pid IN ({marks})"
        found.update((pid, os.fsdecode(path)) for pid, path in db.execute(query, (job_id, *chunk)))
    return found


def _record_results(db: sqlite3.Connection, job_id: str, results: Iterable[TargetResult]) -> None:
    """`JobStore.record_results` inside the caller's transaction (checked before anything is written)."""
    by_unit: dict[int, list[TargetResult]] = {}
    for result in results:
        result = TargetResult(*result)
        try:
            status = EntryStatus(result.status)
        except ValueError:
            raise ValueError(
                f"outcome must be one of {'|'.join(s.value for s in EntryStatus)}, got {result.status!r}"
            ) from None
        by_unit.setdefault(result.idx, []).append(result._replace(status=status))
    counts = dict.fromkeys((*COUNTER.values(), "kept", "replaced"), 0)
    failures: list[tuple[str, str]] = []
    for idx, entries in by_unit.items():
        row = db.execute("SELECT state FROM units WHERE job_id = ? AND idx = ?", (job_id, idx)).fetchone()
        if row is None:
            raise KeyError(f"job {job_id!r} has no unit {idx}")
        if UnitState(row[0]) is not UnitState.PENDING:
            continue
        unit_failed = any(r.status is EntryStatus.FAILED for r in entries)
        db.execute(
            "UPDATE units SET state = ? WHERE job_id = ? AND idx = ?",
            ((UnitState.FAILED if unit_failed else UnitState.DONE).value, job_id, idx),
        )
        for r in entries:
            counts[COUNTER[r.status]] += 1
            if r.write in ("kept", "replaced"):
                counts[r.write] += 1
            if r.status is EntryStatus.FAILED:
                failures.append((r.image, r.reason or "unknown error"))
    _insert_failures(db, job_id, failures)
    db.execute(
        "UPDATE jobs SET computed = computed + ?, skipped = skipped + ?, failed = failed + ?, "
        "kept = kept + ?, replaced = replaced + ? WHERE job_id = ?",
        (counts["computed"], counts["skipped"], counts["failed"], counts["kept"], counts["replaced"], job_id),
    )


def _insert_failures(db: sqlite3.Connection, job_id: str, failures: list[tuple[str, str]]) -> None:
    """Store (image, reason) rows bounded: each string `bounded`, at most MAX_FAILURE_ROWS per job."""
    have = db.execute("SELECT COUNT(*) FROM failures WHERE job_id = ?", (job_id,)).fetchone()[0]
    room = max(0, MAX_FAILURE_ROWS - have)
    db.executemany(
        "INSERT INTO failures (job_id, image, reason) VALUES (?, ?, ?)",
        ((job_id, bounded(image), bounded(reason)) for image, reason in failures[:room]),
    )
