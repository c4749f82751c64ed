"""JanusVLN-family fidelity: what the service writes for their data is what their training computes online.

Ground truth: `fixtures/janusvln` (JanusVLN's own aggregator and preprocessing, run as its
training loop runs VGGT: frame by frame with a fresh key/value cache, 644 px, reversed for
`reference_frame="last"`). Our own streamed computation (`streamed` below) covers the
combinations the fixture does not (each layout with each reference frame). The service's app runs
in-process (`app_in_process`): what is tested is what it computes, not its transport.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vggt_cache.client.cache import FeatureCache
from vggt_cache.client.cachefile import Outcome, read_entry
from vggt_cache.client.spec import FeatureSpec, matching_preset
from vggt_cache.service.jobs.view import TERMINAL
from vggt_cache.service.model import KVCache, load_aggregator
from vggt_cache.service.preprocess import preprocess
from vggt_cache.service.samples import find_samples
from vggt_cache.training.data import load_samples

from helpers.service import FIXTURES, apoll, app_in_process, spec_of_status, write_images

JANUS = FIXTURES / "janusvln"
TINY = FIXTURES / "vggt_tiny"


def streamed(model: torch.nn.Module, frames: torch.Tensor, spec: FeatureSpec) -> torch.Tensor:
    """Frames ``[S, 3, H, W]`` in sample order streamed one per call with a fresh key/value cache, as
    JanusVLN's training loop does; the last streamed frame's patch tokens at the spec's layer, float32."""
    order = frames.flip(0) if spec.reference_frame == "last" else frames
    cache = KVCache()
    with torch.no_grad():
        for frame in order:
            outputs, start = model(frame[None, None], attention="causal", layers=list(spec.layers), kv_cache=cache)
    return outputs[0][0, 0, start:]  # [P, 2C]


def assert_close(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert got.shape == expected.shape, what
    scale = expected.abs().max().item()
    error = (got.float() - expected.float()).abs().max().item()
    assert error <= 1e-4 * scale, f"{what}: max error {error:.3g} > 1e-4 x {scale:.3g}"


async def run_job(http, data_root: Path, **options) -> dict:
    """A `/precompute` job of `data_root`, run to its end: its view, with the service's spec."""
    r = await http.post("/precompute", json={"data_root": str(data_root), **options})
    assert r.status_code == 202, r.text

    async def ended() -> dict | None:
        view = (await http.get(f"/jobs/{r.json()['job_id']}")).raise_for_status().json()
        return view if view["state"] in TERMINAL else None

    view = await apoll(ended, 240, f"job {r.json()['job_id']} to end")
    return {**view, "spec": spec_of_status((await http.get("/status")).raise_for_status().json())}


@pytest.mark.anyio
@pytest.mark.parametrize("layout, preset", [("new", "newjanusvln"), ("orig", "janusvln")])
async def test_the_service_computes_what_janusvln_training_computes(tmp_path, tmp_path_factory, layout, preset):
    root = tmp_path / layout
    shutil.copytree(JANUS / layout, root)
    expected = load_file(JANUS / "expected.safetensors")
    samples = json.loads((JANUS / "samples.json").read_text())[layout]
    clips = [tuple(str(root / p) for p in sample) for sample in samples]

    async with app_in_process(
        tmp_path,
        tmp_path_factory.mktemp("state"),
        model=str(JANUS / "model"),
        preset=preset,
        spec={"size": 644, "dtype": "float32"},
    ) as http:
        view = await run_job(http, root)
    spec = view["spec"]
    assert spec.attention == "causal" and spec.size == 644
    assert spec.reference_frame == ("last" if layout == "new" else "first")
    assert spec.preprocess == ("pad" if layout == "new" else "crop")
    assert (view["state"], view["computed"], view["failed"]) == ("finished", len(samples), 0)
    assert view["plan"]["source"] == {
        "source": "episodes" if layout == "new" else "json",
        "files": 1,
        "samples": len(samples),
        "max_history_images": 8 if layout == "new" else None,
        "ignored_episode_folders": 0,
        "sample_files": None,
    }
    manifest = json.loads((root / "vggt_cache_manifest.json").read_text())
    assert manifest["plan"]["source"] == view["plan"]["source"]
    # The preset with one field overridden (float32 storage, for the comparison) is no longer the preset.
    assert manifest["preset"] is None and matching_preset(dataclasses.replace(spec, dtype="bfloat16")) == preset

    model = load_aggregator(str(JANUS / "model")).model
    against_ground_truth = 0
    for clip, sample in zip(clips, samples, strict=True):
        entry = read_entry(clip[-1], spec, context_frames=clip, mmap=False)  # filed under the current view
        assert entry.outcome is Outcome.HIT, entry.reason
        assert entry.meta["grid"] == ([46, 46] if layout == "new" else [35, 46])  # 644x644 pad, 490x644 crop
        key = f"{layout}:{sample[-1]}"
        if key in expected:  # JanusVLN's own output (the fixture keeps a subset: see its README)
            assert_close(entry.features, expected[key], key)
            against_ground_truth += 1
        else:
            frames = torch.stack([preprocess(p, spec.preprocess, spec.size) for p in clip])
            assert_close(entry.features, streamed(model, frames, spec), key)
    assert against_ground_truth == {"new": 4, "orig": 3}[layout]

    # Training reads them back with the service gone, asking for exactly the clips the job computed.
    assert [s.clip for s in load_samples(str(root))] == clips
    with FeatureCache(spec=spec, fallback="error") as cache:
        got = [cache.get_sample(clip) for clip in clips]
        assert cache.stats["hits"] == len(clips) and cache.stats["misses"] == 0
    assert_close(got[-1], expected[f"{layout}:{samples[-1][-1]}"], "FeatureCache.get_sample")


def make_layouts(root: Path, steps: int = 12) -> dict[str, list[tuple[str, ...]]]:
    """Both layouts over the same 12 frames: NewJanusVLN episode folder and a JanusVLN JSON array."""
    frames = write_images(
        root / "new" / "ep_0001", [f"step_{n}_MOVE_FORWARD.png" for n in range(steps)], size=(64, 48), seed=3
    )
    orig = write_images(
        root / "orig" / "traj" / "7", [f"{n:03d}_turn_left.png" for n in range(steps)], size=(64, 48), seed=3
    )
    new_clips, orig_clips = [], []
    for j in range(steps):  # the rule written out again, independently of service.samples
        if j <= 8:
            new_clips.append(tuple([frames[0]] * (8 - j) + frames[: j + 1]))
            orig_clips.append(tuple(orig[: j + 1]))
        else:
            picks = np.linspace(0, j, 9, dtype=int)
            new_clips.append(tuple(frames[i] for i in picks))
            orig_clips.append(tuple(orig[i] for i in picks))
    annotations = [
        {
            "id": f"7/{Path(c[-1]).name}",
            "conversations": [{"from": "human", "value": "<image> go"}, {"from": "gpt", "value": "STOP"}],
            "images": [str(Path(p).relative_to(root / "orig")) for p in c],
        }
        for c in orig_clips
    ]
    (root / "orig" / "train.json").write_text(json.dumps(annotations))
    return {"new": new_clips, "orig": orig_clips}


@pytest.mark.anyio
@pytest.mark.parametrize("reference", ["first", "last"])
async def test_every_sample_of_both_layouts_equals_its_streamed_computation(tmp_path, tmp_path_factory, reference):
    layouts = make_layouts(tmp_path)
    options = {"attention": "causal", "reference_frame": reference, "preprocess": "pad", "dtype": "float32"}
    async with app_in_process(tmp_path, tmp_path_factory.mktemp("state"), spec=options) as http:
        views = {layout: await run_job(http, tmp_path / layout) for layout in layouts}
    model = load_aggregator(str(TINY)).model
    for layout, clips in layouts.items():
        assert [s.frames for s in find_samples(str(tmp_path / layout)).samples] == list(clips)
        view = views[layout]
        spec = view["spec"]
        assert spec.reference_frame == reference
        assert (view["state"], view["computed"], view["failed"]) == ("finished", 12, 0)
        for clip in clips:
            entry = read_entry(clip[-1], spec, context_frames=clip, mmap=False)
            assert entry.outcome is Outcome.HIT, entry.reason
            frames = torch.stack([preprocess(p, "pad", 56) for p in clip])  # [9, 3, 56, 56]
            assert_close(entry.features, streamed(model, frames, spec), f"{layout} {Path(clip[-1]).name}")
        assert [s.clip for s in load_samples(str(tmp_path / layout))] == list(clips)
    # The two reference frames are two specs: neither entry is ever served for the other.
    other = FeatureSpec(**{**spec.to_dict(), "reference_frame": "last" if reference == "first" else "first"})
    clip = layouts["new"][-1]
    assert read_entry(clip[-1], other, context_frames=clip).outcome is Outcome.SPEC_MISMATCH
