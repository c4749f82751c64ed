"""Bulk precompute throughput: the service's bulk job vs one-sample-at-a-time, same model, images and machine.

    python benchmarks/precompute.py [--n 128] [--device cpu|cuda] [--model SRC] [--size S] [--batch-size B] [--json]
    python benchmarks/precompute.py --preset newjanusvln [--n 24] ...   # 9-frame causal samples of an episode

  seed   for each sample in turn: decode + preprocess its frames, forward it alone (batch 1),
         its entry (layer -2 patch tokens in the storage dtype), synchronous
         torch.save({"features": ...}) to the sibling file. Without --preset a sample is one
         image in frame mode (the seed's own loop); with it, a 9-frame clip of an episode
         folder (step_<n>_<ACTION>.jpg, max_history_images 8) as JanusVLN-family training
         runs VGGT, every frame of every sample decoded. (The reference aggregator also
         computes the last layer, which is dropped; here every way stops at layer -2, so the
         ratio measures the pipeline alone.)
  ours   a real bulk job as `vggt-cache precompute` runs it in-process: JobManager
         (scan, plan, SQLite progress, manifest) over the Engine (decode workers that reuse a
         frame overlapping samples share, dynamic batches, writer pool, atomic cache files).
  clips  the model's forward alone on pre-decoded clips already on the device, in batches of
         the same size, every clip's frames embedded by DINOv2 for that clip.
  limit  the same forwards with every distinct frame embedded once (the patch tokens of a frame
         depend on it alone; the bulk job reuses them the same way): the physical limit of the
         job's work on this device, an upper bound for any pipeline.

Without --model the weights are random: on cuda the VGGT-1B architecture itself, on the CPU
a mid-size one of the same structure (embed 256 in 4 heads, VGGT-1B's head width; depth 4, or 2
with --preset at its 644 px), so the run takes a few minutes on two cores. Methods run round by
round in turn; each one's best round is reported. Rates: entries/s (one per sample) and
frames/s (frames forwarded; 9 per sample with --preset).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vggt_cache.client.cachefile import CACHE_SUFFIX, cache_path, read_entry
from vggt_cache.client.manifest import manifest_path
from vggt_cache.client.spec import PRESETS, STORAGES, FeatureSpec, preset_options
from vggt_cache.service.devices import parse_devices
from vggt_cache.service.engine import Engine
from vggt_cache.service.engine.patches import PatchCache
from vggt_cache.service.jobs.runner import JobManager
from vggt_cache.service.jobs.store import JobStore
from vggt_cache.service.model import LoadedModel
from vggt_cache.service.model.features import entry_features, model_spec
from vggt_cache.service.paths import AllowedRoots
from vggt_cache.service.preprocess import preprocess
from vggt_cache.service.runtime import model_info
from vggt_cache.service.settings import ServiceSettings
from vggt_cache.service.sources import scan_data_root
from vggt_cache.service.units import Unit

from common import device_name, get_model, make_images, print_table, synchronize

METHODS = ("seed", "ours", "clips", "limit")


def seed_way(loaded: LoadedModel, spec: FeatureSpec, units: list[Unit], device: torch.device) -> None:
    """One sample at a time: every step of one sample done before the next one starts."""
    for unit in units:
        x = torch.stack([preprocess(p, mode=spec.preprocess, size=spec.size, align=spec.align) for p in unit.frames])
        features = entry_features(loaded.model, x[None].to(device), spec)  # [1, 1, P, C]
        torch.save({"features": features[0, 0].cpu().clone()}, cache_path(unit.targets[-1]))


def ours_way(
    loaded: LoadedModel,
    spec: FeatureSpec,
    data_root: str,
    device: torch.device,
    batch: int,
    decode_workers: int,
    state_dir: str,
) -> tuple[float, dict]:
    """Seconds of one bulk job over `data_root` (the engine is up before, as in a running service), engine stats."""
    engine = Engine(loaded, spec, devices=[str(device)], max_batch_frames=batch, decode_workers=decode_workers)
    store = JobStore(state_dir)
    engine.start()
    try:
        jobs = JobManager(store, engine, spec, AllowedRoots.of([data_root]), model_info(loaded, engine))
        start = time.perf_counter()
        view = jobs.run(jobs.submit(data_root).job_id)
        seconds = time.perf_counter() - start
        stats = engine.stats()
    finally:
        engine.stop()
        store.close()
    if view.state != "finished" or view.failed or view.computed != view.total:
        raise RuntimeError(f"the bulk job did not compute every entry: {json.dumps(view.to_dict())[:1000]}")
    return seconds, stats


def forward_way(
    loaded: LoadedModel, spec: FeatureSpec, batches: list[torch.Tensor], keys: list[list[list[str]]] | None = None
) -> float:
    """Seconds of the forwards alone over `batches` ([B, S, 3, H, W] each, already on the device).

    With `keys` (per batch, per clip, per frame), each distinct frame's patch tokens are computed once.
    """
    device = batches[0].device
    patch_cache = PatchCache(budget_bytes=1 << 40)
    synchronize(device)
    start = time.perf_counter()
    with torch.inference_mode():
        for i, x in enumerate(batches):
            patches = None if keys is None else patch_cache.patches(loaded.model, x, keys[i])
            entry_features(loaded.model, x, spec, patches)
    synchronize(device)
    return time.perf_counter() - start


def clear_outputs(data_root: str) -> None:
    for path in glob.glob(os.path.join(data_root, "**", "*" + CACHE_SUFFIX), recursive=True):
        os.remove(path)
    if os.path.exists(manifest_path(data_root)):
        os.remove(manifest_path(data_root))


def written_entry(images: list[str]) -> tuple[torch.Tensor, float]:
    """Check every image got its sibling file; returns the first file's features (for shape checks) and mean bytes."""
    missing = [p for p in images if not os.path.exists(cache_path(p))]
    if missing:
        raise RuntimeError(f"{len(missing)} cache file(s) not written, e.g. {missing[0]}")
    mean_bytes = sum(os.path.getsize(cache_path(p)) for p in images) / len(images)
    result = read_entry(images[0], mmap=False)  # the seed's files have no metadata: torch.load reads them
    features = result.features if result.hit else torch.load(cache_path(images[0]), weights_only=True)["features"]
    return features, mean_bytes


def run(args: argparse.Namespace, folder: str) -> dict:
    device = torch.device(args.device)
    data_root = os.path.join(folder, "data")
    images_dir = os.path.join(data_root, "ep_0001") if args.preset else data_root
    os.makedirs(images_dir)
    make_images(
        images_dir,
        args.n,
        args.width,
        args.height,
        name="step_{i}_MOVE_FORWARD.jpg" if args.preset else "frame_{i:05d}.jpg",
    )
    config = {
        "embed_dim": args.embed_dim,
        "depth": args.depth,
        "num_heads": args.num_heads,
        "patch_embed": {"embed_dim": args.embed_dim, "depth": args.depth, "num_heads": args.num_heads},
    }
    loaded = get_model(args.model, config, str(device))
    spec = model_spec(
        loaded, **{**(preset_options(args.preset) if args.preset else {}), "size": args.size, "storage": args.storage}
    )
    units = scan_data_root(data_root, spec.attention).units
    targets = [u.targets[-1] for u in units]
    frames = sum(len(u.frames) for u in units)

    # Pre-decoded, pre-batched input of the forward-only ways; also the shapes the others work on.
    decoded = {
        p: preprocess(p, mode=spec.preprocess, size=spec.size, align=spec.align)
        for p in set(f for u in units for f in u.frames)
    }
    clips = torch.stack([torch.stack([decoded[f] for f in u.frames]) for u in units])  # [N, S, 3, H, W]
    per_batch = max(1, args.batch_size // clips.shape[1])  # clips per forward, as the engine packs them
    batches = [clips[i : i + per_batch].to(device) for i in range(0, len(units), per_batch)]
    keys = [[list(u.frames) for u in units[i : i + per_batch]] for i in range(0, len(units), per_batch)]
    # Warm-up (allocator, kernels, lazy initialisation, first torch.save) at both batch sizes used below.
    forward_way(loaded, spec, [batches[0][:1], batches[0]])
    forward_way(loaded, spec, batches[:1], keys[:1])
    seed_way(loaded, spec, units[:1], device)
    clear_outputs(data_root)

    seconds: dict[str, list[float]] = {m: [] for m in METHODS}
    entry_shapes: dict[str, list[int]] = {}  # per method that writes files: they must agree
    entry_bytes: dict[str, float] = {}
    for r in range(args.rounds):
        start = time.perf_counter()
        seed_way(loaded, spec, units, device)
        seconds["seed"].append(time.perf_counter() - start)
        features, entry_bytes["seed"] = written_entry(targets)
        entry_shapes["seed"] = list(features.shape)
        clear_outputs(data_root)

        took, stats = ours_way(
            loaded, spec, data_root, device, args.batch_size, args.decode_workers, os.path.join(folder, f"state{r}")
        )
        seconds["ours"].append(took)
        features, entry_bytes["ours"] = written_entry(targets)
        entry_shapes["ours"] = list(features.shape)
        clear_outputs(data_root)

        seconds["clips"].append(forward_way(loaded, spec, batches))
        seconds["limit"].append(forward_way(loaded, spec, batches, keys))
    if entry_shapes["seed"] != entry_shapes["ours"]:
        raise RuntimeError(f"the methods wrote different feature shapes: {entry_shapes}")

    rate = {m: len(units) / min(seconds[m]) for m in METHODS}
    cfg = loaded.config
    return {
        "model": {
            "source": loaded.source,
            "parameters": loaded.num_params,
            "embed_dim": cfg.embed_dim,
            "depth": cfg.depth,
            "patch_embed_depth": cfg.patch_embed.depth,
        },
        "device": device_name(device),
        "torch": torch.__version__,
        "images": {"n": args.n, "width": args.width, "height": args.height, "model_input": list(clips.shape[2:])},
        "samples": len(units),
        "frames_per_sample": clips.shape[1],
        # Frames every sample needs decoded vs what the bulk job decoded (the rest it reused).
        "decodes": {"seed": frames, "ours": stats["frames_decoded"], "ours_reused": stats["frames_reused"]},
        # The same for DINOv2: frames embedded, and frames that took the tokens of one embedded before.
        "patch_embeds": {
            "seed": frames,
            "ours": stats["patch_cache"]["embedded"],
            "ours_reused": stats["patch_cache"]["reused"],
        },
        "batch_size": args.batch_size,
        "decode_workers": args.decode_workers,
        "spec": {
            "layers": list(spec.layers),
            "dtype": spec.dtype,
            "size": spec.size,
            "attention": spec.attention,
            "preprocess": spec.preprocess,
            "reference_frame": spec.reference_frame,
            "preset": args.preset,
            "storage": spec.storage,
        },
        "entry_shape": entry_shapes["ours"],
        "entry_bytes": {m: round(v) for m, v in entry_bytes.items()},  # the seed's torch.save is always raw
        "rounds": args.rounds,
        "seconds": seconds,
        "images_per_s": {m: round(v, 3) for m, v in rate.items()},  # entries (one per sample) per second
        "frames_per_s": {m: round(v * clips.shape[1], 3) for m, v in rate.items()},
        "ratios": {
            "ours/seed": round(rate["ours"] / rate["seed"], 3),
            "ours/clips": round(rate["ours"] / rate["clips"], 3),
            "ours/limit": round(rate["ours"] / rate["limit"], 3),
        },
    }


def report(result: dict) -> None:
    m, im = result["model"], result["images"]
    print(
        f"model   {m['source']}: {m['parameters'] / 1e6:.1f}M parameters "
        f"(embed {m['embed_dim']}, depth {m['depth']}, DINOv2 depth {m['patch_embed_depth']})"
    )
    print(f"device  {result['device']}, torch {result['torch']}")
    sp = result["spec"]
    print(
        f"work    {im['n']} JPEGs {im['width']}x{im['height']} -> {im['model_input']}, {result['samples']} samples "
        f"of {result['frames_per_sample']} frame(s) ({sp['attention']} attention, {sp['preprocess']}, reference "
        f"frame {sp['reference_frame']}{', preset ' + sp['preset'] if sp['preset'] else ''}), "
        f"layer {sp['layers']} patch tokens {result['entry_shape']} {sp['dtype']}, "
        f"batch {result['batch_size']} frames, best of {result['rounds']} round(s)"
    )
    decodes = result["decodes"]
    embeds = result["patch_embeds"]
    print(
        f"decode  one by one: {decodes['seed']} frames decoded; bulk job: {decodes['ours']} decoded, "
        f"{decodes['ours_reused']} reused from overlapping samples (last round)"
    )
    print(
        f"embed   one by one: {embeds['seed']} frames through DINOv2; bulk job: {embeds['ours']}, "
        f"{embeds['ours_reused']} reused (last round)"
    )
    rows = [
        (
            name,
            f"{min(result['seconds'][key]):.2f}",
            f"{result['images_per_s'][key]:.2f}",
            f"{result['frames_per_s'][key]:.1f}",
        )
        for key, name in (
            ("seed", "seed (one by one)"),
            ("ours", "ours (bulk job)"),
            ("clips", "clips (forward, every clip's frames)"),
            ("limit", "limit (forward, frames once)"),
        )
    ]
    print_table(("method", "seconds", "entries/s", "frames/s"), rows)
    for name, value in result["ratios"].items():
        print(f"{name} = {value:.2f}")
    sizes = result["entry_bytes"]
    print(
        f"disk    {sizes['ours'] / 1e6:.3f} MB an entry stored {sp['storage']} "
        f"({sizes['seed'] / sizes['ours']:.2f}x smaller than the seed's raw torch.save)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--n", type=int, help="number of images: steps of one episode with --preset (default 128; 24 with --preset)"
    )
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="JanusVLN-family work: 9-frame causal samples of an episode folder at the preset's size",
    )
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", help="a model folder, weights file or HF repo id (default: random mid-size)")
    parser.add_argument("--embed-dim", type=int, help="random model: width (default 1024 on cuda, 256 on cpu)")
    parser.add_argument(
        "--depth",
        type=int,
        help="random model: aggregator and DINOv2 depth (default 24 on cuda; on cpu 4, 2 with --preset)",
    )
    parser.add_argument("--num-heads", type=int, help="random model: attention heads (16 / 4)")
    parser.add_argument(
        "--size", type=int, help="preprocess size (default: the preset's; else 518 on cuda, 224 on cpu)"
    )
    parser.add_argument(
        "--batch-size", type=int, help="frames per forward (default 32 on cuda; on cpu 8, 9 with --preset)"
    )
    parser.add_argument("--decode-workers", type=int, default=ServiceSettings.decode_workers)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--storage",
        choices=STORAGES,
        default="raw",
        help="how the bulk job stores entries (the seed's way always writes raw)",
    )
    parser.add_argument("--dir", help="where to make the temporary work folder (removed at the end)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    args = parser.parse_args(argv)
    # The engine wants an explicit device ("cuda:0"), as `vggt-cache precompute` gives it.
    args.device = parse_devices(args.device)[0]
    on_cuda = args.device.startswith("cuda")
    small = not on_cuda and args.preset  # 19,089 tokens a clip at 644 px: a CPU needs a small model
    args.n = args.n or (24 if args.preset else 128)
    args.size = args.size or (PRESETS[args.preset]["size"] if args.preset else 518 if on_cuda else 224)
    # A CPU runs one 19,089-token clip per forward fastest (batch 9 frames measured 1.29x the seed, 18: 1.15x).
    args.batch_size = args.batch_size or (32 if on_cuda else 9 if args.preset else 8)
    # With --preset on a CPU: embed 256 in 4 heads keeps VGGT-1B's head width (64), so attention runs as
    # efficiently as there and DINOv2's share of the time is near VGGT-1B's (benchmarks/clip.py).
    args.embed_dim = args.embed_dim or (1024 if on_cuda else 256)
    args.depth = args.depth or (24 if on_cuda else 2 if small else 4)
    args.num_heads = args.num_heads or (16 if on_cuda else 4)
    if min(args.n, args.batch_size, args.rounds) < 1:
        parser.error("--n, --batch-size and --rounds must be at least 1")
    if args.depth < 2:
        parser.error("--depth must be at least 2 (the features are layer -2)")

    folder = tempfile.mkdtemp(prefix="vggt-precompute-bench-", dir=args.dir)
    try:
        result = run(args, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        report(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
