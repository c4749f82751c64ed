"""How the model sits on its device for a service's lifetime: the weights' dtype, and optional compile."""

from __future__ import annotations

import torch
from torch import nn

from .aggregator import VGGTAggregator

_SIXTEEN_BIT = (torch.bfloat16, torch.float16)


def weights_dtype(device: torch.device, storage_dtype: torch.dtype, fp32_weights: bool = False) -> torch.dtype:
    """bfloat16 on CUDA when entries are stored in 16 bits, else float32.

    On CUDA the forward runs under bfloat16 autocast (`feature_autocast`), which casts every
    float32 weight of a matmul again on every forward; resident bfloat16 weights skip that
    (and halve their memory). Entries stored in float32 keep float32 weights, and so does
    `fp32_weights` (float32 weights + autocast, the reference VGGT inference setting). The CPU
    computes in float32 throughout.
    """
    if device.type == "cuda" and storage_dtype in _SIXTEEN_BIT and not fp32_weights:
        return torch.bfloat16
    return torch.float32


def make_resident(model: VGGTAggregator, device: torch.device, dtype: torch.dtype, compile: bool = False) -> nn.Module:
    """`model` on `device` with weights in `dtype`, in eval mode; `compile`: every transformer block compiled.

    The input normalisation stays in float32 whatever the weights' dtype, so a frame is
    normalised as the reference does before its first (autocast) convolution.
    """
    model = model.to(device=device, dtype=dtype).eval()
    model.reset_buffers(device, torch.float32)
    if compile:
        # Per block, not the whole model: the blocks of one kind share one compiled graph, and the
        # clip-length-dependent parts (block-causal chunks, the patch cache) stay in Python.
        for block in (*model.patch_embed.blocks, *model.frame_blocks, *model.global_blocks):
            block.compile()
    return model
