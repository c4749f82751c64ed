"""Bulk precompute jobs driven through a real `vggt-cache serve` over HTTP."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest
import torch

from vggt_cache.client.cachefile import Outcome, read_entry
from vggt_cache.client.manifest import MANIFEST_NAME
from vggt_cache.client.wire import decode_features

from helpers.service import cache_files, done, job, service_spec, temp_files, wait_job, write_images


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("jobs-root")


@pytest.fixture(scope="module")
def server(service_server, root: Path):
    # Small batches: a few hundred tiny images make a job that runs long enough to watch.
    server = service_server(root, "--max-batch-frames", "2")
    yield server
    server.stop()


def test_bulk_job_over_seed_samples_records_failures_and_writes_valid_entries(
    http: httpx.Client, root: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    data = root / "seed"
    images = dict(zip("abcde", write_images(data / "imgs", [f"{n}.png" for n in "abcde"], size=(28, 42)), strict=True))
    (data / "imgs" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    outside = tmp_path_factory.mktemp("outside")
    write_images(outside, ["secret.png"])
    (data / "imgs" / "link.png").symlink_to(outside / "secret.png")
    samples = [
        {"images": ["imgs/a.png", "imgs/b.png"], "conversations": []},
        {"image": "imgs/c.png"},
        {"history_images": ["imgs/a.png", "imgs/d.png"], "current_image": "imgs/e.png"},
        {"image": "imgs/bad.png"},
        {"image": "imgs/link.png"},
        {"conversations": [{"from": "human", "value": "text only"}]},
    ]
    (data / "train.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))

    r = http.post("/precompute", json={"data_root": str(data)})
    assert r.status_code == 202, r.text
    view = wait_job(http, r.json()["job_id"])

    assert view["state"] == "finished"
    assert (view["total"], view["computed"], view["skipped"], view["failed"]) == (7, 5, 0, 2)
    reasons = {Path(f["image"]).name: f["reason"] for f in view["failures"]}
    assert set(reasons) == {"bad.png", "link.png"}
    assert "bad.png" in reasons["bad.png"] and "decode" in reasons["bad.png"]
    assert "outside the allowed roots" in reasons["link.png"]
    assert sorted(os.listdir(outside)) == ["secret.png"]  # nothing written outside the root
    assert not (data / "imgs" / "link.png.vggt_cache.pt").exists()

    manifest = json.loads((data / MANIFEST_NAME).read_text())
    spec = service_spec(http)
    assert manifest["job_id"] == view["job_id"] and manifest["state"] == "finished"
    assert (manifest["total"], manifest["computed"], manifest["failed"]) == (7, 5, 2)
    assert manifest["spec_digest"] == spec.digest
    assert {Path(f["image"]).name for f in manifest["failures"]} == {"bad.png", "link.png"}

    assert [p.name for p in cache_files(data)] == [f"{n}.png.vggt_cache.pt" for n in "abcde"]
    for image in images.values():
        entry = read_entry(image, spec)
        assert entry.outcome is Outcome.HIT, entry.reason
        assert entry.features.shape == (16, 128) and entry.features.dtype == torch.bfloat16
        assert entry.meta["grid"] == [4, 4]

    engine_units = http.get("/status").json()["engine"]["units"]
    again = wait_job(http, http.post("/precompute", json={"data_root": str(data)}).json()["job_id"])
    assert again["job_id"] != view["job_id"]
    assert (again["state"], again["computed"], again["skipped"], again["failed"]) == ("finished", 0, 5, 2)
    # The plan found the five entries valid: skipped there, not read again by the engine (bad.png still goes).
    after = http.get("/status").json()["engine"]["units"]
    assert after.get("cached", 0) == engine_units.get("cached", 0)
    assert after.get("failed", 0) == engine_units.get("failed", 0) + 1
    assert again["rate_per_s"] == 0  # a rate of entries computed: skipping is not throughput
    r = http.delete(f"/jobs/{again['job_id']}")
    assert r.status_code == 409 and r.json()["detail"] == f"job {again['job_id']} already finished: nothing to cancel"


def test_resubmitting_an_active_job_returns_it_and_delete_cancels_it(http: httpx.Client, root: Path) -> None:
    data = root / "cancel"
    write_images(data, [f"im{i:03d}.png" for i in range(300)])

    first = http.post("/precompute", json={"data_root": str(data)}).json()
    second = http.post("/precompute", json={"data_root": str(data) + "/"})
    assert second.status_code == 202
    assert second.json()["job_id"] == first["job_id"]
    assert [j["job_id"] for j in http.get("/status").json()["jobs"]].count(first["job_id"]) == 1

    wait_job(http, first["job_id"], until=lambda v: v["state"] == "running" and done(v) > 0)
    r = http.delete(f"/jobs/{first['job_id']}")
    assert r.status_code == 200 and r.json()["cancel_requested"] is True
    view = wait_job(http, first["job_id"])

    assert view["state"] == "cancelled"
    assert 0 < done(view) < view["total"] == 300
    # Queued units are taken back: what finishes after the cancel is what was on the device or being
    # decoded or written (batches of 2 here; 4 decode workers, a chunk being admitted), not the backlog.
    assert done(view) - done(r.json()) <= 16, (r.json(), view)
    assert http.delete(f"/jobs/{first['job_id']}").status_code == 409
    assert len(cache_files(data)) == view["computed"]  # what the job counts is what it wrote
    assert json.loads((data / MANIFEST_NAME).read_text())["state"] == "cancelled"
    # A cancelled job is over: the same data root now makes a new one (cancelled too, to free the runner).
    again = http.post("/precompute", json={"data_root": str(data)}).json()["job_id"]
    assert again != first["job_id"]
    http.delete(f"/jobs/{again}")
    assert wait_job(http, again)["state"] == "cancelled"


def test_on_demand_requests_overtake_a_running_bulk_job(http: httpx.Client, root: Path) -> None:
    bulk = root / "bulk"
    write_images(bulk, [f"im{i:03d}.png" for i in range(300)], seed=1)
    wanted = write_images(root / "wanted", ["x.png", "y.png"], seed=2)
    job_id = http.post("/precompute", json={"data_root": str(bulk)}).json()["job_id"]
    wait_job(http, job_id, until=lambda v: v["state"] == "running" and done(v) > 0)

    r = http.post("/features", json={"images": wanted})
    at_answer = job(http, job_id)

    assert r.status_code == 200, r.text
    items, _tensors = decode_features(r.content)
    assert [i["status"] for i in items] == ["computed", "computed"]
    assert at_answer["state"] == "running" and done(at_answer) < at_answer["total"]
    http.delete(f"/jobs/{job_id}")
    assert wait_job(http, job_id)["state"] == "cancelled"


def test_job_resumes_after_sigkill(service_server, tmp_path_factory: pytest.TempPathFactory) -> None:
    data_root = tmp_path_factory.mktemp("sigkill")
    state_dir = tmp_path_factory.mktemp("sigkill-state")
    images = write_images(data_root / "frames", [f"f{i:03d}.png" for i in range(150)], seed=3)
    args = ("--max-batch-frames", "4", "--state-dir", str(state_dir))
    first = service_server(data_root, *args)
    with httpx.Client(base_url=first.url, timeout=30) as http:
        job_id = http.post("/precompute", json={"data_root": str(data_root)}).json()["job_id"]
        wait_job(http, job_id, until=lambda v: 0 < done(v) < v["total"])
    first.proc.kill()  # SIGKILL: no shutdown code runs
    first.proc.wait(10)
    # What a write cut short by the kill leaves (the kill may or may not have hit one itself).
    orphan = data_root / "frames" / ".f000.png.vggt_cache.pt.4242.0badf00d.tmp"
    orphan.write_bytes(b"half an entry")

    second = service_server(data_root, *args)
    with httpx.Client(base_url=second.url, timeout=30) as http:
        view = wait_job(http, job_id)
        spec = service_spec(http)
    log = second.log()
    second.stop()

    assert view["state"] == "finished"
    assert view["total"] == 150 and view["failed"] == 0
    assert view["computed"] + view["skipped"] + view["failed"] == view["total"]
    assert f"Resuming job {job_id}" in log
    assert "temporary file(s) left by an interrupted run" in log
    assert all(read_entry(p, spec).outcome is Outcome.HIT for p in images)
    assert temp_files(data_root) == []
