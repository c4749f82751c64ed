"""Training step time with cached VGGT features vs computing VGGT online (the seed: 77.86 s -> 15-20 s).

    python benchmarks/train_step.py                       # ~30 s on 2 idle CPU cores
    python benchmarks/train_step.py --device cuda --vggt facebook/VGGT-1B \\
        --qwen Qwen/Qwen2.5-VL-3B-Instruct --size 504 --frames 8 --batch 1   # the real models, one GPU
    python benchmarks/train_step.py --device cuda --vggt-config 1b ...        # VGGT-1B's shape, random weights

Same models, same samples, one process. A data root is written with one sample per
timed or warm-up batch slot, each a clip of ``--frames`` photo-like 640x480 JPEGs;
every clip's current-frame entry is precomputed and written as the service writes
it (``compute_features`` + ``write_entry``, not timed). Then steps alternate between
the two modes, each a full training step (dataset items, collate, forward,
backward, AdamW step):

  cached    items from ``FeatureCache`` (read-only, the sibling files): the model
            merges the stored features; history frames are decoded only for Qwen
  online    no cache: the frozen VGGT runs on each clip inside the step

The default pair is a mid-size random VGGT (``--vggt-config mid``: 384 wide, a
6-block patch embed, 6 frame + 6 global blocks) and the tiny random Qwen2.5-VL of
``training.tiny``, so the ratio shows what the VGGT forward costs next to a tiny
LLM. With the real models the LLM's share of a step grows and the ratio shrinks
(the seed measured 77.86 s -> 15-20 s per step, 3-5x).
Reports the median step time of each mode and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vggt_cache.client.cache import FeatureCache
from vggt_cache.client.cachefile import context_record, source_record, write_entry
from vggt_cache.service.model.features import entry_features
from vggt_cache.service.preprocess import preprocess
from vggt_cache.training.arguments import CacheArguments, DataArguments, ModelArguments, feature_spec
from vggt_cache.training.data import VGGTCollator, VLNDataset, load_samples
from vggt_cache.training.model import Qwen25VLWithVGGT
from vggt_cache.training.train import build_qwen

from common import device_name, get_model, make_images, synchronize

VGGT_CONFIGS = {
    "mid": {
        "img_size": 518,
        "patch_size": 14,
        "embed_dim": 384,
        "depth": 6,
        "num_heads": 6,
        "patch_embed": {"embed_dim": 384, "depth": 6, "num_heads": 6},
    },
    "1b": {},  # VGGT-1B's shape (random weights)
}


def write_data(root: Path, clips: int, frames: int) -> None:
    """``clips`` scenes of ``frames`` photo-like 640x480 JPEGs, one sample per scene (history + current)."""
    lines = []
    for c in range(clips):
        scene = root / f"scene{c:04d}"
        scene.mkdir(parents=True)
        rel = [os.path.relpath(p, root) for p in make_images(scene, frames, seed=c)]
        lines.append(
            json.dumps(
                {
                    "history_images": rel[:-1],
                    "current_image": rel[-1],
                    "instruction": "Walk past the sofa and stop at the door.",
                    "answer": "The next action is move forward 25 cm.",
                }
            )
        )
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")


def precompute(samples, loaded, spec, device: str) -> None:
    """What the service writes for each clip's current frame."""
    for sample in samples:
        unit = spec.frames_of(sample.clip)
        sources = [source_record(p) for p in unit]  # stat-ed before decoding, as the service does
        frames = torch.stack([preprocess(p, spec.preprocess, spec.size, spec.align) for p in unit])
        entry = entry_features(loaded.model, frames[None].to(device), spec)[0, -1].cpu().clone()
        patch = spec.architecture["patch_size"]
        h, w = frames.shape[-2] // patch, frames.shape[-1] // patch
        context = context_record(unit[-1], spec.context_of(unit))
        write_entry(unit[-1], entry, spec, (h, w), sources[-1], context)


def step(model, optimizer, dataset, collate, indices, device: str) -> float:
    """One full training step; returns seconds."""
    synchronize(device)
    t0 = time.perf_counter()
    batch = collate([dataset[i] for i in indices])
    batch.pop("vggt_source")
    batch = {
        k: v.to(device)
        if torch.is_tensor(v)
        else [x.to(device) if torch.is_tensor(x) else x for x in v]
        if isinstance(v, list)
        else v
        for k, v in batch.items()
    }
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
        loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vggt", help="VGGT weights (HF id, folder, file); default: a random --vggt-config")
    parser.add_argument("--vggt-config", choices=sorted(VGGT_CONFIGS), default="mid")
    parser.add_argument("--qwen", default="tiny", help="'tiny' (random, in-process) or a Qwen2.5-VL id/folder")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--attention", choices=["frame", "sequence", "causal"], default="causal")
    parser.add_argument("--qwen-images", choices=["all", "current"], default="all")
    parser.add_argument("--size", type=int, default=224, help="image size (pad mode, 28-aligned)")
    parser.add_argument("--frames", type=int, default=8, help="frames per clip (the current one last)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per mode")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--dir", help="work folder (default: a temporary one, removed)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    work = Path(args.dir or tempfile.mkdtemp(prefix="vggt-train-bench-"))
    try:
        run(args, work)
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path) -> None:
    from transformers import TrainingArguments

    rounds = args.warmup + args.steps
    clips = rounds * args.batch
    data_root = work / "data"
    t0 = time.perf_counter()
    write_data(data_root, clips, args.frames)
    loaded = get_model(args.vggt, VGGT_CONFIGS[args.vggt_config], args.device)
    cuda = args.device.startswith("cuda")
    training_args = TrainingArguments(output_dir=str(work / "out"), bf16=cuda, use_cpu=not cuda, report_to=[])
    qwen = build_qwen(ModelArguments(model_name_or_path=args.qwen, tiny=args.qwen == "tiny"), training_args)
    data_args = DataArguments(data_root=str(data_root), image_size=args.size, qwen_images=args.qwen_images)
    spec = feature_spec(loaded, data_args, CacheArguments(vggt_attention=args.attention, use_vggt_cache=False))
    model = Qwen25VLWithVGGT(qwen.model, loaded, spec).to(args.device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    samples = load_samples(str(data_root))
    precompute(samples, loaded, spec, args.device)
    print(
        f"setup {time.perf_counter() - t0:.1f}s: {clips} clips x {args.frames} frames at {args.size}px, "
        f"VGGT {loaded.num_params / 1e6:.1f}M params ({loaded.source}), Qwen {args.qwen} "
        f"{sum(p.numel() for p in qwen.model.parameters()) / 1e6:.1f}M, {args.attention} attention, "
        f"{device_name(args.device)}, batch {args.batch}, Qwen sees {args.qwen_images} frames"
    )

    collate = VGGTCollator(qwen.tokenizer.pad_token_id)
    cache = FeatureCache(None, spec, fallback="error")
    datasets = {
        "cached": VLNDataset(
            samples, qwen.tokenizer, qwen.image_processor, qwen.model.config, spec, cache, args.qwen_images
        ),
        "online": VLNDataset(
            samples, qwen.tokenizer, qwen.image_processor, qwen.model.config, spec, None, args.qwen_images
        ),
    }
    times: dict[str, list[float]] = {mode: [] for mode in datasets}
    for r in range(rounds):
        indices = list(range(r * args.batch, (r + 1) * args.batch))
        # Alternate which mode goes first, so neither always runs on a warmer machine.
        for mode in ("cached", "online") if r % 2 == 0 else ("online", "cached"):
            seconds = step(model, optimizer, datasets[mode], collate, indices, args.device)
            if r >= args.warmup:
                times[mode].append(seconds)
    assert cache.stats["hits"] == clips and cache.stats["misses"] == 0, cache.stats

    cached, online = (statistics.median(times[m]) for m in ("cached", "online"))
    print(
        f"median step time over {args.steps} steps: cached {cached:.3f}s, online {online:.3f}s, "
        f"online/cached = {online / cached:.2f}x"
    )
    print(
        f"  all steps (s): cached {[round(t, 3) for t in times['cached']]}, "
        f"online {[round(t, 3) for t in times['online']]}"
    )


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
