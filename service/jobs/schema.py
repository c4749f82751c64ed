"""The job store's SQLite schema: tables, the states a row may hold, and the upgrade of an older state dir."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from enum import Enum

from vggt_cache.service.jobs.view import ACTIVE, JobState


class UnitState(str, Enum):
    """A planned unit: no result yet (resumed on the next start), or its result recorded."""

    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"  # a target of it failed


def sql_list(states: Iterable[Enum]) -> str:
    return "(" + ", ".join(f"'{s.value}'" for s in states) + ")"


ACTIVE_STATES = sql_list(ACTIVE)

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    data_root TEXT NOT NULL,
    spec_digest TEXT NOT NULL,
    spec_json TEXT NOT NULL,
    options_json TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN {sql_list(JobState)}),
    planned INTEGER NOT NULL DEFAULT 0,
    planned_samples INTEGER NOT NULL DEFAULT 0,  -- a plan in progress: samples read into recorded units
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
    WHERE state IN {ACTIVE_STATES};
-- Every path a job's units name, once: 612k units of 9-frame clips name each frame nine times.
-- The file system's bytes (`os.fsencode`): a name need not be UTF-8.
CREATE TABLE IF NOT EXISTS paths (
    job_id TEXT NOT NULL,
    pid INTEGER NOT NULL,
    path BLOB NOT NULL,
    PRIMARY KEY (job_id, pid)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS units (
    job_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    frames_json TEXT NOT NULL,  -- JSON list of pids (of paths, in a state dir of an older release)
    targets_json TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT '{UnitState.PENDING.value}' CHECK (state IN {sql_list(UnitState)}),
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

JOB_COLUMNS = (
    "job_id, data_root, spec_digest, spec_json, options_json, state, planned, total, computed, "
    "skipped, failed, cancel_requested, created_at, started_at, finished_at, error, plan_json, kept, replaced, "
    "planned_samples"
)
# Columns added after the first release, per table, with their types: added to an older database on open.
ADDED_COLUMNS = {
    "jobs": {
        "plan_json": "TEXT",
        "kept": "INTEGER NOT NULL DEFAULT 0",
        "replaced": "INTEGER NOT NULL DEFAULT 0",
        "planned_samples": "INTEGER NOT NULL DEFAULT 0",
    },
    "units": {"attempts": "INTEGER NOT NULL DEFAULT 0"},
}


def create_or_upgrade(db: sqlite3.Connection) -> None:
    """Create the tables, or add to a state dir of an older release the columns it lacks (one transaction)."""
    db.executescript("BEGIN IMMEDIATE;" + SCHEMA + "COMMIT;")
    db.execute("BEGIN IMMEDIATE")
    try:
        for table, columns in ADDED_COLUMNS.items():
            have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
            for name, kind in columns.items():
                if name not in have:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
