"""VGGT's aggregator: DINOv2 patch tokens, then alternating frame and global attention blocks."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from torch import Tensor, nn

from vggt_cache.client.spec import ATTENTION, Attention, normalise_layers
from vggt_cache.service.model.config import AggregatorConfig
from vggt_cache.service.model.dinov2 import DinoV2Encoder
from vggt_cache.service.model.kv_cache import KVCache
from vggt_cache.service.model.layers import Block
from vggt_cache.service.model.rope import patch_positions, rope_tables

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class VGGTAggregator(nn.Module):
    """The VGGT aggregator; ``state_dict()`` keys are the official ones without ``aggregator.``."""

    _resnet_mean: Tensor  # buffers, made by reset_buffers
    _resnet_std: Tensor

    def __init__(self, config: AggregatorConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_size = config.patch_size
        self.patch_start_idx = config.patch_start_idx
        self.patch_embed = DinoV2Encoder(
            config.patch_embed, config.img_size, config.patch_size, config.num_register_tokens
        )
        blocks = partial(
            Block, config.embed_dim, config.num_heads, config.mlp_ratio, config.init_values, config.qk_norm
        )
        self.frame_blocks = nn.ModuleList(blocks() for _ in range(config.depth))
        self.global_blocks = nn.ModuleList(blocks() for _ in range(config.depth))
        # Index 0: the first frame of a clip; index 1: every later frame.
        self.camera_token = nn.Parameter(torch.zeros(1, 2, 1, config.embed_dim))
        self.register_token = nn.Parameter(torch.zeros(1, 2, config.num_register_tokens, config.embed_dim))
        self.causal_impl = "chunked"  # "chunked" | "mask" (the reference): see _aggregate; results are equal
        self.reset_buffers()
        self._init_weights()

    def reset_buffers(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        """(Re)create the non-persistent normalisation buffers, e.g. after building on the meta device."""
        for name, values in (("_resnet_mean", _IMAGENET_MEAN), ("_resnet_std", _IMAGENET_STD)):
            buffer = torch.tensor(values, dtype=torch.float32, device=device).view(1, 3, 1, 1)
            self.register_buffer(name, buffer.to(dtype) if dtype is not None else buffer, persistent=False)

    def _init_weights(self) -> None:
        """Fresh-model initialisation (as the reference); loading a checkpoint replaces it."""
        if self.camera_token.is_meta:
            return  # nothing to fill, and random init on meta tensors costs a slow one-off import
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.patch_embed.pos_embed, std=0.02)
        tokens = (self.patch_embed.cls_token, self.patch_embed.register_tokens, self.camera_token, self.register_token)
        for token in tokens:
            nn.init.normal_(token, std=1e-6)

    def forward(
        self,
        images: Tensor,
        attention: str = "sequence",
        layers: Sequence[int] | None = None,
        kv_cache: KVCache | None = None,
        patches: Tensor | None = None,
    ) -> tuple[list[Tensor], int]:
        """Images [B, S, 3, H, W] in [0, 1] -> ([B, S, P_all, 2*C] per requested layer, patch_start_idx).

        ``frame``: every frame alone; ``sequence``: global attention over each clip; ``causal``: frame t
        attends to frames <= t. ``kv_cache`` (causal only) continues a clip across calls.
        ``patches``: the frames' DINOv2 tokens [B, S, h*w, C] from :meth:`embed_patches`, computed
        earlier (they depend on each frame alone), instead of computing them here.
        """
        if attention not in ATTENTION:
            raise ValueError(f"attention must be one of {'|'.join(ATTENTION)}, got {attention!r}")
        if kv_cache is not None and attention != Attention.CAUSAL:
            raise ValueError("kv_cache needs attention='causal'")
        if images.ndim != 5 or images.shape[2] != 3:
            raise ValueError(f"images must be [B, S, 3, H, W], got {list(images.shape)}")
        B, S, _, H, W = images.shape
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {self.patch_size}")
        grid_tokens = (H // self.patch_size) * (W // self.patch_size)
        if patches is not None and tuple(patches.shape) != (B, S, grid_tokens, self.config.embed_dim):
            raise ValueError(
                f"patches must be {[B, S, grid_tokens, self.config.embed_dim]} for these images, "
                f"got {list(patches.shape)}"
            )
        wanted = list(range(self.config.depth)) if layers is None else list(normalise_layers(layers, self.config.depth))
        if attention == Attention.FRAME:
            # A clip of one frame: global attention over it is frame attention with the global weights.
            if patches is not None:
                patches = patches.reshape(B * S, 1, grid_tokens, -1)
            outputs = self._aggregate(
                images.reshape(B * S, 1, 3, H, W), wanted, causal=False, kv_cache=None, patches=patches
            )
            return [out.view(B, S, *out.shape[2:]) for out in outputs], self.patch_start_idx
        causal = attention == Attention.CAUSAL
        return self._aggregate(images, wanted, causal, kv_cache, patches), self.patch_start_idx

    def _aggregate(
        self, images: Tensor, wanted: list[int], causal: bool, kv_cache: KVCache | None, patches: Tensor | None = None
    ) -> list[Tensor]:
        B, S, _, H, W = images.shape
        h, w = H // self.patch_size, W // self.patch_size
        P = self.patch_start_idx + h * w
        num_layers = max(wanted) + 1
        past_frames = 0
        if kv_cache is not None:
            past_frames = kv_cache.num_frames
            num_layers = kv_cache.begin(B, P, num_layers)

        if patches is None:
            patches = self.embed_patches(images.reshape(B * S, 3, H, W))  # [B*S, h*w, C]
        tokens = self._embed(patches.reshape(B, S, h * w, -1), first_frame=past_frames)  # [B*S, P, C]
        C = tokens.shape[-1]
        rope = None
        if self.config.rope_freq > 0:
            positions = patch_positions(h, w, self.patch_start_idx, images.device)
            rope = rope_tables(positions, C // self.config.num_heads, self.config.rope_freq, tokens.dtype)
        global_rope = None if rope is None else (rope[0].repeat(S, 1), rope[1].repeat(S, 1))  # [S*P, head_dim]
        # Block-causal global attention: per frame against its prefix ("chunked", no mask), or the
        # reference dense boolean mask of (S*P)^2 entries ("mask", 364 MB for 9 frames at 644 px).
        mask = frame_tokens = None
        if causal and S > 1:
            if self.causal_impl == "mask":
                mask = _block_causal_mask(S, P, past_frames, images.device)
            else:
                frame_tokens = P

        kept: dict[int, Tensor] = {}
        for i in range(num_layers):
            tokens = self.frame_blocks[i](tokens.view(B * S, P, C), rope=rope)
            frame_out = tokens.view(B, S, P, C)
            kv_update = None if kv_cache is None else partial(kv_cache.append, i)
            tokens = self.global_blocks[i](
                tokens.view(B, S * P, C),
                rope=global_rope,
                attn_mask=mask,
                kv_update=kv_update,
                frame_tokens=frame_tokens,
            )
            if i in wanted:
                kept[i] = torch.cat((frame_out, tokens.view(B, S, P, C)), dim=-1)  # [B, S, P, 2C]
        if kv_cache is not None:
            kv_cache.end(S)
        return [kept[i] for i in wanted]

    def embed_patches(self, frames: Tensor) -> Tensor:
        """DINOv2 patch tokens of frames [N, 3, H, W] in [0, 1] -> [N, h*w, C]; each frame's depend on it alone."""
        x = frames.to(self._resnet_mean.dtype)
        return self.patch_embed((x - self._resnet_mean) / self._resnet_std)

    def _embed(self, patches: Tensor, first_frame: int) -> Tensor:
        """Camera, register and patch tokens [B*S, P, C] from patches [B, S, h*w, C].

        `first_frame` is the clip index of frame 0 of `patches`.
        """
        B, S, _, C = patches.shape
        # Token 0 for the clip's first frame, token 1 for the others.
        which = (torch.arange(first_frame, first_frame + S, device=patches.device) > 0).long()
        special = torch.cat((self.camera_token[0, which], self.register_token[0, which]), dim=1)  # [S, 1+R, C]
        special = special.unsqueeze(0).expand(B, -1, -1, -1).reshape(B * S, -1, C)
        return torch.cat((special, patches.reshape(B * S, -1, C)), dim=1)


def _block_causal_mask(num_frames: int, tokens_per_frame: int, past_frames: int, device: torch.device) -> Tensor:
    """Boolean mask [S*P, (past+S)*P]: True where a query's frame may attend to a key's frame."""
    query_frame = torch.arange(past_frames, past_frames + num_frames, device=device)
    key_frame = torch.arange(past_frames + num_frames, device=device)
    allowed = key_frame[None, :] <= query_frame[:, None]  # [S, past+S]
    return allowed.repeat_interleave(tokens_per_frame, 0).repeat_interleave(tokens_per_frame, 1)
