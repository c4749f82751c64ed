"""What the job store holds, as the rest of the code reads it: a job's row and one target's outcome."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import NamedTuple

from vggt_cache.client.wire import EntryStatus
from vggt_cache.service.jobs.options import JobOptions
from vggt_cache.service.jobs.view import JobState


class TargetResult(NamedTuple):
    """One target's outcome, as the store records it. `write`: "kept" or "replaced" when its file held a
    valid entry of another clip (`service.engine.work.EntryResult`), counted besides the outcome."""

    idx: int  # the unit's index in the plan
    status: EntryStatus
    reason: str | None
    image: str
    write: str | None = None


@dataclass(frozen=True)
class JobRecord:
    job_id: str
    data_root: str
    spec_digest: str
    spec_json: str
    options: JobOptions
    state: JobState
    planned: bool  # its whole plan recorded (`JobStore.record_piece`); else planned on, on resume
    total: int  # targets planned + scan problems, so computed + skipped + failed == total at the end
    computed: int
    skipped: int
    failed: int
    cancel_requested: bool
    created_at: float
    started_at: float | None
    finished_at: float | None
    error: str | None
    plan: dict | None  # jobs.plan.Plan.to_dict() once planned: samples found, entries, bytes, free space
    # Targets whose file held another clip's valid entry: kept (of skipped/computed) or replaced (of computed).
    kept: int = 0
    replaced: int = 0
    planned_samples: int = 0  # while planning: the samples read into recorded units

    @property
    def done(self) -> int:
        return self.computed + self.skipped + self.failed

    @classmethod
    def from_row(cls, row: tuple) -> JobRecord:
        (
            job_id,
            data_root,
            digest,
            spec_json,
            options_json,
            state,
            planned,
            total,
            computed,
            skipped,
            failed,
            cancel,
            created,
            started,
            finished,
            error,
            plan_json,
            kept,
            replaced,
            planned_samples,
        ) = row
        return cls(
            job_id,
            data_root,
            digest,
            spec_json,
            JobOptions.from_dict(json.loads(options_json)),
            JobState(state),
            bool(planned),
            total,
            computed,
            skipped,
            failed,
            bool(cancel),
            created,
            started,
            finished,
            error,
            json.loads(plan_json) if plan_json else None,
            kept,
            replaced,
            planned_samples,
        )
