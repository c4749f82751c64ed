"""Persistent job state: one SQLite file (WAL) under the service's state dir.

Every change is one transaction, so a process killed at any point leaves
counters that agree with the per-unit rows, and a restarted service resumes
exactly the units still pending.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from vggt_cache.client.text import bounded, printable
from vggt_cache.client.wire import EntryStatus
from vggt_cache.service.errors import UnusableInput
from vggt_cache.service.jobview import ACTIVE, COUNTER, JobState
from vggt_cache.service.units import Unit

DB_NAME = "jobs.sqlite3"
# Failure rows kept per job (each string `bounded`): the counters count every failure, the rows
# show the first ones, so one job of bad data cannot grow the database without end.
MAX_FAILURE_ROWS = 10_000


def _sql_list(states: Iterable[JobState]) -> str:
    return "(" + ", ".join(f"'{s.value}'" for s in states) + ")"


_ALL_STATES, _ACTIVE_STATES = _sql_list(JobState), _sql_list(ACTIVE)

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    data_root TEXT NOT NULL,
    spec_digest TEXT NOT NULL,
    spec_json TEXT NOT NULL,
    options_json TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN {_ALL_STATES}),
    planned INTEGER NOT NULL DEFAULT 0,
    total INTEGER NOT NULL DEFAULT 0,
    computed INTEGER NOT NULL DEFAULT 0,
    skipped INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    error TEXT,
    plan_json TEXT
);
-- At most one active job per (data_root, spec): the database enforces it, across processes too.
CREATE UNIQUE INDEX IF NOT EXISTS jobs_one_active ON jobs (data_root, spec_digest)
    WHERE state IN {_ACTIVE_STATES};
CREATE TABLE IF NOT EXISTS units (
    job_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    frames_json TEXT NOT NULL,
    targets_json TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'done', 'failed')),
    attempts INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (job_id, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS failures (
    id INTEGER PRIMARY KEY,
    job_id TEXT NOT NULL,
    image TEXT NOT NULL,
    reason TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS failures_by_job ON failures (job_id, id);
"""

_JOB_COLUMNS = (
    "job_id, data_root, spec_digest, spec_json, options_json, state, planned, total, computed, "
    "skipped, failed, cancel_requested, created_at, started_at, finished_at, error, plan_json, kept, replaced"
)
# Columns added after the first release, per table, with their types: added to an older database on open.
_ADDED_COLUMNS = {"jobs": {"plan_json": "TEXT", "kept": "INTEGER NOT NULL DEFAULT 0",
                           "replaced": "INTEGER NOT NULL DEFAULT 0"},
                  "units": {"attempts": "INTEGER NOT NULL DEFAULT 0"}}


@dataclass(frozen=True)
class JobRecord:
    job_id: str
    data_root: str
    spec_digest: str
    spec_json: str
    options: dict
    state: JobState
    planned: bool  # units recorded by set_plan; an unplanned job is (re)scanned on resume
    total: int  # targets planned + scan problems, so computed + skipped + failed == total at the end
    computed: int
    skipped: int
    failed: int
    cancel_requested: bool
    created_at: float
    started_at: float | None
    finished_at: float | None
    error: str | None
    plan: dict | None  # service.plan.Plan.to_dict() once planned: samples found, entries, bytes, free space
    # Targets whose file held another clip's valid entry: kept (of skipped/computed) or replaced (of computed).
    kept: int = 0
    replaced: int = 0

    @property
    def done(self) -> int:
        return self.computed + self.skipped + self.failed

    @classmethod
    def _from_row(cls, row: tuple) -> JobRecord:
        (job_id, data_root, digest, spec_json, options_json, state, planned, total, computed,
         skipped, failed, cancel, created, started, finished, error, plan_json, kept, replaced) = row
        return cls(job_id, data_root, digest, spec_json, json.loads(options_json), JobState(state),
                   bool(planned), total, computed, skipped, failed, bool(cancel),
                   created, started, finished, error, json.loads(plan_json) if plan_json else None, kept, replaced)


class JobStore:
    """Thread-safe job store: one SQLite connection per thread, writes in IMMEDIATE transactions."""

    def __init__(self, state_dir: str, busy_timeout_s: float = 30.0) -> None:
        os.makedirs(state_dir, exist_ok=True)
        self.path = os.path.join(state_dir, DB_NAME)
        self._busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._all_lock = threading.Lock()
        self._conn().executescript("BEGIN IMMEDIATE;" + _SCHEMA + "COMMIT;")
        with self._write() as db:  # a state dir from an older release: add what it lacks
            for table, columns in _ADDED_COLUMNS.items():
                have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
                for name, kind in columns.items():
                    if name not in have:
                        db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")

    # -- connections -----------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            # Autocommit mode: transactions are opened explicitly, so nothing is left half-open.
            db = sqlite3.connect(self.path, timeout=self._busy_timeout_s, isolation_level=None,
                                 check_same_thread=False)
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

    def close(self) -> None:
        """Close every connection this store opened (the store is unusable afterwards)."""
        with self._all_lock:
            for db in self._all:
                db.close()
            self._all.clear()
        self._local = threading.local()

    # -- jobs ------------------------------------------------------------------------

    def _job(self, db: sqlite3.Connection, job_id: str) -> JobRecord:
        row = db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        if row is None:
            raise KeyError(f"unknown job {job_id!r}")
        return JobRecord._from_row(row)

    def create_job(self, data_root: str, spec_digest: str, spec_json: str, options: dict) -> JobRecord:
        """A new queued job, or the active (queued/running) one for the same data root and spec."""
        data_root = os.path.normpath(os.path.abspath(data_root))
        if printable(data_root) != data_root:
            raise UnusableInput(f"data_root {printable(data_root)} is not valid UTF-8; rename the folder")
        with self._write() as db:
            row = db.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE data_root = ? AND spec_digest = ? "
                f"AND state IN {_ACTIVE_STATES}",
                (data_root, spec_digest),
            ).fetchone()
            if row is not None:
                return JobRecord._from_row(row)
            job_id = uuid.uuid4().hex
            db.execute(
                "INSERT INTO jobs (job_id, data_root, spec_digest, spec_json, options_json, state, "
                "created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (job_id, data_root, spec_digest, spec_json, json.dumps(options, sort_keys=True),
                 JobState.QUEUED.value, time.time()),
            )
            return self._job(db, job_id)

    def get(self, job_id: str) -> JobRecord | None:
        try:
            return self._job(self._conn(), job_id)
        except KeyError:
            return None

    def list_jobs(self, limit: int = 100) -> list[JobRecord]:
        """Newest first."""
        rows = self._conn().execute(
            f"SELECT {_JOB_COLUMNS} FROM jobs ORDER BY created_at DESC, rowid DESC LIMIT ?", (limit,)
        ).fetchall()
        return [JobRecord._from_row(r) for r in rows]

    def unfinished_jobs(self) -> list[JobRecord]:
        """Queued or running jobs, oldest first: what a restarted service resumes."""
        rows = self._conn().execute(
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE state IN {_ACTIVE_STATES} "
            "ORDER BY created_at, rowid"
        ).fetchall()
        return [JobRecord._from_row(r) for r in rows]

    def set_state(self, job_id: str, state: JobState | str, error: str | None = None) -> JobRecord:
        """Move a job on; started_at/finished_at are stamped once. Terminal states are final."""
        try:
            state = JobState(state)
        except ValueError:
            raise ValueError(f"state must be one of {'|'.join(s.value for s in JobState)}, got {state!r}") from None
        with self._write() as db:
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

    def count_by_state(self) -> dict[JobState, int]:
        """Jobs per state, in one query (the metrics gauge)."""
        rows = self._conn().execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        return {JobState(state): n for state, n in rows}

    def request_cancel(self, job_id: str) -> JobRecord:
        """Flag a job for cancellation; a queued one is cancelled at once, a finished one is left."""
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
        row = self._conn().execute(
            "SELECT cancel_requested FROM jobs WHERE job_id = ?", (job_id,)
        ).fetchone()
        if row is None:
            raise KeyError(f"unknown job {job_id!r}")
        return bool(row[0])

    # -- units and results -----------------------------------------------------------

    def record_plan(self, job_id: str, plan: dict) -> JobRecord:
        """Keep what planning found (samples, entries, bytes, free space) with the job."""
        with self._write() as db:
            self._job(db, job_id)
            db.execute("UPDATE jobs SET plan_json = ? WHERE job_id = ?", (json.dumps(plan), job_id))
            return self._job(db, job_id)

    def set_plan(self, job_id: str, units: Sequence[Unit],
                 problems: Iterable[tuple[str, str]] = ()) -> JobRecord:
        """Record a job's units (indexed 0..n-1) and its scan problems, once.

        Scan problems count as failures, so the final counters add up to `total`.
        """
        problems = list(problems)
        with self._write() as db:
            job = self._job(db, job_id)
            if job.planned:
                raise ValueError(f"job {job_id} is already planned")
            db.executemany(
                "INSERT INTO units (job_id, idx, frames_json, targets_json) VALUES (?, ?, ?, ?)",
                ((job_id, i, json.dumps(u.frames), json.dumps(u.targets)) for i, u in enumerate(units)),
            )
            _insert_failures(db, job_id, [(where, reason) for where, reason in problems])
            total = sum(len(u.targets) for u in units) + len(problems)
            db.execute(
                "UPDATE jobs SET planned = 1, total = ?, failed = failed + ? WHERE job_id = ?",
                (total, len(problems), job_id),
            )
            return self._job(db, job_id)

    def pending_units(self, job_id: str) -> list[tuple[int, Unit]]:
        """Units without recorded results, in plan order."""
        rows = self._conn().execute(
            "SELECT idx, frames_json, targets_json FROM units WHERE job_id = ? AND state = 'pending' "
            "ORDER BY idx",
            (job_id,),
        ).fetchall()
        return [(idx, Unit(tuple(json.loads(f)), tuple(json.loads(t)))) for idx, f, t in rows]

    def start_units(self, job_id: str, idxs: Iterable[int], step: int = 1) -> None:
        """Count an attempt of each pending unit in `idxs`: they go on a device now (`step` -1: take it
        back, for a unit a clean shutdown abandoned: the service did not die while it ran).

        Committed before the forward, so a restart knows which units were running when the service died.
        """
        with self._write() as db:
            db.executemany(
                "UPDATE units SET attempts = MAX(0, attempts + ?) WHERE job_id = ? AND idx = ? AND state = 'pending'",
                ((step, job_id, idx) for idx in idxs),
            )

    def tried_units(self, job_id: str, attempts: int) -> list[tuple[int, Unit]]:
        """Pending units that went on a device at least `attempts` times without a recorded result."""
        rows = self._conn().execute(
            "SELECT idx, frames_json, targets_json FROM units WHERE job_id = ? AND state = 'pending' "
            "AND attempts >= ? ORDER BY idx",
            (job_id, attempts),
        ).fetchall()
        return [(idx, Unit(tuple(json.loads(f)), tuple(json.loads(t)))) for idx, f, t in rows]

    def record_results(self, job_id: str,
                       results: Iterable[tuple]) -> JobRecord:
        """Record (unit idx, outcome, reason, image[, write]) per target, counters in the same transaction.

        `write`: "kept" or "replaced" when the target's file held a valid entry of another clip (see
        `service.engine.work.EntryResult`), counted in `kept` / `replaced` besides the outcome's counter.

        Pass all targets of a unit in one call: the unit is then done (failed if any
        target failed). Results for a unit already recorded are ignored, so a replay
        after a crash never counts twice.
        """
        by_unit: dict[int, list[tuple[EntryStatus, str | None, str, str | None]]] = {}
        for idx, outcome, reason, image, *extra in results:
            try:
                outcome = EntryStatus(outcome)
            except ValueError:
                raise ValueError(f"outcome must be one of {'|'.join(s.value for s in EntryStatus)}, "
                                 f"got {outcome!r}") from None
            by_unit.setdefault(idx, []).append((outcome, reason, image, extra[0] if extra else None))
        with self._write() as db:
            counts = dict.fromkeys((*COUNTER.values(), "kept", "replaced"), 0)
            failures: list[tuple[str, str]] = []
            for idx, entries in by_unit.items():
                row = db.execute(
                    "SELECT state FROM units WHERE job_id = ? AND idx = ?", (job_id, idx)
                ).fetchone()
                if row is None:
                    raise KeyError(f"job {job_id!r} has no unit {idx}")
                if row[0] != "pending":
                    continue
                unit_failed = any(outcome is EntryStatus.FAILED for outcome, _, _, _ in entries)
                db.execute(
                    "UPDATE units SET state = ? WHERE job_id = ? AND idx = ?",
                    ("failed" if unit_failed else "done", job_id, idx),
                )
                for outcome, reason, image, write in entries:
                    counts[COUNTER[outcome]] += 1
                    if write in ("kept", "replaced"):
                        counts[write] += 1
                    if outcome is EntryStatus.FAILED:
                        failures.append((image, reason or "unknown error"))
            _insert_failures(db, job_id, failures)
            db.execute(
                "UPDATE jobs SET computed = computed + ?, skipped = skipped + ?, failed = failed + ?, "
                "kept = kept + ?, replaced = replaced + ? WHERE job_id = ?",
                (counts["computed"], counts["skipped"], counts["failed"], counts["kept"], counts["replaced"], job_id),
            )
            return self._job(db, job_id)

    def failures(self, job_id: str, limit: int = 100) -> list[tuple[str, str]]:
        """(image or "file:line", reason), in the order they were recorded."""
        return self._conn().execute(
            "SELECT image, reason FROM failures WHERE job_id = ? ORDER BY id LIMIT ?", (job_id, limit)
        ).fetchall()

    # -- retention -------------------------------------------------------------------

    def prune(self, keep: int, max_age_s: float, now: float | None = None) -> int:
        """Delete ended jobs past the newest `keep` or ended more than `max_age_s` ago, with their units
        and failures; returns how many. Active jobs are never pruned."""
        cutoff = (time.time() if now is None else now) - max_age_s
        with self._write() as db:
            ended = [row[0] for row in db.execute(
                f"SELECT job_id FROM jobs WHERE state NOT IN {_ACTIVE_STATES} "
                "ORDER BY COALESCE(finished_at, created_at) DESC, rowid DESC").fetchall()]
            old = {row[0] for row in db.execute(
                f"SELECT job_id FROM jobs WHERE state NOT IN {_ACTIVE_STATES} "
                "AND COALESCE(finished_at, created_at) < ?", (cutoff,)).fetchall()}
            doomed = [(job_id,) for i, job_id in enumerate(ended) if i >= keep or job_id in old]
            for table in ("failures", "units", "jobs"):
                db.executemany(f"DELETE FROM {table} WHERE job_id = ?", doomed)
        return len(doomed)


def _insert_failures(db: sqlite3.Connection, job_id: str, failures: list[tuple[str, str]]) -> None:
    """Store (image, reason) rows bounded: each string `bounded`, at most MAX_FAILURE_ROWS per job."""
    have = db.execute("SELECT COUNT(*) FROM failures WHERE job_id = ?", (job_id,)).fetchone()[0]
    room = max(0, MAX_FAILURE_ROWS - have)
    db.executemany("INSERT INTO failures (job_id, image, reason) VALUES (?, ?, ?)",
                   ((job_id, bounded(image), bounded(reason)) for image, reason in failures[:room]))
