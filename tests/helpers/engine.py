"""What the engine's tests share: a spec of the tiny model, small random images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from vggt_cache.client.spec import FeatureSpec

SIZE = 56  # 80x60 images crop to 42x56: a 3x4 patch grid


def make_spec(loaded, **overrides) -> FeatureSpec:
    return FeatureSpec(
        **{"fingerprint": loaded.fingerprint, "architecture": loaded.config.to_dict(), "size": SIZE, **overrides}
    )


def write_image(path: Path, seed: int, size: tuple[int, int] = (80, 60), black: bool = False) -> str:
    shape = (size[1], size[0], 3)
    pixels = np.zeros(shape, np.uint8) if black else np.random.default_rng(seed).integers(0, 256, shape, np.uint8)
    Image.fromarray(pixels).save(path)
    return str(path)


def images(folder: Path, n: int, first_seed: int = 0) -> list[str]:
    folder.mkdir(exist_ok=True)
    return [write_image(folder / f"img_{i:03d}.png", first_seed + i) for i in range(n)]
