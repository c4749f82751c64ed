"""One JanusVLN clip: where its time goes, and peak memory with block-causal attention chunked vs the dense mask.

    python benchmarks/clip.py [--device cpu|cuda] [--embed-dim 1024 --depth 24 --num-heads 16] [--json]

One clip of 9 frames at the newjanusvln preset's 644x644 (2,121 tokens a frame, 19,089 a clip)
through `entry_features`, once per attention implementation, each in a fresh process so that
one's peak cannot hide the other's: on the CPU the growth of the peak resident set over its
level once the model and the input exist, on CUDA `max_memory_allocated` over the level before
the forward. The chunked run also times each part (DINOv2, every frame block, every global
block); the parent times decoding and preprocessing a 640x480 JPEG at 644 px and writing one
entry. Parts are then scaled to VGGT-1B's block counts (24 DINOv2 blocks, 23 frame + 23 global
blocks up to layer -2) for the time of a whole clip on this device.

Without --model the weights are random (the values change neither memory nor time); the default
model is VGGT-1B's width and heads at depth 2 on the CPU (the 24-block model on CUDA): peak
memory is one block's activations plus what attention adds, whatever the depth.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vggt_cache.client.cachefile import context_record, source_record, write_entry
from vggt_cache.client.spec import PRESETS, FeatureSpec, preset_options
from vggt_cache.service.model import AggregatorConfig
from vggt_cache.service.model.features import entry_features, model_spec
from vggt_cache.service.preprocess import preprocess
from vggt_cache.service.samples import DEFAULT_MAX_HISTORY

from common import device_name, get_model, make_images, synchronize

PRESET = "newjanusvln"
IMPLS = ("mask", "chunked")  # the reference first


def time_parts(model: torch.nn.Module, device: torch.device) -> dict[str, list[float]]:
    """Forward hooks that record the seconds of DINOv2 and of every frame and global block."""
    seconds: dict[str, list[float]] = defaultdict(list)
    started: dict[int, float] = {}

    def add(name: str, module: torch.nn.Module) -> None:
        def before(mod, inputs):
            synchronize(device)
            started[id(mod)] = time.perf_counter()

        def after(mod, inputs, output):
            synchronize(device)
            seconds[name].append(time.perf_counter() - started.pop(id(mod)))

        module.register_forward_pre_hook(before)
        module.register_forward_hook(after)

    add("dinov2", model.patch_embed)
    for block in model.frame_blocks:
        add("frame_block", block)
    for block in model.global_blocks:
        add("global_block", block)
    return seconds


def measure(args: argparse.Namespace) -> dict:
    """In this process: one forward with `args.impl`; peak memory above the level before it, time of its parts."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    config = {
        "embed_dim": args.embed_dim,
        "depth": args.depth,
        "num_heads": args.num_heads,
        "patch_embed": {"embed_dim": args.embed_dim, "depth": args.depth, "num_heads": args.num_heads},
    }
    loaded = get_model(args.model, config, str(device))
    loaded.model.causal_impl = args.impl
    spec = model_spec(loaded, **{**preset_options(PRESET), "size": args.size})
    x = torch.rand(1, DEFAULT_MAX_HISTORY + 1, 3, spec.size, spec.size, device=device)  # [1, 9, 3, 644, 644]
    parts = time_parts(loaded.model, device) if args.impl == "chunked" else {}
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    with torch.inference_mode():
        entry_features(loaded.model, x, spec)
    synchronize(device)
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    cfg = loaded.config
    return {
        "impl": args.impl,
        "peak_bytes": peak,
        "seconds": round(seconds, 3),
        "device": device_name(device),
        "parts_s": {name: sum(times) / len(times) for name, times in parts.items()},  # one call of each
        "model": {"embed_dim": cfg.embed_dim, "depth": cfg.depth, "num_heads": cfg.num_heads, "source": loaded.source},
        "input": list(x.shape),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", help="a model folder, weights file or HF repo id (default: random)")
    parser.add_argument("--embed-dim", type=int, default=1024)
    parser.add_argument("--depth", type=int, help="random model: blocks (default 24 on cuda, 2 on cpu)")
    parser.add_argument("--num-heads", type=int, default=16)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--size", type=int, default=PRESETS[PRESET]["size"], help="input size (default: the preset's)")
    parser.add_argument("--impl", choices=IMPLS, help=argparse.SUPPRESS)  # a child process measures one
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    args = parser.parse_args(argv)
    args.depth = args.depth or (24 if args.device.startswith("cuda") else 2)
    if args.impl:
        print(json.dumps(measure(args)))
        return 0

    results = {}
    for impl in IMPLS:
        child = [
            sys.executable,
            __file__,
            "--impl",
            impl,
            "--device",
            args.device,
            "--embed-dim",
            str(args.embed_dim),
            "--depth",
            str(args.depth),
            "--num-heads",
            str(args.num_heads),
            "--threads",
            str(args.threads),
            "--size",
            str(args.size),
            *(["--model", args.model] if args.model else []),
        ]
        done = subprocess.run(child, capture_output=True, text=True)
        if done.returncode != 0:
            results[impl] = {"impl": impl, "error": done.stderr.strip().splitlines()[-1:]}
            continue
        results[impl] = json.loads(done.stdout.strip().splitlines()[-1])
    ok = all("peak_bytes" in r for r in results.values())
    host = host_seconds(args.embed_dim, args.num_heads)
    per_clip = scaled_clip(results["chunked"]["parts_s"], args.depth, *host) if ok else None
    summary = {
        "preset": PRESET,
        "size": args.size,
        "frames": DEFAULT_MAX_HISTORY + 1,
        "results": results,
        "peak_mask_over_chunked": round(results["mask"]["peak_bytes"] / max(results["chunked"]["peak_bytes"], 1), 2)
        if ok
        else None,
        "time_mask_over_chunked": round(results["mask"]["seconds"] / results["chunked"]["seconds"], 2) if ok else None,
        "clip_at_vggt_1b_depth_s": per_clip,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    first = next((r for r in results.values() if "model" in r), None)
    if first:
        m = first["model"]
        print(
            f"{first['device']}: one clip {first['input']} ({PRESET}), embed {m['embed_dim']}, depth {m['depth']}, "
            f"{m['num_heads']} heads, {m['source']}"
        )
    for impl, r in results.items():
        if "error" in r:
            print(f"{impl:<8} failed: {r['error']}")
        else:
            print(f"{impl:<8} peak +{r['peak_bytes'] / 2**20:8.0f} MiB   {r['seconds']:7.2f} s")
    if ok:
        print(f"peak mask/chunked = {summary['peak_mask_over_chunked']:.2f}")
        print(f"time mask/chunked = {summary['time_mask_over_chunked']:.2f}")
        total = sum(per_clip.values())
        print(f"a clip of this width at VGGT-1B's depth (24 DINOv2 blocks, 23 frame + 23 global): {total:.1f} s")
        for name, value in per_clip.items():
            print(f"  {name:<18}{value:9.2f} s  {100 * value / total:5.1f}%")
    return 0


def host_seconds(embed_dim: int, num_heads: int) -> tuple[float, float]:
    """Seconds to decode + preprocess one 640x480 JPEG at the preset's size, and to write one entry."""
    architecture = AggregatorConfig.from_dict({"embed_dim": embed_dim, "num_heads": num_heads}).to_dict()
    spec = FeatureSpec(fingerprint="sha256:" + "0" * 64, architecture=architecture, **preset_options(PRESET))
    with tempfile.TemporaryDirectory() as folder:
        [image] = make_images(folder, 1)
        preprocess(image, mode=spec.preprocess, size=spec.size, align=spec.align)  # warm-up
        start = time.perf_counter()
        frame = preprocess(image, mode=spec.preprocess, size=spec.size, align=spec.align)
        decode = time.perf_counter() - start
        patch = spec.architecture["patch_size"]
        grid = [frame.shape[-2] // patch, frame.shape[-1] // patch]
        features = torch.randn(grid[0] * grid[1], 2 * embed_dim).to(spec.torch_dtype)  # layer -2 patch tokens
        start = time.perf_counter()
        written = write_entry(image, features, spec, grid, source_record(image), context_record(image, [image] * 9))
        write = time.perf_counter() - start
        os.remove(written)
    return decode, write


def scaled_clip(parts: dict[str, float], depth: int, decode_s: float, write_s: float) -> dict[str, float]:
    """A VGGT-1B clip (layer -2, 9 frames, one entry): each part's measured time times its count there."""
    cfg = AggregatorConfig()
    blocks = cfg.depth - 1  # layer -2: the forward stops after 23 of 24 block pairs
    per_block_dino = parts["dinov2"] / depth  # the measured encoder's blocks (its conv and norm are small)
    return {
        "decode (9 frames)": 9 * decode_s,
        "dinov2 (9 frames)": per_block_dino * cfg.patch_embed.depth,
        "frame blocks": parts["frame_block"] * blocks,
        "global blocks": parts["global_block"] * blocks,
        "write (1 entry)": write_s,
    }


if __name__ == "__main__":
    sys.exit(main())
