"""The benchmarks run end to end at their smallest settings (they are never timed here) and count FLOPs right."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from helpers.service import REPO, TINY_MODEL

BENCHMARKS = REPO / "benchmarks"
RUN_TIMEOUT_S = 180
RATIO = r"= (\d+\.\d+)$"


def run_benchmark(script: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_precompute_prints_its_ratios_and_cleans_up(tmp_path: Path) -> None:
    out = run_benchmark(
        "precompute.py",
        "--model",
        str(TINY_MODEL),
        "--n",
        "5",
        "--batch-size",
        "2",
        "--size",
        "56",
        "--width",
        "64",
        "--height",
        "48",
        "--rounds",
        "1",
        "--device",
        "cpu",
        "--dir",
        str(tmp_path),
    )
    for name in ("ours/seed", "ours/limit"):
        match = re.search(rf"^{re.escape(name)} {RATIO}", out, re.M)
        assert match and float(match.group(1)) > 0, out
    for method in ("seed", "ours", "clips", "limit"):
        assert re.search(rf"^{method} \(.*\)\s+\d+\.\d+\s+\d+\.\d+\s+\d+\.\d+$", out, re.M), out
    assert list(tmp_path.iterdir()) == []  # images, cache files, job state: all removed


def test_precompute_json_with_a_random_model() -> None:
    out = run_benchmark(
        "precompute.py",
        "--embed-dim",
        "32",
        "--depth",
        "2",
        "--num-heads",
        "2",
        "--n",
        "3",
        "--batch-size",
        "2",
        "--size",
        "28",
        "--width",
        "56",
        "--height",
        "30",
        "--rounds",
        "2",
        "--device",
        "cpu",
        "--json",
    )
    result = json.loads(out)
    # 56x30 cropped at 28: width 28, height round(30 * 28 / 56 / 14) * 14 = 14.
    assert result["images"]["model_input"] == [3, 14, 28]
    assert result["entry_shape"] == [2, 64]  # 1x2 patches, 2 * embed_dim channels
    assert result["model"]["depth"] == 2 and result["spec"]["layers"] == [0]
    for method in ("seed", "ours", "clips", "limit"):
        assert len(result["seconds"][method]) == 2
        assert result["images_per_s"][method] == pytest.approx(3 / min(result["seconds"][method]), rel=1e-3)
    rate = result["images_per_s"]
    assert result["ratios"]["ours/seed"] == pytest.approx(rate["ours"] / rate["seed"], rel=1e-2)


def test_gpu_throughput_runs_tiny_on_cpu_and_writes_json(tmp_path: Path) -> None:
    out_path = tmp_path / "gpu.json"
    out = run_benchmark(
        "gpu_throughput.py",
        "--device",
        "cpu",
        "--tiny",
        "--sizes",
        "56",
        "--batches",
        "1,2",
        "--clip-batches",
        "1",
        "--iters",
        "1",
        "--warmup",
        "0",
        "--min-frames",
        "0",
        "--loop-images",
        "2",
        "--out",
        str(out_path),
    )
    for name in ("batched/one-by-one", "best/goal"):
        match = re.search(rf"^{re.escape(name)} {RATIO}", out, re.M)
        assert match and float(match.group(1)) > 0, out
    result = json.loads(out_path.read_text())
    rows = {(r["variant"], r["batch"], str(r["layers"])): r for r in result["rows"]}
    assert {key[0] for key in rows} == {
        "batched",
        "one-by-one",
        "all-layers",
        "fp32-weights",
        "janusvln",
        "janusvln-patches-once",
    }
    assert all(r["status"] == "ok" for r in result["rows"]), result["rows"]
    clips = [r for r in result["rows"] if r["variant"] == "janusvln"]
    assert sorted(r["attention_impl"] for r in clips) == ["chunked", "mask"]
    assert all(r["frames_per_s"] > 0 and r["clip_frames"] == 9 for r in clips)
    assert result["summary"]["chunked_over_mask"] > 0
    assert rows[("batched", 1, "[-2]")]["blocks"] == 1 and rows[("all-layers", 1, "all")]["blocks"] == 2
    assert result["summary"]["best_batched"]["variant"] == "batched"
    assert result["peak_tflops"] is None  # no peak is assumed for a CPU


@pytest.mark.parametrize(
    "attention, layers, frames, height, width",
    [
        ("frame", [-2], 1, 56, 56),
        ("frame", None, 1, 42, 70),
        ("sequence", None, 3, 42, 70),  # global attention over S*P tokens
        ("causal", [-2], 3, 56, 56),  # each frame against its prefix
    ],
)
def test_flop_formula_matches_torch_flop_counter(
    attention: str, layers: list[int] | None, frames: int, height: int, width: int
) -> None:
    sys.path.insert(0, str(BENCHMARKS))
    from vggt_cache.service.demo import DEMO_CONFIG

    from common import clip_flops, random_model

    loaded = random_model(DEMO_CONFIG, "cpu")
    images = torch.rand(1, frames, 3, height, width)
    # The math backend decomposes attention into matmuls, which the counter sees.
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        loaded.model(images, attention=attention, layers=layers)
    depth = loaded.config.depth
    blocks = depth if layers is None else max(i % depth for i in layers) + 1
    clip = 1 if attention == "frame" else frames
    expected = clip_flops(loaded.config, height, width, blocks, clip, attention) * (frames // clip)
    assert counter.get_total_flops() == expected


def test_precompute_runs_janusvln_samples_and_reports_decode_reuse() -> None:
    out = run_benchmark(
        "precompute.py",
        "--model",
        str(TINY_MODEL),
        "--preset",
        "newjanusvln",
        "--n",
        "10",
        "--batch-size",
        "18",
        "--size",
        "56",
        "--width",
        "64",
        "--height",
        "48",
        "--rounds",
        "1",
        "--device",
        "cpu",
        "--json",
    )
    result = json.loads(out)
    assert (result["samples"], result["frames_per_sample"]) == (10, 9)
    assert result["spec"]["preset"] == "newjanusvln" and result["spec"]["reference_frame"] == "last"
    assert result["decodes"] == {"seed": 90, "ours": 10, "ours_reused": 80}  # each of the 10 frames once
    assert result["patch_embeds"] == {"seed": 90, "ours": 10, "ours_reused": 80}  # and through DINOv2 once
    for method in ("seed", "ours", "clips", "limit"):
        assert result["frames_per_s"][method] == pytest.approx(9 * result["images_per_s"][method], rel=1e-2)


def test_clip_reports_memory_and_time_of_each_attention_implementation() -> None:
    out = run_benchmark("clip.py", "--device", "cpu", "--embed-dim", "32", "--num-heads", "2", "--size", "56", "--json")
    result = json.loads(out)
    assert set(result["results"]) == {"mask", "chunked"} and result["frames"] == 9
    for impl, r in result["results"].items():
        assert r["impl"] == impl and r["input"] == [1, 9, 3, 56, 56] and r["seconds"] > 0, r
    assert result["peak_mask_over_chunked"] is not None and result["time_mask_over_chunked"] > 0
    parts = result["clip_at_vggt_1b_depth_s"]
    assert set(parts) == {"decode (9 frames)", "dinov2 (9 frames)", "frame blocks", "global blocks", "write (1 entry)"}
    assert all(v > 0 for v in parts.values())


def test_loader_compares_every_way_under_both_allocator_policies() -> None:
    out = run_benchmark("loader.py", "--n", "4", "--rounds", "2")
    sections = re.split(r"^== allocator: ", out, flags=re.M)[1:]
    assert [s.split()[0] for s in sections] == ["default", "keep"], out
    for section in sections:
        for name in ("ours/raw", "ours/seed", "ours (mmap=True)/raw", "ours (mmap=True)/seed"):
            match = re.search(rf"^{re.escape(name)}\s*= (\d+\.\d+) median of 2 chunks", section, re.M)
            assert match and float(match.group(1)) > 0, section
        assert re.search(r"^check_crc: \d+\.\d+ median of 2 chunks", section, re.M), section


def test_plan_compares_a_plan_with_the_bare_walk_of_the_same_roots(tmp_path: Path) -> None:
    out = run_benchmark("plan.py", "--n", "40", "--no-strace", "--dir", str(tmp_path))
    for layout in ("episodes", "json"):
        row = re.search(
            rf"^{layout} 40\s+40\s+(\d+\.\d+)\s+(\d+\.\d+)\s+\d+\s+\d+\s+"  # samples, seconds, CPU
            rf"(\d+\.\d+)\s+(\d+\.\d+)\s+(\d+)\s+\d+\s+(\d+)$",  # job plan, first entry, state, RSS, job
            out,
            re.M,
        )
        assert row and float(row.group(1)) > 0 and float(row.group(2)) >= 0 and int(row.group(5)) > 0, out
        assert float(row.group(3)) >= float(row.group(4)), out  # a job's plan, and the wait for its first entry
        assert int(row.group(6)) > 0, out  # the RSS of the units a running job holds
        ratio = re.search(rf"^{layout} 40 ours/floor wall {RATIO}", out, re.M)
        assert ratio and float(ratio.group(1)) > 0, out
        # The same root computed: verify and a plan of it (the benchmark checks every entry is a hit / valid).
        computed = re.findall(rf"^{layout} 40\s+(\d+\.\d+)\s+(\d+)\s+(\d+\.\d+)\s+(\d+)$", out, re.M)
        assert len(computed) == 1 and all(float(v) > 0 for v in computed[0]), out
    assert "every image given a valid entry" in out
    assert "calls not counted" in out and "calls/sample" not in out  # --no-strace: no calls column
    assert list(tmp_path.iterdir()) == []  # the roots are removed


@pytest.mark.skipif(
    not os.environ.get("VGGT_CALLGRIND") or shutil.which("valgrind") is None,
    reason="~95 s under valgrind: set VGGT_CALLGRIND=1 (valgrind installed) to run it",
)
def test_plan_counts_the_instructions_of_the_plan_and_of_the_floor(tmp_path: Path) -> None:
    args = ("--n", "40", "--layout", "json", "--no-strace", "--instructions", "--dir", str(tmp_path))
    out = run_benchmark("plan.py", *args)
    row = re.search(r"^json 40\s+40\s+\d+\.\d+\s+\d+\.\d+\s+\d+\s+\d+\s+([\d,]+)\s+([\d,]+)\s", out, re.M)
    assert row, out
    ours, floor = (int(v.replace(",", "")) for v in row.groups())
    assert ours > floor > 0, out  # the measured part only: the imports alone are ~6 G instructions
    assert ours < 10_000_000, out
