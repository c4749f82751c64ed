"""The job vocabulary: a job's states, how entry outcomes count in it, and the one view of a job (with its
rate and ETA).

Store, runner, HTTP API, metrics and CLI all speak it. A job counts each entry as
`computed`, `skipped` (it already held a valid entry: the engine's `cached`) or `failed`;
`kept` and `replaced` count, among those, the entries where another clip's valid entry was found.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

from vggt_cache.client.text import shorten
from vggt_cache.client.wire import EntryStatus
from vggt_cache.service.jobs.options import JobOptions

if TYPE_CHECKING:
    from vggt_cache.service.jobs.records import JobRecord


class JobState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    FINISHED = "finished"  # every unit has a result (`failed > 0` lists the failures)
    FAILED = "failed"  # the job itself failed: refused by its plan, or an error outside any entry
    CANCELLED = "cancelled"

    @property
    def active(self) -> bool:
        return self in (JobState.QUEUED, JobState.RUNNING)


# What `/status` lists of each job: small whatever the job holds (its options, plan and failures are behind
# `GET /jobs/{id}`).
SUMMARY_FIELDS = (
    "job_id",
    "data_root",
    "state",
    "total",
    "computed",
    "skipped",
    "failed",
    "progress",
    "rate_per_s",
    "eta_s",
    "spec_digest",
    "planned",
    "cancel_requested",
    "created_at",
    "started_at",
    "finished_at",
    "error",
)
SUMMARY_TEXT = 256  # characters of a summary's data root and error

ACTIVE = tuple(s for s in JobState if s.active)
TERMINAL = tuple(s for s in JobState if not s.active)
# An entry's outcome -> the job counter (and store column) it counts in.
COUNTER = {EntryStatus.COMPUTED: "computed", EntryStatus.CACHED: "skipped", EntryStatus.FAILED: "failed"}


@dataclass
class JobView:
    """A job as the API, the status page, metrics and the CLI show it (`GET /jobs/{id}`)."""

    job_id: str
    data_root: str
    state: JobState
    total: int  # entries planned + sample problems, so computed + skipped + failed == total at the end
    computed: int
    skipped: int
    failed: int
    progress: float
    rate_per_s: float | None  # entries a second: since this process took the job up, or over the whole run
    eta_s: float | None
    spec_digest: str
    options: JobOptions
    planned: bool
    cancel_requested: bool
    created_at: float
    started_at: float | None
    finished_at: float | None
    error: str | None
    plan: dict | None  # jobs.plan.Plan.to_dict(): samples found, entries, bytes, free space
    failures: list[dict] | None = None  # the first failures, {"image", "reason"}, when there are any
    # Targets whose file held another clip's valid entry: kept as it was (counted in skipped, or in
    # computed when computed anyway), or replaced (the job's `overwrite` option; counted in computed).
    kept: int = 0
    replaced: int = 0

    @property
    def done(self) -> int:
        return self.computed + self.skipped + self.failed

    @property
    def expected_total(self) -> int:
        """What `progress` counts against: `total`, scaled to the whole root while the job still plans."""
        return expected_total(self.total, self.planned, self.plan)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["state"] = self.state.value
        d["options"] = self.options.to_dict()
        if self.failures is None:
            del d["failures"]
        return d

    def summary(self) -> dict[str, Any]:
        """The job as `/status` lists it: counts and state, its root and error shortened."""
        d = {name: getattr(self, name) for name in SUMMARY_FIELDS}
        d["state"] = self.state.value
        d["data_root"] = shorten(self.data_root, SUMMARY_TEXT)
        d["error"] = self.error and shorten(self.error, SUMMARY_TEXT)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JobView:
        """A view as `GET /jobs/{id}` answers it."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(
            **{
                **{k: v for k, v in d.items() if k in names},
                "state": JobState(d["state"]),
                "options": JobOptions.from_dict(d.get("options") or {}),
            }
        )


@dataclass(frozen=True)
class Rate:
    """Entries computed since this process started (or resumed) the job: what rate and ETA come from."""

    t0: float  # time.monotonic()
    computed0: int


def job_view(rec: JobRecord, rate: Rate | None = None, failures: list[dict] | None = None) -> JobView:
    """The view of a stored job; `rate`: this process runs it (rate and ETA since it took it up)."""
    expected = expected_total(rec.total, rec.planned, rec.plan)
    progress = round(rec.done / expected, 4) if expected else (1.0 if rec.state is JobState.FINISHED else 0.0)
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
    return JobView(
        rec.job_id,
        rec.data_root,
        rec.state,
        rec.total,
        rec.computed,
        rec.skipped,
        rec.failed,
        progress,
        rate_per_s,
        eta_s,
        rec.spec_digest,
        rec.options,
        rec.planned,
        rec.cancel_requested,
        rec.created_at,
        rec.started_at,
        rec.finished_at,
        rec.error,
        rec.plan,
        failures,
        rec.kept,
        rec.replaced,
    )


def _read_fraction(planned: bool, plan: dict | None) -> float:
    """How much of its root a job's plan has read: 1 once planned (or for a plan that does not say)."""
    read = (plan or {}).get("read_fraction", 1.0) if not planned else 1.0
    return read if isinstance(read, (int, float)) and 0 < read <= 1 else 1.0


def expected_total(total: int, planned: bool, plan: dict | None) -> int:
    """`total`, or while the job still plans, its total so far scaled to the whole root by how much of it was
    read: progress does not fall each time a piece is added."""
    return max(total, round(total / _read_fraction(planned, plan)))


def _left_to_compute(rec: JobRecord) -> int:
    """Entries still to compute: the plan's count of those without a valid entry (scaled, while it plans, as
    the total is), less those computed."""
    left = expected_total(rec.total, rec.planned, rec.plan) - rec.done
    if rec.plan and "to_compute" in rec.plan:
        read = _read_fraction(rec.planned, rec.plan)
        left = min(left, max(0, round(rec.plan["to_compute"] / read) - rec.computed))
    return left
