"""Text from other people's files, against real services on 127.0.0.1 (issue 18, items 5, 13 and 14).

Stored and served strings stay bounded whatever the sample files hold, a name cannot forge a log
line or drive a terminal, and a path outside the roots answers the same whether it exists or not.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from vggt_cache.client.manifest import manifest_path
from vggt_cache.service.jobs.options import JobOptions
from vggt_cache.service.jobs.store import DB_NAME, JobStore

from helpers.service import REPO, poll, start_service, wait_job, write_images

LONG = 100_000  # characters of each sample's image name (a string in a file: no path limit applies)
FORGED = "\n[ERROR] forged\x1b[2J"  # a line break that would start a fake record, and a clear-screen escape


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("shared")


@pytest.fixture(scope="module")
def server(root):
    service = start_service(root, "--job-retention", "3")
    yield service
    service.stop()


def _sqlite_bytes(state_dir: str) -> int:
    return sum(p.stat().st_size for p in Path(state_dir).glob(DB_NAME + "*"))


def test_long_sample_paths_keep_status_jobs_sqlite_and_manifest_small(server, http, root):
    data = root / "long"
    data.mkdir()
    with open(data / "train.jsonl", "w") as f:
        for i in range(100):
            f.write(json.dumps({"image": f"{i:03d}" + "n" * LONG}) + "\n")
    missing_files = ["d/" * 1990 + f"{i}.jsonl" for i in range(100)]  # 4 kB names, each a sample file problem
    answer = http.post(
        "/precompute", json={"data_root": str(data), "data_files": ["train.jsonl", *missing_files]}
    ).raise_for_status()
    view = wait_job(http, answer.json()["job_id"])
    assert view["state"] == "finished" and view["failed"] == 200

    status = http.get("/status").raise_for_status()
    assert len(status.content) < 20_000, len(status.content)
    listed = next(j for j in status.json()["jobs"] if j["job_id"] == view["job_id"])
    assert "options" not in listed and "failures" not in listed and "plan" not in listed

    failures = view["failures"]
    assert len(failures) == 100  # the view lists the first 100
    assert all(len(f["image"]) + len(f["reason"]) < 2_200 for f in failures)
    assert all("characters omitted]" in f["image"] + f["reason"] for f in failures)
    assert len(json.dumps(failures)) < 250_000
    assert _sqlite_bytes(server.state_dir) < 8_000_000, _sqlite_bytes(server.state_dir)
    manifest = Path(manifest_path(str(data)))
    assert manifest.stat().st_size < 2_000_000, manifest.stat().st_size
    listed = json.loads(manifest.read_text())["failures"]
    assert len(listed) == 200 and all(len(f["image"]) + len(f["reason"]) < 2_200 for f in listed)
    assert sum("image not found" in f["reason"] for f in listed) == 100


def test_a_path_longer_than_linux_allows_is_refused_before_it_is_stored(http, root):
    answer = http.post("/precompute", json={"data_root": str(root), "data_path": "p" * 5000})
    assert answer.status_code == 422
    assert len(answer.content) < 2_000


def test_the_status_page_waits_for_each_refresh(http):
    page = http.get("/").raise_for_status().text
    assert "setInterval(refresh" not in page
    assert "setTimeout(refreshLoop" in page


def test_ended_jobs_past_the_retention_count_are_pruned_with_their_failures(server, http, root):
    data = root / "retention"
    data.mkdir()
    (data / "train.jsonl").write_text(json.dumps({"image": "missing.png"}) + "\n")
    ids = []
    for _ in range(5):  # one at a time: a root has one active job
        answer = http.post("/precompute", json={"data_root": str(data)}).raise_for_status()
        ids.append(wait_job(http, answer.json()["job_id"])["job_id"])

    def pruned() -> bool:
        return all(http.get(f"/jobs/{job_id}").status_code == 404 for job_id in ids[:2])

    poll(pruned, 30, "the two oldest jobs to be pruned (--job-retention 3)")
    for job_id in ids[2:]:
        assert http.get(f"/jobs/{job_id}").status_code == 200
    with sqlite3.connect(f"file:{server.state_dir}/{DB_NAME}?mode=ro", uri=True) as db:
        for table in ("jobs", "units", "failures"):
            left = db.execute(f"SELECT COUNT(*) FROM {table} WHERE job_id IN (?, ?)", ids[:2]).fetchone()[0]
            assert left == 0, table
        assert db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] <= 3


def test_ended_jobs_older_than_the_retention_days_are_pruned(tmp_path):
    store = JobStore(str(tmp_path))
    old = store.create("/data/a", "d", "{}", JobOptions())
    store.finish(old.job_id, "finished")
    active = store.create("/data/b", "d", "{}", JobOptions())
    later = old.created_at + 3 * 86400
    assert store.prune(keep=100, max_age_s=2 * 86400, now=later) == 1
    assert store.get(old.job_id) is None and store.get(active.job_id) is not None
    store.close()


def _lines(text: str) -> list[str]:
    return text.splitlines()


def test_names_with_newlines_and_escapes_forge_no_line_in_the_service_log(server, http, root):
    folder = root / "evil-log"
    folder.mkdir()
    bad = folder / f"x{FORGED}.png"
    bad.write_text("not an image")
    answer = http.post("/features", json={"images": [str(bad)]}).raise_for_status()
    assert answer.status_code == 200
    poll(lambda: "Cannot prepare" in server.log(), 30, "the decode failure to be logged")
    log = server.log()
    assert not any(line.startswith("[ERROR] forged") for line in _lines(log)), log[-2000:]
    assert "\x1b" not in log
    assert "\\n[ERROR] forged\\x1b[2J" in log  # the name is there, escaped


def _cli(*args: str) -> str:
    run = subprocess.run(
        [sys.executable, "-m", "vggt_cache.service.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    return run.stdout + run.stderr


def test_names_with_newlines_and_escapes_reach_no_terminal_raw_through_status_and_verify(server, http, root):
    data = root / f"evil-cli{FORGED}"
    write_images(data, [f"a{FORGED}.png"])
    answer = http.post("/precompute", json={"data_root": str(data), "skip_existing": True}).raise_for_status()
    wait_job(http, answer.json()["job_id"])
    write_images(data, [f"b{FORGED}.png"], seed=1)  # no entry yet: verify lists it

    status, verify = _cli("status", "--server", server.url), _cli("verify", str(data), "--server", server.url)
    for out in (status, verify):
        assert "\x1b" not in out, out
        assert not any(line.startswith("[ERROR] forged") for line in _lines(out)), out
    assert "evil-cli\\n[ERROR] forged\\x1b[2J" in status
    assert "b\\n[ERROR] forged\\x1b[2J.png" in verify  # listed, escaped


def test_a_sample_outside_the_roots_answers_the_same_whether_it_exists_or_not(server, http, root, tmp_path):
    outside = tmp_path / "outside"
    write_images(outside, ["exists.png"])
    data = root / "oracle"
    data.mkdir()
    climb = "../" * 40 + str(outside / "exists.png")[1:]  # relative, through `..`, to the same file
    lines = [{"image": str(outside / "exists.png")}, {"image": str(outside / "absent.png")}, {"image": climb}]
    (data / "train.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))

    dry = http.post("/precompute", json={"data_root": str(data), "dry_run": True}).raise_for_status().json()
    # refused (the climb is `exists`), none "not found"
    assert (dry["plan"]["problems"], dry["plan"]["refused"]) == (0, 2)
    answer = http.post("/precompute", json={"data_root": str(data)}).raise_for_status()
    view = wait_job(http, answer.json()["job_id"])
    by_image = {}
    for f in view["failures"]:
        by_image.setdefault(f["image"], set()).add(f["reason"])
    exists, absent = str(outside / "exists.png"), str(outside / "absent.png")
    assert set(by_image) == {exists, absent} and view["failed"] == 2
    assert by_image[exists] == {f"path is outside the allowed roots: {exists}"}
    assert by_image[absent] == {f"path is outside the allowed roots: {absent}"}

    answers = [http.post("/features", json={"images": [str(outside / name)]}) for name in ("exists.png", "absent.png")]
    assert [a.status_code for a in answers] == [403, 403]
    assert answers[0].json()["detail"].replace("exists", "absent") == answers[1].json()["detail"]


def test_an_absolute_data_path_must_stay_inside_the_roots(http, root, tmp_path):
    outside = tmp_path / "elsewhere"
    write_images(outside, ["exists.png"])
    data = root / "data-path"
    data.mkdir()
    (data / "train.jsonl").write_text(json.dumps({"image": "exists.png"}) + "\n")
    for dry_run in (True, False):
        answer = http.post("/precompute", json={"data_root": str(data), "data_path": str(outside), "dry_run": dry_run})
        assert answer.status_code == 403, answer.text
        assert "outside the allowed roots" in answer.json()["detail"]
    inside = http.post("/precompute", json={"data_root": str(data), "data_path": ".", "dry_run": True})
    assert inside.status_code == 200, inside.text
