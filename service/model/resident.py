"""How the model sits on its device for a service's lifetime: the weights' dtype, and optional compile."""

from __future__ import annotations

import torch
from torch import nn

from vggt_cache.service.model.aggregator import VGGTAggregator

_SIXTEEN_BIT = (torch.bfloat16, torch.float16)
# Graph variants one compiled block may need (every block kind runs one code object, Block.forward, so
# they share one limit): the warm-up's (about two per clip length, see engine/warmup.py), and room for
# the clip lengths and image sizes met later, per device.
VARIANTS_PER_DEVICE = 48


def weights_dtype(device: torch.device, storage_dtype: torch.dtype, fp32_weights: bool = False) -> torch.dtype:
    """bfloat16 on CUDA when entries are stored in 16 bits, else float32.

    On CUDA the forward runs under bfloat16 autocast (`feature_autocast`), which casts every
    float32 matmul and convolution weight to bfloat16 again on every forward; holding those
    weights in bfloat16 skips the casts (and halves their memory) and gives the same results.
    `fp32_weights` keeps them in float32 (the reference VGGT inference setting), as do entries
    stored in float32 and the CPU, which computes in float32 throughout.
    """
    if device.type == "cuda" and storage_dtype in _SIXTEEN_BIT and not fp32_weights:
        return torch.bfloat16
    return torch.float32


def make_resident(model: VGGTAggregator, device: torch.device, dtype: torch.dtype) -> VGGTAggregator:
    """`model` on `device` in eval mode, the weights (and biases) of its linear and conv layers in `dtype`.

    Only what autocast would cast anyway changes dtype: norms, LayerScale, the tokens, the position
    embedding and the input normalisation stay float32, so the residual streams add in float32 as
    with float32 weights, and the features are the same.
    """
    model = model.to(device=device, dtype=torch.float32).eval()
    if dtype != torch.float32:
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                module.to(dtype)
    model.reset_buffers(device, torch.float32)
    return model


def compile_blocks(model: VGGTAggregator, devices: int = 1, backend: str = "inductor") -> VGGTAggregator:
    """`torch.compile` every transformer block of `model`, in place.

    Per block, not the whole model: blocks of one kind share one compiled graph (a graph per
    shape, clip length and device), and the patch cache stays in Python. The recompile limit is
    raised so those variants are compiled instead of running eagerly past Dynamo's default of 8.
    `backend`: Dynamo's backend ("eager" traces and guards alike without generating code: tests).
    """

    global _recompile_limit
    _recompile_limit = max(_recompile_limit, VARIANTS_PER_DEVICE * devices)
    use_recompile_limit()
    for block in (*model.patch_embed.blocks, *model.frame_blocks, *model.global_blocks):
        block.compile(backend=backend)
    return model


_recompile_limit = 0  # what compile_blocks asked for, process-wide (0: nothing compiled)


def use_recompile_limit() -> None:
    """Raise Dynamo's recompile limit in the calling thread to what `compile_blocks` asked for (if anything).

    On newer torch (2.13 here) Dynamo's settings are context variables: a value set in the thread that
    compiled the model is not seen by the device threads that run it, which then fall back to eager
    after 8 graphs. Every thread that runs compiled blocks calls this first.
    """
    if _recompile_limit:
        import torch._dynamo.config as dynamo_config

        raise_recompile_limit(dynamo_config, _recompile_limit)


def raise_recompile_limit(dynamo_config: object, limit: int) -> None:
    """At least `limit` graphs per code object before Dynamo falls back to eager; torch < 2.6 names the
    setting cache_size_limit (later versions keep that name as an alias of recompile_limit)."""
    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    setattr(dynamo_config, name, max(getattr(dynamo_config, name), limit))


def compile_counts() -> dict[str, int]:
    """Dynamo's counts, process-wide: graphs compiled (one per block kind, shape and device), and frames it
    could not compile (each falls back to eager)."""
    from torch._dynamo.utils import counters

    return {
        "graphs": counters["stats"]["unique_graphs"],
        "frames_compiled": counters["frames"]["ok"],
        "frames_not_compiled": counters["frames"]["total"] - counters["frames"]["ok"],
    }
