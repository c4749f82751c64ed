"""Plans before spending: `--dry-run` figures, and jobs that refuse to start when their entries would not fit."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx

from vggt_cache.client.cachefile import CACHE_SUFFIX
from vggt_cache.service import cli
from vggt_cache.service.jobs import plan

from helpers.service import REPO, TINY_MODEL, cache_files, tmpfs, wait_job, write_images

TINY = TINY_MODEL
STEPS = 12
# The tiny model's entry at --size 56: 4x4 patches x 128 channels (2 x embed 64) x 2 bytes (bfloat16).
TENSOR_BYTES = 16 * 128 * 2


def episode_root(folder: Path) -> Path:
    write_images(folder / "ep_0001", [f"step_{n}_TURN_LEFT.png" for n in range(STEPS)], size=(64, 48))
    return folder


def precompute(*args: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "vggt_cache.service.cli",
        "precompute",
        "--vggt_model_path",
        str(TINY),
        "--device",
        "cpu",
        "--preset",
        "newjanusvln",
        "--size",
        "56",
        *args,
    ]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)


def figures(output: str) -> dict[str, int]:
    found = {
        "samples": r"^samples\s+(\d+)",
        "entries": r"^entries\s+(\d+)",
        "valid": r"(\d+) valid",
        "to_compute": r"(\d+) to compute",
        "bytes": r"^to write\s+([\d,]+) bytes",
        "free": r"^free\s+([\d,]+) bytes",
    }
    return {k: int(re.search(p, output, re.M).group(1).replace(",", "")) for k, p in found.items()}


def test_dry_run_figures_match_what_the_job_then_writes(tmp_path):
    root = episode_root(tmp_path / "data")
    state = ["--state-dir", str(tmp_path / "state")]
    dry = precompute("--data_root", str(root), "--skip_existing", "--dry-run", *state)
    assert dry.returncode == 0, dry.stderr
    assert "Loading VGGT model" not in dry.stderr and "Dry run" in dry.stderr
    before = figures(dry.stdout)
    assert before["samples"] == before["entries"] == before["to_compute"] == STEPS and before["valid"] == 0
    assert before["bytes"] == STEPS * (TENSOR_BYTES + plan.ENTRY_OVERHEAD_BYTES)
    assert before["free"] > 0 and "from 1 episode folder(s), max_history_images 8" in dry.stdout
    assert cache_files(root) == [] and not (root / "vggt_cache_manifest.json").exists()  # nothing written

    run = precompute("--data_root", str(root), "--skip_existing", *state)
    assert run.returncode == 0, run.stderr
    sizes = [p.stat().st_size for p in cache_files(root)]
    assert len(sizes) == STEPS
    # The estimate errs large, by less than the per-entry overhead it allows for.
    assert all(TENSOR_BYTES < size <= TENSOR_BYTES + plan.ENTRY_OVERHEAD_BYTES for size in sizes), sizes

    # verify walks the episode with the history rule the manifest records, and finds every entry.
    verify = subprocess.run(
        [sys.executable, "-m", "vggt_cache.service.cli", "verify", str(root)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert verify.returncode == 0 and f"hit {STEPS}, missing 0" in verify.stdout, verify.stdout + verify.stderr

    after = figures(precompute("--data_root", str(root), "--skip_existing", "--dry-run", *state).stdout)
    assert (after["valid"], after["to_compute"], after["bytes"]) == (STEPS, 0, 0)
    without_skip = figures(precompute("--data_root", str(root), "--no-skip-existing", "--dry-run", *state).stdout)
    assert (without_skip["valid"], without_skip["to_compute"]) == (STEPS, STEPS)
    # Recomputing replaces files of about the same size: only the difference is new, never more than the overhead.
    assert 0 <= without_skip["bytes"] <= STEPS * plan.ENTRY_OVERHEAD_BYTES
    other_spec = figures(
        precompute("--data_root", str(root), "--skip_existing", "--dry-run", "--dtype", "float32", *state).stdout
    )
    assert (other_spec["valid"], other_spec["to_compute"]) == (0, STEPS)
    assert 0 < other_spec["bytes"] <= STEPS * (TENSOR_BYTES + plan.ENTRY_OVERHEAD_BYTES)  # twice the tensor


def test_a_dry_run_counts_images_over_max_image_bytes_unreadable(tmp_path):
    root = episode_root(tmp_path / "data")
    size = (root / "ep_0001" / "step_0_TURN_LEFT.png").stat().st_size
    state = ["--state-dir", str(tmp_path / "state")]
    within = precompute("--data_root", str(root), "--dry-run", "--max-image-bytes", str(100 * size), *state)
    over = precompute("--data_root", str(root), "--dry-run", "--max-image-bytes", str(size // 2), *state)
    assert within.returncode == over.returncode == 0, within.stderr + over.stderr
    assert "unreadable" not in within.stdout, within.stdout  # no problems line at all
    assert f" {STEPS} unreadable image(s)" in over.stdout, over.stdout


def test_a_job_whose_entries_would_not_fit_refuses_to_start_unless_forced(tmp_path, monkeypatch, capsys):
    root = episode_root(tmp_path / "data")
    monkeypatch.setattr(plan, "free_bytes", lambda path: 50_000)  # 12 entries need 98 kB
    args = [
        "precompute",
        "--data_root",
        str(root),
        "--vggt_model_path",
        str(TINY),
        "--device",
        "cpu",
        "--preset",
        "newjanusvln",
        "--size",
        "56",
        "--state-dir",
        str(tmp_path / "state"),
    ]
    assert cli.main(args) == 2  # refused before any work: a setup problem, as every such refusal
    assert cache_files(root) == []
    err = capsys.readouterr().err
    assert "12 to compute of 8.2 kB each; 98.3 kB to write; 50.0 kB free" in err and "--force" in err
    assert cli.main([*args, "--force"]) == 0
    assert len(cache_files(root)) == STEPS


def test_the_service_plans_on_request_and_refuses_a_job_that_cannot_fit(tmp_path, service_server):
    with tmpfs(tmp_path / "small", "400k") as small:
        root = episode_root(small / "data")
        service = service_server(small, "--preset", "newjanusvln", "--size", "644")  # 541 kB an entry
        with httpx.Client(base_url=service.url, timeout=60) as http:
            dry = http.post("/precompute", json={"data_root": str(root), "dry_run": True})
            assert dry.status_code == 200, dry.text
            body = dry.json()
            assert body["plan"]["to_compute"] == STEPS and body["plan"]["fits"] is False
            assert body["plan"]["bytes_to_write"] == STEPS * (2116 * 128 * 2 + plan.ENTRY_OVERHEAD_BYTES)
            status = http.get("/status").json()
            assert status["jobs"] == [] and status["preset"] == "newjanusvln"  # a dry run is no job
            remote = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "vggt_cache.service.cli",
                    "precompute",
                    "--server",
                    service.url,
                    "--data_root",
                    str(root),
                    "--dry-run",
                ],
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert remote.returncode == 0 and "DOES NOT FIT" in remote.stdout, remote.stdout + remote.stderr
            assert figures(remote.stdout)["bytes"] == body["plan"]["bytes_to_write"]

            r = http.post("/precompute", json={"data_root": str(root)})
            assert r.status_code == 202
            view = wait_job(http, r.json()["job_id"])
            assert view["state"] == "failed" and view["computed"] == 0
            assert "not enough free space" in view["error"] and "6.5 MB to write" in view["error"]
            assert view["plan"]["fits"] is False
        assert not any(p.name.endswith(CACHE_SUFFIX) for p in root.rglob("*"))
        service.stop()
        shutil.rmtree(root)
