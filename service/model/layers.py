"""Transformer building blocks shared by the DINOv2 encoder and the alternating-attention blocks."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vggt_cache.service.model.rope import apply_rope

# Receives a block's new keys and values [B, heads, N, head_dim]; returns the ones to attend to
# (earlier frames' keys/values prepended when streaming).
KVUpdate = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


class Attention(nn.Module):
    """Multi-head self-attention with optional per-head LayerNorm on q/k and 2D RoPE."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor] | None = None,
        attn_mask: Tensor | None = None,
        kv_update: KVUpdate | None = None,
        frame_tokens: int | None = None,
    ) -> Tensor:
        """`frame_tokens`: block-causal over frames of that many tokens, without a mask: each frame's
        queries attend to the keys of every frame up to and including their own (earlier ones from
        `kv_update` too), one attention call per frame, so no [N, N] mask is ever built."""
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B, heads, N, head_dim]
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if kv_update is not None:
            k, v = kv_update(k, v)  # [B, heads, N_past + N, head_dim]
        if frame_tokens is None:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        else:
            past = k.shape[2] - N  # keys of frames fed before this call
            x = torch.cat(
                [
                    F.scaled_dot_product_attention(
                        q[:, :, start : start + frame_tokens],
                        k[:, :, : past + start + frame_tokens],
                        v[:, :, : past + start + frame_tokens],
                    )
                    for start in range(0, N, frame_tokens)
                ],
                dim=2,
            )  # [B, heads, N, head_dim]
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init_values))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block with LayerScale on both residual branches."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        init_values: float,
        qk_norm: bool = False,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qk_norm=qk_norm)
        self.ls1 = LayerScale(dim, init_values)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, init_values)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor] | None = None,
        attn_mask: Tensor | None = None,
        kv_update: KVUpdate | None = None,
        frame_tokens: int | None = None,
    ) -> Tensor:
        x = x + self.ls1(
            self.attn(self.norm1(x), rope=rope, attn_mask=attn_mask, kv_update=kv_update, frame_tokens=frame_tokens)
        )
        return x + self.ls2(self.mlp(self.norm2(x)))
