"""DINOv2 ViT with register tokens, used as VGGT's patch embedding (final-norm patch tokens out)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vggt_cache.service.model.config import PatchEmbedConfig
from vggt_cache.service.model.layers import Block


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, embed_dim: int, in_chans: int = 3) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [N, 3, H, W] -> [N, h*w, C]


class DinoV2Encoder(nn.Module):
    def __init__(self, cfg: PatchEmbedConfig, img_size: int, patch_size: int, num_register_tokens: int) -> None:
        super().__init__()
        dim = cfg.embed_dim
        self.patch_size = patch_size
        self.num_register_tokens = num_register_tokens
        self.interpolate_antialias = cfg.interpolate_antialias
        self.interpolate_offset = cfg.interpolate_offset
        self.patch_embed = PatchEmbed(patch_size, dim)
        grid = img_size // patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, num_register_tokens, dim))
        # Unused when extracting features, but part of the checkpoint.
        self.mask_token = nn.Parameter(torch.zeros(1, dim))
        self.blocks = nn.ModuleList(
            Block(dim, cfg.num_heads, cfg.mlp_ratio, cfg.init_values, norm_eps=1e-6) for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def interpolate_pos_encoding(self, h: int, w: int, dtype: torch.dtype) -> Tensor:
        """Position embedding [1, 1 + h*w, C] for an h x w patch grid (bicubic, from the square grid)."""
        num_patches = self.pos_embed.shape[1] - 1
        grid = int(math.sqrt(num_patches))
        if (h, w) == (grid, grid):
            return self.pos_embed.to(dtype)
        # Resampled in float32 whatever the model's dtype, as the reference does.
        pos = self.pos_embed.float()
        patch_pos = pos[:, 1:].reshape(1, grid, grid, -1).permute(0, 3, 1, 2)  # [1, C, grid, grid]
        if self.interpolate_offset:
            # DINOv2's legacy sizing: a scale factor nudged by the offset rather than an output size.
            scale = ((h + self.interpolate_offset) / grid, (w + self.interpolate_offset) / grid)
            resize: dict = {"scale_factor": scale}
        else:
            resize = {"size": (h, w)}
        patch_pos = F.interpolate(patch_pos, mode="bicubic", antialias=self.interpolate_antialias, **resize)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, h * w, -1)  # [1, h*w, C]
        return torch.cat((pos[:, :1], patch_pos), dim=1).to(dtype)

    def forward(self, images: Tensor) -> Tensor:
        """Normalised images [N, 3, H, W] -> final-norm patch tokens [N, h*w, C]."""
        N, _, H, W = images.shape
        x = self.patch_embed(images)
        x = torch.cat((self.cls_token.expand(N, -1, -1), x), dim=1)
        x = x + self.interpolate_pos_encoding(H // self.patch_size, W // self.patch_size, x.dtype)
        x = torch.cat((x[:, :1], self.register_tokens.expand(N, -1, -1), x[:, 1:]), dim=1)  # cls, registers, patches
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 1 + self.num_register_tokens :]
