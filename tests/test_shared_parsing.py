"""Sample files and data roots that others wrote, against real services on 127.0.0.1 (issue 18, items 6-7).

A sample file may be huge, nested past the parser's recursion limit, not UTF-8 or not JSON; a
folder may be unreadable to the service or lie past PATH_MAX. Each is a problem of the plan,
counted and shown (dry run, job view, manifest, verify), and the rest of the root goes on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from vggt_cache.client.manifest import read_manifest
from vggt_cache.client.text import MAX_TEXT
from vggt_cache.service.samples import MAX_HISTORY_IMAGES

from helpers.service import REPO, TINY_MODEL, RunningService, start_service, wait_job, write_images

SAMPLE_LIMIT = 64 * 1024  # the service's --max-sample-bytes here
# The service runs without the capabilities that let root read any folder, so a mode-000 folder is
# unreadable to it as to any service account (the tests run as root in CI).
NO_DAC = (
    ["setpriv", "--inh-caps=-dac_override,-dac_read_search", "--bounding-set=-dac_override,-dac_read_search"]
    if os.geteuid() == 0
    else []
)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("shared-root")


@pytest.fixture(scope="module")
def server(root: Path) -> Iterator[RunningService]:
    service = start_service(root, "--max-sample-bytes", str(SAMPLE_LIMIT), prefix=NO_DAC)
    yield service
    service.stop()


def dry_run(http: httpx.Client, data_root: Path, **options: object) -> dict:
    body = {"data_root": str(data_root), "dry_run": True, **options}
    return http.post("/precompute", json=body).raise_for_status().json()["plan"]


def run_job(http: httpx.Client, data_root: Path) -> dict:
    job_id = http.post("/precompute", json={"data_root": str(data_root)}).raise_for_status().json()["job_id"]
    return wait_job(http, job_id, timeout=60)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vggt_cache.service.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_malformed_and_oversized_sample_files_are_plan_problems_and_the_rest_is_computed(
    http: httpx.Client, root: Path
) -> None:
    data = root / "samples"
    write_images(data, ["a.png", "b.png", "c.png"], seed=1)
    (data / "good.jsonl").write_text(json.dumps({"image": "a.png"}) + "\n")
    (data / "deep.json").write_text("[" * 100_000)  # RecursionError in json, whatever its first 64 KB say
    long_line = json.dumps({"image": "b.png", "instruction": "x" * (2 * SAMPLE_LIMIT)})
    (data / "long.jsonl").write_text(long_line + "\n" + json.dumps({"image": "b.png"}) + "\n")
    (data / "utf8.json").write_bytes(b'[{"image": "c.png"}, {"image": "\xff\xfe.png"}]')
    big = [{"image": "a.png"}, {"image": "a.png", "instruction": "x" * (2 * SAMPLE_LIMIT)}]
    (data / "big.json").write_text(json.dumps(big))

    plan = dry_run(http, data)
    reasons = {p["where"]: p["reason"] for p in plan["first_problems"]}
    assert plan["problems"] == 4 and len(reasons) == 4, plan
    assert "nested too deeply" in reasons[f"{data}/deep.json[0]"]
    assert "more than 65536 bytes" in reasons[f"{data}/long.jsonl:1"]
    assert "not valid UTF-8" in reasons[f"{data}/utf8.json[1]"]
    assert "more than 65536 bytes" in reasons[f"{data}/big.json[1]"]
    assert plan["source"]["samples"] == 4 and plan["entries"] == 3  # a (twice), b, c

    view = run_job(http, data)
    assert view["state"] == "finished" and view["computed"] == 3 and view["failed"] == 4, view
    assert {f["image"] for f in view["failures"]} == set(reasons)
    manifest = read_manifest(str(data))
    assert {f["image"] for f in manifest["failures"]} == set(reasons)
    verified = cli("verify", str(data), "--json", "--max-sample-bytes", str(SAMPLE_LIMIT))
    assert verified.returncode == 1, verified.stderr
    report = json.loads(verified.stdout)
    assert report["counts"]["hit"] == 3 and {p["image"] for p in report["problems"]} == set(reasons)


def test_one_bound_on_the_history_length_in_every_entry_point(http: httpx.Client, root: Path) -> None:
    data = root / "episodes"
    write_images(data / "ep", ["step_0_MOVE_FORWARD.png", "step_1_TURN_LEFT.png"], seed=2)
    too_long = MAX_HISTORY_IMAGES + 1
    response = http.post("/precompute", json={"data_root": str(data), "max_history_images": too_long})
    assert response.status_code == 422 and f"at most {MAX_HISTORY_IMAGES}" in response.text, response.text
    assert dry_run(http, data, max_history_images=MAX_HISTORY_IMAGES)["entries"] == 2
    for command in (
        ["precompute", "--data_root", str(data), "--dry-run", "--vggt_model_path", str(TINY_MODEL)],
        ["verify", str(data)],
    ):
        result = cli(*command, "--max_history_images", "1000000000")
        assert result.returncode == 2 and f"at most {MAX_HISTORY_IMAGES}" in result.stderr, result.stderr
        assert "MemoryError" not in result.stderr and "Traceback" not in result.stderr


def deep_chain(top: Path, levels: int, name: str) -> Path:
    """`levels` nested folders named `name` under `top`, made through descriptors (the path may pass PATH_MAX)."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(levels):
            os.mkdir(name, dir_fd=fd)
            child = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
    finally:
        os.close(fd)
    return top.joinpath(*[name] * levels)


def test_folders_the_walk_cannot_read_are_plan_problems_shown_everywhere(
    http: httpx.Client, root: Path, tmp_path: Path
) -> None:
    data = root / "walk"
    write_images(data / "open", ["a.png"], seed=3)
    locked = data / "locked"
    write_images(locked, ["hidden.png"], seed=4)
    os.symlink("loop", data / "loop")  # a symlink to itself: its kind cannot be told
    long_name = "d" * 200
    mid = deep_chain(data, 10, long_name)  # inside PATH_MAX: walked, containment carried down
    write_images(mid, ["deep.png"], seed=5)
    write_images(tmp_path, ["outside.png"], seed=6)
    os.symlink(tmp_path, mid / "out")  # leads out of the roots: neither followed nor a problem
    os.symlink(data, mid / "back")  # a link back up the tree: cut, not walked again
    deep_chain(mid, 15, long_name)  # past PATH_MAX from level ~20: cannot be listed by path
    os.chmod(locked, 0)
    try:
        plan = dry_run(http, data)
        view = run_job(http, data)
    finally:
        os.chmod(locked, 0o755)

    reasons = {p["where"]: p["reason"] for p in plan["first_problems"]}
    assert plan["unlisted"] == 3 and plan["problems"] == 3, plan
    assert "Permission denied" in reasons[str(locked)] and "symbolic links" in reasons[str(data / "loop")]
    too_long = [w for w in reasons if "too long" in reasons[w]]
    # Its path (over 4,000 characters) is stored and shown bounded: head and tail around a marker.
    assert len(too_long) == 1 and len(too_long[0]) <= MAX_TEXT and too_long[0].startswith(str(mid)[: MAX_TEXT // 4])
    assert plan["source"]["samples"] == 2 and plan["entries"] == 2  # open/a.png, the deep one; nothing outside

    assert view["state"] == "finished" and view["computed"] == 2 and view["failed"] == 3, view
    assert {f["image"] for f in view["failures"]} == set(reasons)
    assert {f["image"] for f in read_manifest(str(data))["failures"]} == set(reasons)
    assert (mid / "deep.png.vggt_cache.pt").is_file() and not (tmp_path / "outside.png.vggt_cache.pt").exists()
