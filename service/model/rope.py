"""2D rotary position embedding: the first half of each head rotates with y, the second with x."""

from __future__ import annotations

import torch
from torch import Tensor


def patch_positions(h: int, w: int, num_special: int, device: torch.device) -> Tensor:
    """(y, x) of every token of one frame, [num_special + h*w, 2]: special tokens at 0, patches from 1."""
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    patches = torch.stack((ys.flatten(), xs.flatten()), dim=-1) + 1
    return torch.cat((patches.new_zeros(num_special, 2), patches))


def rope_tables(positions: Tensor, head_dim: int, base: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and sin, each [N, head_dim], for integer (y, x) `positions` [N, 2]."""
    half = head_dim // 2
    # Angles in float32 as the reference computes them; cos/sin in at least float32.
    inv_freq = 1.0 / (base ** (torch.arange(0, half, 2, device=positions.device).float() / half))
    angles = positions.float()[..., None] * inv_freq  # [N, 2, half/2]
    angles = torch.cat((angles, angles), dim=-1).flatten(-2)  # [N, head_dim]: y block, then x block
    angles = angles.to(torch.promote_types(dtype, torch.float32))
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate `x` [..., N, head_dim] by the tables of `rope_tables` (broadcast over leading dims)."""
    quarter = x.shape[-1] // 4
    pairs = x.unflatten(-1, (2, 2, quarter))  # [..., (y|x), (first|second half), quarter]
    rotated = torch.stack((-pairs[..., 1, :], pairs[..., 0, :]), dim=-2).flatten(-3)
    return x * cos + rotated * sin
