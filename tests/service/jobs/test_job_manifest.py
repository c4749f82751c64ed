"""The one job manifest writer: one process's job, torchrun's ranks merged, always inside the allowed roots."""

from __future__ import annotations

import pytest

from vggt_cache.client.manifest import read_manifest
from vggt_cache.client.safeopen import OutsideRoots
from vggt_cache.client.spec import FeatureSpec
from vggt_cache.service.jobs.manifest import JobReport, merged_report, write_job_manifest
from vggt_cache.service.jobs.options import JobOptions
from vggt_cache.service.jobs.view import JobState, JobView
from vggt_cache.service.paths import AllowedRoots

SPEC = FeatureSpec(
    fingerprint="sha256:" + "0f" * 32,
    architecture={"patch_size": 14, "embed_dim": 8, "depth": 4, "num_register_tokens": 4},
)
MODEL = {"source": "tiny", "fingerprint": SPEC.fingerprint}


def rank_view(state: JobState, computed: int, failed: int, plan: dict | None) -> JobView:
    failures = [{"image": f"/d/{state.value}{i}.png", "reason": "bad"} for i in range(failed)] or None
    return JobView(
        "j",
        "/d",
        state,
        computed + failed,
        computed,
        0,
        failed,
        1.0,
        None,
        None,
        SPEC.digest,
        JobOptions(verify=True),
        True,
        False,
        0.0,
        1.0,
        2.0,
        None,
        plan,
        failures,
        kept=1,
    )


def test_ranks_merge_into_one_report_whose_state_is_the_first_unfinished_one():
    plan = {
        "samples": 9,
        "units": 2,
        "entries": 3,
        "valid": 1,
        "to_compute": 2,
        "unreadable": 0,
        "refused": 0,
        "bytes_to_write": 10,
        "replaced_bytes": 0,
    }
    views = [
        rank_view(JobState.FINISHED, 2, 1, plan),
        rank_view(JobState.CANCELLED, 1, 0, {**plan, "entries": 4}),
        rank_view(JobState.FAILED, 0, 0, None),
    ]
    report = merged_report(views, 3.0)
    assert (report.state, report.ranks, report.verified) == (JobState.CANCELLED, 3, True)
    assert report.counts == {"total": 4, "computed": 3, "skipped": 0, "failed": 1, "kept": 3, "replaced": 0}
    assert report.plan["samples"] == 9 and report.plan["entries"] == 7 and report.plan["units"] == 4
    assert report.failures == [{"image": "/d/finished0.png", "reason": "bad"}]


def test_the_manifest_is_written_inside_the_allowed_roots_only(tmp_path):
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    root.mkdir()
    elsewhere.mkdir()
    report = JobReport("j", JobState.FINISHED, {"total": 2, "computed": 2}, None, 1.234, [], verified=True)
    write_job_manifest(str(root), report, SPEC, MODEL, AllowedRoots.of([str(root)]), 0o644)
    body = read_manifest(str(root))
    assert (body["state"], body["total"], body["computed"], body["failed"], body["ranks"]) == ("finished", 2, 2, 0, 1)
    assert body["verified_entries"] == 2 and body["seconds"] == 1.23 and body["spec_digest"] == SPEC.digest
    with pytest.raises(OutsideRoots):
        write_job_manifest(str(elsewhere), report, SPEC, MODEL, AllowedRoots.of([str(root)]), 0o644)
    assert read_manifest(str(elsewhere)) is None
