"""Service settings: one dataclass built from CLI flags (or env vars), shared by serve and precompute."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

DEFAULT_MODEL = "facebook/VGGT-1B"
DEFAULT_PORT = 8600


@dataclass
class ServiceSettings:
    model: str = DEFAULT_MODEL
    device: str = "auto"  # every visible GPU, else the CPU
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    allowed_roots: list[str] = field(default_factory=list)
    state_dir: str = os.path.expanduser("~/.local/state/vggt-cache")
    api_token: str | None = None
    # FeatureSpec fields other than the model's (layers, tokens, preprocess, size, align, dtype, attention);
    # unset ones take FeatureSpec's defaults.
    spec: dict = field(default_factory=dict)
    max_batch_frames: int = 32
    max_wait_ms: float = 5.0
    decode_workers: int = 4
    write_workers: int = 4
    # Request limits: a body or item count past these is a 413, a deeper on-demand queue a 429.
    max_body_bytes: int = 4 * 1024 * 1024
    max_items_per_request: int = 512
    max_pending_units: int = 4096


def parse_devices(device: str) -> list[str]:
    """`auto` (every visible GPU, else the CPU), `cpu`, `cuda` (every visible GPU), `cuda:1` or `cuda:0,1`
    -> explicit device names."""
    device = device.strip()
    if device == "cpu":
        return ["cpu"]
    if device == "auto":
        import torch

        return [f"cuda:{i}" for i in range(torch.cuda.device_count())] or ["cpu"]
    if device == "cuda":
        import torch

        n = torch.cuda.device_count()
        if n == 0:
            raise ValueError("--device cuda: no CUDA device is visible (use --device cpu)")
        return [f"cuda:{i}" for i in range(n)]
    if device.startswith("cuda:"):
        ids = [s.strip() for s in device[len("cuda:"):].split(",") if s.strip()]
        if ids and all(s.isdigit() for s in ids):
            return [f"cuda:{s}" for s in ids]
    raise ValueError(f"--device must be auto, cpu, cuda, cuda:N or cuda:N,M; got {device!r}")
