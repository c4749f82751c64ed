"""The one writer of `vggt_cache_manifest.json` for a job: one process's, or torchrun's ranks merged."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vggt_cache.client.manifest import write_manifest
from vggt_cache.client.spec import FeatureSpec, matching_preset
from vggt_cache.service.jobs.view import JobState, JobView
from vggt_cache.service.paths import AllowedRoots

COUNTS = ("total", "computed", "skipped", "failed", "kept", "replaced")
# A plan's figures that torchrun's ranks each count of their own share (the samples found are the same on each).
PLAN_COUNTS = ("units", "entries", "valid", "to_compute", "unreadable", "refused", "bytes_to_write", "replaced_bytes")


@dataclass(frozen=True)
class JobReport:
    """What a manifest says of a job. `verified`: every entry computed was read back and validated
    (`--verify`); `verified_entries` counts them. `ranks`: the torchrun ranks whose shares it sums."""

    job_id: str
    state: JobState
    counts: dict[str, int]  # COUNTS
    plan: dict | None
    seconds: float
    failures: list[dict]  # {"image", "reason"}
    verified: bool = False
    ranks: int = 1


def merged_report(views: list[JobView], seconds: float) -> JobReport:
    """torchrun: one report of every rank's share of a job (each rank's view, in rank order)."""
    plans = [v.plan for v in views if v.plan]
    # One plan for the whole root: the samples found (the same on every rank), the counts summed.
    plan = {**plans[0], **{k: sum(p[k] for p in plans) for k in PLAN_COUNTS}} if plans else None
    # Finished when every rank finished, else the state of the first rank that did not.
    state = next((v.state for v in views if v.state is not JobState.FINISHED), JobState.FINISHED)
    counts = {k: sum(getattr(v, k) for v in views) for k in COUNTS}
    failures = [f for v in views for f in v.failures or ()]
    return JobReport(views[0].job_id, state, counts, plan, seconds, failures, views[0].options.verify, len(views))


def manifest_record(report: JobReport, spec: FeatureSpec, model_info: dict) -> dict[str, Any]:
    """The manifest's body."""
    counts = {k: report.counts.get(k, 0) for k in COUNTS}
    return {
        "job_id": report.job_id,
        "state": report.state.value,
        "ranks": report.ranks,
        **counts,
        "verified": report.verified,
        "verified_entries": counts["computed"] if report.verified else 0,
        "spec": spec.to_dict(),
        "spec_digest": spec.digest,
        "preset": matching_preset(spec),
        "plan": report.plan,
        "model": model_info,
        "seconds": round(report.seconds, 2),
        "failures": report.failures,
    }


def write_job_manifest(
    data_root: str, report: JobReport, spec: FeatureSpec, model_info: dict, allowed: AllowedRoots, mode: int
) -> str:
    """Write the manifest atomically into `data_root`, opened inside the allowed roots; returns its path."""
    return write_manifest(data_root, manifest_record(report, spec, model_info), allowed.real, mode)
