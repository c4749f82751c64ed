"""Helpers shared by the benchmarks: test images, models, device timing, tables."""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# Runnable from a plain checkout (`python benchmarks/x.py`), installed or not.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vggt_cache.service.model import AggregatorConfig, LoadedModel, VGGTAggregator, load_aggregator


def make_images(
    folder: str | os.PathLike,
    n: int,
    width: int = 640,
    height: int = 480,
    seed: int = 0,
    name: str = "frame_{i:05d}.jpg",
) -> list[str]:
    """N JPEGs (quality 90) of smooth gradients plus mild noise: photo-like sizes and decode cost.

    `name` formats each file's name from its index `i` (e.g. "step_{i}_MOVE_FORWARD.jpg" for an episode).
    """
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    paths = []
    for i in range(n):
        base = np.stack([(x + 7 * i) % 256, (y + 13 * i) % 256, ((x + y) // 2 + 29 * i) % 256], -1)
        noise = rng.integers(-12, 13, size=base.shape)
        pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
        path = os.path.join(folder, name.format(i=i))
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


def random_model(config: dict, device: str, seed: int = 0) -> LoadedModel:
    """An aggregator of `config` with random weights, initialised directly on `device` (no download, no copy)."""
    cfg = AggregatorConfig.from_dict(config)
    torch.manual_seed(seed)
    with torch.device(device):
        model = VGGTAggregator(cfg)
    model.eval().requires_grad_(False)
    digest = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()
    return LoadedModel(
        model=model,
        config=cfg,
        fingerprint=f"sha256:{digest}",
        source=f"random weights (seed {seed})",
        num_params=sum(p.numel() for p in model.parameters()),
    )


def get_model(source: str | None, config: dict, device: str) -> LoadedModel:
    """`source` loaded with the service's loader, or random weights of `config` when `source` is None."""
    if source is None:
        return random_model(config, device)
    return load_aggregator(source, device=device)


def block_flops(tokens: int, dim: int, hidden: int, pairs: float) -> float:
    """One pre-norm transformer block over `tokens` tokens attending `pairs` (query, key) pairs."""
    return 2.0 * tokens * dim * (4 * dim + 2 * hidden) + 4.0 * pairs * dim


def clip_flops(
    cfg: AggregatorConfig,
    height: int,
    width: int,
    blocks: int,
    frames: int = 1,
    attention: str = "causal",
    embedded: int | None = None,
) -> float:
    """FLOPs of one clip of `frames` frames (1 in frame mode) through `blocks` frame+global block pairs.

    Global attention over the clip is block-causal ("causal") or full ("sequence"); `embedded`
    of the frames (default all) go through DINOv2.
    """
    p = cfg.patch_size
    patches = (height // p) * (width // p)
    tokens = 1 + cfg.num_register_tokens + patches  # DINOv2: cls; aggregator: camera; both + registers
    pe = cfg.patch_embed
    conv = 2.0 * 3 * p * p * pe.embed_dim * patches
    dino = pe.depth * block_flops(tokens, pe.embed_dim, int(pe.embed_dim * pe.mlp_ratio), tokens**2)
    hidden = int(cfg.embed_dim * cfg.mlp_ratio)
    frame = blocks * block_flops(tokens, cfg.embed_dim, hidden, tokens**2)
    pairs = (frames * tokens) ** 2 if attention == "sequence" else tokens**2 * frames * (frames + 1) / 2
    global_ = blocks * block_flops(frames * tokens, cfg.embed_dim, hidden, pairs)
    return (conv + dino) * (frames if embedded is None else embedded) + frame * frames + global_


def synchronize(device: torch.device | str) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(step: Callable[[], object], device: torch.device | str, iters: int, warmup: int) -> float:
    """Median wall time of `step()` over `iters` runs after `warmup` runs, device work included."""
    for _ in range(warmup):
        step()
    synchronize(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]], file=None) -> None:
    """Right-aligned columns, first column left-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for r in cells:
        line = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)]
        print("  ".join(line), file=file)


def write_json(path: str | os.PathLike, data: dict) -> None:
    """Atomic: a reader (or a run killed mid-write) never sees half a file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)
