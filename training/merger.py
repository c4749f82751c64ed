"""Project VGGT patch tokens onto Qwen2.5-VL's visual-token grid.

Qwen2.5-VL's vision tower turns each 2x2 block of 14-px patches into one LLM
token (its ``PatchMerger``). :class:`VGGTMerger` does the same to the VGGT
patch grid of the same image, so the two token sequences line up one to one.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def merge_grid(x: Tensor, grid: tuple[int, int], merge: int = 2) -> Tensor:
    """Gather each ``merge x merge`` block of a row-major patch grid into one token.

    ``x`` is ``[N, h*w, C]``; the result is ``[N, (h/merge)*(w/merge), merge*merge*C]``
    with blocks in row-major order and, inside a block, patches in row-major
    order: the layout of Qwen2.5-VL's image processor and ``PatchMerger``.

    Odd grids are refused: the caller cuts the VGGT grid to Qwen2.5-VL's (the even part of
    it, as ``Qwen25VLWithVGGT`` does) so the merged tokens line up with Qwen's.
    """
    h, w = grid
    n, p, c = x.shape
    if p != h * w:
        raise ValueError(f"expected {h}x{w}={h * w} patch tokens, got {p}")
    if h % merge or w % merge:
        raise ValueError(
            f"VGGT patch grid {h}x{w} is not divisible by the spatial merge {merge}; "
            "cut it to Qwen2.5-VL's even grid first"
        )
    x = x.reshape(n, h // merge, merge, w // merge, merge, c)
    x = x.permute(0, 1, 3, 2, 4, 5)  # [N, h/m, w/m, m, m, C]
    return x.reshape(n, (h // merge) * (w // merge), merge * merge * c)


class RMSNorm(nn.Module):
    """Qwen2's RMSNorm, which JanusVLN's merger uses: normalised in float32, scaled in the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


NORMS = {"layernorm": lambda dim: nn.LayerNorm(dim, eps=1e-6), "rmsnorm": RMSNorm}


class VGGTMerger(nn.Module):
    """2x2 spatial merge of VGGT patch tokens, then an MLP to the LLM width.

    Same recipe as Qwen2.5-VL's ``PatchMerger``: normalise each patch token (LayerNorm, or
    JanusVLN's RMSNorm), concatenate the ``merge x merge`` neighbours, Linear + GELU + Linear.
    """

    def __init__(
        self,
        vggt_dim: int,
        llm_dim: int,
        spatial_merge: int = 2,
        hidden_dim: int | None = None,
        norm: str = "layernorm",
    ) -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {'|'.join(NORMS)}, got {norm!r}")
        self.vggt_dim = vggt_dim
        self.spatial_merge = spatial_merge
        merged_dim = vggt_dim * spatial_merge**2
        self.hidden_dim = hidden_dim or merged_dim
        self.norm = NORMS[norm](vggt_dim)
        self.mlp = nn.Sequential(
            nn.Linear(merged_dim, self.hidden_dim),
            nn.GELU(),
            nn.Linear(self.hidden_dim, llm_dim),
        )

    def forward(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        """``x``: ``[N, h*w, vggt_dim]`` row-major patch tokens -> ``[N, (h/2)*(w/2), llm_dim]``."""
        if x.shape[-1] != self.vggt_dim:
            raise ValueError(f"expected VGGT tokens of width {self.vggt_dim}, got {x.shape[-1]}")
        x = self.norm(x)
        x = merge_grid(x, grid, self.spatial_merge)  # [N, h*w/4, 4*vggt_dim]
        return self.mlp(x)  # [N, h*w/4, llm_dim]

    @property
    def dtype(self) -> torch.dtype:
        return self.norm.weight.dtype
