"""Training with the cache, end to end: `python -m vggt_cache.training.train --tiny` against a real service on
127.0.0.1.

The service runs the VGGT fixture with the same spec as training (pad, 56 px,
28-aligned). Features it writes must be the features training would compute itself.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from transformers import Qwen2_5_VLForConditionalGeneration, TrainingArguments

from vggt_cache.client.cache import FeatureCache
from vggt_cache.client.cachefile import Outcome, cache_path, read_entry
from vggt_cache.service.model import load_aggregator
from vggt_cache.service.model.features import entry_features
from vggt_cache.training.arguments import CacheArguments, DataArguments, feature_spec
from vggt_cache.training.data import VGGTCollator, VLNDataset, load_samples
from vggt_cache.training.model import MERGER_FILE, Qwen25VLWithVGGT
from vggt_cache.training.train import VGGTTrainer, parse_args, tiny_config, tiny_image_processor, tiny_tokenizer

from helpers.service import REPO, TINY_MODEL

FIXTURE = TINY_MODEL
SCRIPTS = REPO / "training" / "scripts"
ENABLED = "[INFO] VGGT feature cache enabled (loading from image directories)"
TRAIN_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def loaded():
    return load_aggregator(str(FIXTURE))


def make_data_root(root: Path, clips: int = 4, frames: int = 3) -> list[list[str]]:
    """``clips`` scenes of random images (non-square, so pad mode pads) and one sample per scene."""
    rng = np.random.default_rng(0)
    out = []
    lines = []
    for c in range(clips):
        scene = root / f"scene{c:03d}"
        scene.mkdir(parents=True)
        paths = []
        for t in range(frames - c % 2):  # clips of 3 and 2 frames
            path = scene / f"img_{t:04d}.png"
            Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(path)
            paths.append(str(path))
        out.append(paths)
        rel = [os.path.relpath(p, root) for p in paths]
        lines.append(
            json.dumps(
                {
                    "history_images": rel[:-1],
                    "current_image": rel[-1],
                    "instruction": f"Go to room {c}.",
                    "answer": "forward 25 cm",
                }
            )
        )
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    return out


def spec_for(loaded, attention: str):
    return feature_spec(
        loaded, DataArguments(image_size=56), CacheArguments(vggt_attention=attention, use_vggt_cache=False)
    )


def serve_args(attention: str) -> list[str]:
    """Training's default spec (the newjanusvln preset) at the tests' 56 px."""
    return ["--preset", "newjanusvln", "--attention", attention]


def train(data_root: Path, out: Path, env: dict, *extra: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "vggt_cache.training.train",
        "--tiny",
        "--data_root",
        str(data_root),
        "--output_dir",
        str(out),
        "--image_size",
        "56",
        "--vggt_attention",
        "causal",
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "2",
        "--use_cpu",
        "true",
        "--report_to",
        "none",
        "--save_strategy",
        "no",
        "--logging_steps",
        "1",
        "--disable_tqdm",
        "true",
        *extra,
    ]
    return subprocess.run(
        cmd,
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
        capture_output=True,
        text=True,
        timeout=TRAIN_TIMEOUT_S,
    )


def sources(run: subprocess.CompletedProcess) -> dict[str, int]:
    found = re.search(
        r"VGGT features by source over \d+ sample\(s\): cache=(\d+), service=(\d+), online=(\d+)", run.stderr
    )
    assert found, run.stdout[-2000:] + run.stderr[-4000:]
    return dict(zip(("cache", "service", "online"), map(int, found.groups()), strict=True))


@pytest.mark.slow
def test_training_fills_the_cache_from_the_service_then_falls_back_when_it_is_gone(tmp_path, loaded, service_server):
    data_root = tmp_path / "data"
    clips = make_data_root(data_root)
    spec = spec_for(loaded, "causal")
    service = service_server(data_root, *serve_args("causal"))
    env = {"USE_VGGT_CACHE": "true", "VGGT_SERVICE_URL": service.url}

    # 1. Empty cache, service up: every sample's features come from the service (4 samples, 2 steps of 2),
    #    through a DataLoader worker, and the service leaves the sibling files behind.
    run = train(data_root, tmp_path / "out1", env, "--dataloader_num_workers", "1")
    assert run.returncode == 0, run.stderr[-4000:]
    assert ENABLED in run.stderr
    assert sources(run) == {"cache": 0, "service": 4, "online": 0}
    assert service.requests("/features") >= 1
    for clip in clips:
        entry = read_entry(clip[-1], spec, context_frames=clip)
        assert entry.outcome is Outcome.HIT, entry.reason
        assert entry.meta["context"]["frames"][-1]["path"] == os.path.basename(clip[-1])
    # The checkpoint holds Qwen and the merger, not the VGGT weights.
    saved = tmp_path / "out1"
    with safe_open(saved / "model.safetensors", "pt") as f:
        assert not any("vggt" in k or "aggregator" in k or "frame_blocks" in k for k in f.keys())  # noqa: SIM118
    with safe_open(saved / MERGER_FILE, "pt") as f:
        assert all(k.startswith(("norm.", "mlp.")) for k in f.keys())  # noqa: SIM118 (safe_open is not iterable)

    # 2. Service stopped, one entry gone: the rest are read from disk, the miss is computed online.
    service.stop()
    os.remove(cache_path(clips[1][-1]))
    run = train(data_root, tmp_path / "out2", env)
    assert run.returncode == 0, run.stderr[-4000:]
    assert sources(run) == {"cache": 3, "service": 0, "online": 1}
    assert "The VGGT feature service failed; computing online instead" in run.stderr

    # 3. Fallback "error": the run stops and says how to get the features.
    run = train(data_root, tmp_path / "out3", env, "--vggt_cache_fallback", "error")
    assert run.returncode == 2, run.stderr[-4000:]
    assert "[ERROR] 1 VGGT feature(s) are neither cached nor available from the service" in run.stderr
    assert "vggt-cache serve --model " in run.stderr and "--attention causal" in run.stderr
    assert "--preprocess pad --size 56 --align 14" in run.stderr and "--reference-frame last" in run.stderr
    assert not (tmp_path / "out3" / MERGER_FILE).exists()


@pytest.mark.slow
def test_a_service_with_another_spec_is_refused_before_training(tmp_path, service_server):
    data_root = tmp_path / "data"
    make_data_root(data_root, clips=2)
    service = service_server(data_root, *serve_args("frame"))
    run = train(
        data_root,
        tmp_path / "out",
        {"USE_VGGT_CACHE": "1", "VGGT_SERVICE_URL": service.url},
        "--vggt_cache_fallback",
        "error",
    )
    assert run.returncode == 2
    assert f"The VGGT feature service at {service.url} computes features with another spec" in run.stderr
    assert "differs in: attention, reference_frame" in run.stderr  # frame attention has no reference frame
    assert service.requests("/features") == 0


@pytest.mark.parametrize("attention", ["frame", "causal"])
def test_features_written_by_the_service_equal_features_computed_in_training(
    tmp_path, loaded, service_server, attention
):
    data_root = tmp_path / "data"
    make_data_root(data_root)
    spec = spec_for(loaded, attention)
    service = service_server(data_root, *serve_args(attention))
    tok = tiny_tokenizer()
    config = tiny_config(tok)
    samples = load_samples(str(data_root))

    def dataset(cache):
        return VLNDataset(samples, tok, tiny_image_processor(config), config, spec, cache)

    with (
        FeatureCache(service.url, spec, fallback="error") as served_cache,
        FeatureCache(None, spec, fallback="error") as file_cache,
    ):
        served = [dataset(served_cache)[i] for i in range(len(samples))]
        cached = [dataset(file_cache)[i] for i in range(len(samples))]
    online = [dataset(None)[i] for i in range(len(samples))]
    assert [i["vggt_source"] for i in served] == ["service"] * 4
    assert [i["vggt_source"] for i in cached] == ["cache"] * 4

    for s, c, o in zip(served, cached, online, strict=True):
        expected = entry_features(loaded.model, o["images_vggt"][None], spec)[0, -1]  # [16, 128]
        assert o["images_vggt"].shape[0] == (1 if attention == "frame" else len(o["image_grid_thw"]))
        assert c["vggt_features"].dtype == spec.torch_dtype == torch.bfloat16
        assert torch.equal(c["vggt_features"], s["vggt_features"])
        assert torch.equal(c["vggt_features"], expected)

    # Hence the model trains identically on the service's features and on its own.
    torch.manual_seed(0)
    model = Qwen25VLWithVGGT(Qwen2_5_VLForConditionalGeneration(config), loaded, spec)
    collate = VGGTCollator(tok.pad_token_id)
    results = []
    for items in (cached, online):
        batch = collate(items)
        batch.pop("vggt_source")
        model.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss_c, grads_c), (loss_o, grads_o) = results
    assert torch.equal(loss_c, loss_o)
    assert grads_c.keys() == grads_o.keys()
    for name, grad in grads_c.items():
        assert torch.equal(grad, grads_o[name]), name


def test_a_checkpoint_restores_qwen_and_the_merger(tmp_path, loaded):
    tok = tiny_tokenizer()
    config = tiny_config(tok)
    spec = spec_for(loaded, "causal")
    torch.manual_seed(0)
    model = Qwen25VLWithVGGT(Qwen2_5_VLForConditionalGeneration(config), loaded, spec)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], remove_unused_columns=False)
    trainer = VGGTTrainer(model=model, args=args, processing_class=tok, image_processor=tiny_image_processor(config))
    trainer.save_model(str(tmp_path / "ckpt"))
    assert (tmp_path / "ckpt" / "preprocessor_config.json").exists() and (tmp_path / "ckpt" / "tokenizer.json").exists()
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    trainer._load_from_checkpoint(str(tmp_path / "ckpt"))
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("script", ["train_h800.sh", "train_2node_h800.sh"])
def test_launch_scripts_pass_the_environment_to_torchrun(tmp_path, script):
    path = SCRIPTS / script
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    env = {
        "PATH": os.environ["PATH"],
        "DRY_RUN": "1",
        "USE_VGGT_CACHE": "TRUE",
        "VGGT_SERVICE_URL": "http://gpu-a:8600,http://gpu-b:8600",
        "NNODES": "2",
        "NODE_RANK": "1",
        "MASTER_ADDR": "10.0.0.1",
        "MASTER_PORT": "29511",
        "MODEL_PATH": "/models/qwen",
        "VGGT_MODEL_PATH": "/models/vggt",
        "DATA_ROOT": str(tmp_path / "data"),
        "OUTPUT_DIR": str(tmp_path / "out"),
        "VGGT_ATTENTION": "causal",
    }
    run = subprocess.run(["bash", str(path), "--max_steps", "5"], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert ENABLED in run.stdout
    cmd = shlex.split(run.stdout.strip().splitlines()[-1])
    assert cmd[:12] == [
        "torchrun",
        "--nnodes",
        "2",
        "--node_rank",
        "1",
        "--nproc_per_node",
        "8",
        "--master_addr",
        "10.0.0.1",
        "--master_port",
        "29511",
        "-m",
    ]
    assert cmd[12] == "vggt_cache.training.train" and cmd[-2:] == ["--max_steps", "5"]
    # Every flag the script passes is one training.train accepts.
    model_args, data_args, cache_args, training_args = parse_args([*cmd[13:], "--use_cpu", "true"])
    assert (model_args.model_name_or_path, model_args.vggt_model_path) == ("/models/qwen", "/models/vggt")
    assert (data_args.data_root, training_args.output_dir) == (env["DATA_ROOT"], env["OUTPUT_DIR"])
    assert cache_args.use_vggt_cache and cache_args.service_urls == ["http://gpu-a:8600", "http://gpu-b:8600"]
    assert cache_args.vggt_attention == "causal" and training_args.bf16 and training_args.max_steps == 5

    del env["USE_VGGT_CACHE"], env["VGGT_SERVICE_URL"], env["NNODES"]
    run = subprocess.run(["bash", str(path)], env=env, capture_output=True, text=True)
    assert run.returncode == 0 and "cache enabled" not in run.stdout
    cmd = shlex.split(run.stdout.strip().splitlines()[-1])
    assert cmd[cmd.index("--use_vggt_cache") + 1] == "false" and "--vggt_service_url" not in cmd
    assert cmd[cmd.index("--nnodes") + 1] == ("1" if script == "train_h800.sh" else "2")

    run = subprocess.run(["bash", str(path)], env={**env, "DATA_ROOT": ""}, capture_output=True, text=True)
    assert run.returncode == 2 and "DATA_ROOT is not set" in run.stderr


def test_the_two_node_script_needs_the_master_and_the_node_rank(tmp_path):
    env = {"PATH": os.environ["PATH"], "DRY_RUN": "1", "DATA_ROOT": str(tmp_path)}
    run = subprocess.run(["bash", str(SCRIPTS / "train_2node_h800.sh")], env=env, capture_output=True, text=True)
    assert run.returncode == 2 and "set MASTER_ADDR" in run.stderr


def test_the_train_step_benchmark_runs_at_its_smallest_settings():
    run = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "train_step.py"),
            "--vggt",
            str(FIXTURE),
            "--size",
            "56",
            "--frames",
            "2",
            "--batch",
            "1",
            "--steps",
            "1",
            "--warmup",
            "0",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=TRAIN_TIMEOUT_S,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    found = re.search(r"cached (\d+\.\d+)s, online (\d+\.\d+)s, online/cached = (\d+\.\d+)x", run.stdout)
    assert found and all(float(x) > 0 for x in found.groups()), run.stdout
