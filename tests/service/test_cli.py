"""The `vggt-cache` command line, run as a subprocess the way users run it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from vggt_cache.client.cachefile import Outcome, read_entry
from vggt_cache.client.manifest import MANIFEST_NAME
from vggt_cache.client.spec import FeatureSpec

from helpers.cli import cli
from helpers.service import REPO, TINY_MODEL, cache_files, done, free_port, wait_job, write_images


def make_data_root(folder: Path) -> list[str]:
    """Seed-style samples over five tiny images; returns the images."""
    images = write_images(folder / "images", [f"{n}.png" for n in "abcde"], size=(28, 42))
    samples = [
        {"images": ["images/a.png", "images/b.png"]},
        {"image": "images/c.png"},
        {"history_images": ["images/d.png"], "current_image": "images/e.png"},
    ]
    (folder / "train.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    return images


def manifest_spec(data_root: Path) -> tuple[dict, FeatureSpec]:
    manifest = json.loads((data_root / MANIFEST_NAME).read_text())
    return manifest, FeatureSpec.from_dict(manifest["spec"])


def test_precompute_in_process_then_skip_existing(tmp_path: Path) -> None:
    data_root, state_dir = tmp_path / "data", tmp_path / "state"
    images = make_data_root(data_root)
    # No --device: auto, which is the CPU here unless a GPU is visible.
    args = (
        "precompute",
        "--data_root",
        str(data_root),
        "--vggt_model_path",
        str(TINY_MODEL),
        "--batch_size",
        "4",
        "--skip_existing",
        "--verify",
        "--size",
        "56",
        "--state-dir",
        str(state_dir),
    )

    first = cli(*args)
    assert first.returncode == 0, first.stdout
    assert "[INFO] --device auto: " in first.stdout
    assert "[INFO] finished: 5 total, 5 computed, 0 skipped, 0 failed" in first.stdout
    assert "[INFO] Verified: each of the 5 entries computed was read back and validated" in first.stdout
    assert "\r" not in first.stdout  # not a terminal: no bar frames
    manifest, spec = manifest_spec(data_root)
    assert (manifest["state"], manifest["computed"], manifest["failed"]) == ("finished", 5, 0)
    assert (manifest["verified"], manifest["verified_entries"]) == (True, 5)
    assert spec.size == 56 and spec.attention == "frame" and manifest["spec_digest"] == spec.digest
    assert all(read_entry(image, spec).outcome is Outcome.HIT for image in images)

    second = cli(*args, "--model_path", "/models/Qwen2.5-VL-3B-Instruct")
    assert second.returncode == 0, second.stdout
    assert "--model_path /models/Qwen2.5-VL-3B-Instruct is not needed" in second.stdout
    assert "[INFO] finished: 5 total, 0 computed, 5 skipped, 0 failed" in second.stdout
    assert manifest_spec(data_root)[0]["skipped"] == 5


@pytest.fixture(scope="module")
def served(service_server, tmp_path_factory: pytest.TempPathFactory):
    """A running service and a data root precomputed through it with `precompute --server`."""
    data_root = tmp_path_factory.mktemp("cli-served")
    images = make_data_root(data_root)
    server = service_server(data_root)
    run = cli("precompute", "--data_root", str(data_root), "--server", server.url, "--skip_existing")
    yield server, data_root, images, run
    server.stop()


def test_precompute_under_torchrun_shards_the_work_and_writes_one_manifest(tmp_path: Path) -> None:
    data_root = tmp_path / "data"
    images = write_images(data_root / "scene", [f"{i:02d}.png" for i in range(9)], size=(28, 42))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        "-m",
        "vggt_cache.service.cli",
        "precompute",
        "--data_root",
        str(data_root),
        "--vggt_model_path",
        str(TINY_MODEL),
        "--device",
        "cpu",
        "--batch_size",
        "2",
        "--size",
        "56",
        "--state-dir",
        str(tmp_path / "state"),
    ]
    proc = subprocess.run(
        cmd,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=240,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "Rank 0 of 2" in proc.stdout and "Rank 1 of 2" in proc.stdout
    manifest, spec = manifest_spec(data_root)
    assert (manifest["ranks"], manifest["total"], manifest["computed"], manifest["failed"]) == (2, 9, 9, 0)
    plan = manifest["plan"]  # the ranks' plans in one: each planned its share against 1/2 of the free space
    assert (plan["ranks"], plan["entries"], plan["to_compute"], plan["source"]["samples"]) == (2, 9, 9, 9)
    assert all(read_entry(image, spec).outcome is Outcome.HIT for image in images)
    assert {p.name for p in (tmp_path / "state").iterdir()} == {"rank0", "rank1"}


def test_precompute_through_a_server(served) -> None:
    server, data_root, images, run = served
    assert run.returncode == 0, run.stdout
    assert f"submitted to {server.url}" in run.stdout
    assert "[INFO] finished: 5 total, 5 computed, 0 skipped, 0 failed" in run.stdout
    manifest, spec = manifest_spec(data_root)
    assert manifest["computed"] == 5 and len(cache_files(data_root)) == 5
    assert all(read_entry(image, spec).outcome is Outcome.HIT for image in images)


def test_status_prints_the_job(served) -> None:
    server, data_root, _, _ = served
    run = cli("status", "--server", server.url)
    assert run.returncode == 0, run.stdout
    assert f"service  {server.url}  state=ready" in run.stdout
    assert "engine   queued 0 on demand, 0 bulk; " in run.stdout
    assert "{" not in run.stdout  # readable text, no Python dicts
    as_json = json.loads(cli("status", "--server", server.url, "--json").stdout)
    job_line = next(line for line in run.stdout.splitlines() if line.startswith("job "))
    assert job_line.startswith(f"job {as_json['jobs'][0]['job_id']} ")  # the whole id: it is what DELETE takes
    assert "finished" in job_line and "100.0%" in job_line and "5 computed" in job_line
    assert job_line.endswith(str(data_root))
    assert as_json["jobs"][0]["data_root"] == str(data_root)


def test_verify_passes_then_reports_a_truncated_entry(served) -> None:
    _, data_root, images, _ = served
    ok = cli("verify", str(data_root))
    assert ok.returncode == 0, ok.stdout
    assert "hit 5" in ok.stdout

    entry = Path(images[2] + ".vggt_cache.pt")
    entry.write_bytes(entry.read_bytes()[:100])
    bad = cli("verify", str(data_root))
    assert bad.returncode == 1, bad.stdout
    assert "hit 4" in bad.stdout and "corrupt 1" in bad.stdout
    assert f"corrupt       {images[2]}:" in bad.stdout


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_serve_cleanly_mid_job(service_server, tmp_path: Path, sig: signal.Signals) -> None:
    write_images(tmp_path / "frames", [f"f{i:03d}.png" for i in range(200)])
    server = service_server(tmp_path, "--max-batch-frames", "2")
    with httpx.Client(base_url=server.url, timeout=30) as http:
        job_id = http.post("/precompute", json={"data_root": str(tmp_path)}).json()["job_id"]
        wait_job(http, job_id, until=lambda view: done(view) > 0)
    server.proc.send_signal(sig)
    assert server.proc.wait(30) == 0, server.log()
    log = server.log()
    assert "[INFO] Shutting down" in log
    assert f"Job {job_id} paused at" in log  # not finished: the next start resumes it
    assert log.rstrip().endswith("[INFO] Stopped")


def test_spec_flags_beat_variables_and_at_each_level_fields_beat_the_preset(monkeypatch) -> None:
    from vggt_cache.service.cli import build_parser
    from vggt_cache.service.specflags import spec_options

    def options(*argv: str) -> dict:
        return spec_options(build_parser().parse_args(["serve", "--allowed-root", "/data", *argv]))

    for name in ("ATTENTION", "SIZE", "PRESET", "REFERENCE_FRAME", "PREPROCESS"):
        monkeypatch.delenv(f"VGGT_CACHE_{name}", raising=False)
    assert options() == {}
    assert options("--preset", "newjanusvln") == {
        "attention": "causal",
        "preprocess": "pad",
        "size": 644,
        "align": 14,
        "reference_frame": "last",
        "layers": (-2,),
        "tokens": "patch",
        "dtype": "bfloat16",
    }
    assert options("--preset", "janusvln", "--size", "518")["size"] == 518
    monkeypatch.setenv("VGGT_CACHE_SIZE", "504")
    monkeypatch.setenv("VGGT_CACHE_REFERENCE_FRAME", "last")
    got = options("--preset", "janusvln")  # a preset typed on the command line ignores the environment's fields
    assert (got["size"], got["reference_frame"], got["preprocess"]) == (644, "first", "crop")
    monkeypatch.setenv("VGGT_CACHE_PRESET", "janusvln")
    got = options()  # all from the environment: its fields beat its preset
    assert (got["size"], got["reference_frame"], got["preprocess"]) == (504, "last", "crop")
    assert options("--size", "518")["size"] == 518
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--allowed-root", "/data", "--reference-frame", "middle"])


def other_value(name: str, default: object) -> tuple[str, object]:
    """A variable's text for setting `name` that is not its default, and the value it stands for."""
    if name == "file_mode":
        return "0640", 0o640
    if isinstance(default, bool):
        return "yes", True
    if isinstance(default, int):
        return str(default + 1), default + 1
    if isinstance(default, float):
        return str(default * 2), default * 2
    if isinstance(default, tuple):
        return ("/a:/b", ("/a", "/b")) if name == "allowed_roots" else ("a,b", ("a", "b"))
    return "other", "other"


def test_each_setting_is_one_flag_one_variable_one_check_and_one_status_entry(monkeypatch, capsys) -> None:
    from vggt_cache.service.cli import build_parser
    from vggt_cache.service.settings import SETTINGS, ServiceSettings

    flagged = {name: s for name, s in SETTINGS.items() if s.flag is not None}
    assert {"bulk_queue_batches", "hint_queue_batches", "frame_cache_frames"} <= set(flagged)  # once the engine's own
    expected = {}
    for name, s in flagged.items():
        text, expected[name] = other_value(name, getattr(ServiceSettings(), name))
        monkeypatch.setenv(s.env, text)
    settings = ServiceSettings.from_args(build_parser().parse_args(["serve"]))  # the variables alone: no flag
    assert {name: getattr(settings, name) for name in flagged} == expected
    settings.check()
    view = settings.view()
    assert view["file_mode"] == "0640" and view["allowed_roots"] == ["/a", "/b"] and "api_token" not in view
    flags = ServiceSettings.from_args(
        build_parser().parse_args(["serve", "--max-pending", "7", "--allowed-root", "/c"])
    )
    assert flags.max_pending_units == 7 and flags.max_batch_frames == expected["max_batch_frames"]  # a flag wins

    monkeypatch.setenv("VGGT_CACHE_HINT_QUEUE_BATCHES", "many")
    with pytest.raises(SystemExit) as stop:
        build_parser().parse_args(["serve"])
    assert stop.value.code == 2 and "--hint-queue-batches: invalid int value: 'many'" in capsys.readouterr().err
    for name, value, says in (
        ("bulk_queue_batches", 0, "--bulk-queue-batches must be a positive integer, got 0"),
        ("frame_cache_frames", -1, "--frame-cache-frames must be zero or more, got -1"),
        ("shutdown_grace_s", 0.0, "--shutdown-grace must be a positive number of seconds"),
        ("max_wait_ms", -1.0, "max_wait_ms must be zero or more, got -1.0"),
    ):
        with pytest.raises(ValueError, match=says):
            ServiceSettings(**{name: value}).check()
    readme = (REPO / "README.md").read_text()
    assert [s.flag for s in flagged.values() if not re.search(rf"{s.flag}(?![-\w])", readme)] == []  # documented
