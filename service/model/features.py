"""Aggregator outputs -> cache-entry tensors: the one definition the service and training share."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from client.spec import FeatureSpec

if TYPE_CHECKING:
    from service.model.loader import LoadedModel


def select_features(outputs: Sequence[Tensor], patch_start_idx: int, spec: FeatureSpec) -> Tensor:
    """The cache entries of every frame, in the spec's storage dtype.

    ``outputs`` are the aggregator's outputs for ``layers=list(spec.layers)``, each
    ``[B, S, P_all, C]``. Returns ``[B, S, P, C]`` for one layer or ``[B, S, L, P, C]``
    for several (layers in spec order), so ``result[b, s]`` is the ``"features"``
    tensor of frame ``s`` of clip ``b``. ``P`` counts patch tokens only when
    ``spec.tokens == "patch"``, every token when ``"all"``.

    The result may be a view: clone an entry before ``torch.save`` so the file
    does not carry the whole batch's storage.
    """
    if len(outputs) != len(spec.layers):
        raise ValueError(
            f"expected {len(spec.layers)} layer output(s) for layers {list(spec.layers)}, got {len(outputs)}"
        )
    start = patch_start_idx if spec.tokens == "patch" else 0
    layers = [out[:, :, start:] for out in outputs]  # each [B, S, P, C]
    if len(layers) == 1:
        return layers[0].to(spec.torch_dtype)
    return torch.stack(layers, dim=2).to(spec.torch_dtype)  # [B, S, L, P, C]


def model_spec(loaded: "LoadedModel", **options: object) -> FeatureSpec:
    """The spec of the features `loaded` computes; `options` are FeatureSpec's other fields (layers, dtype, ...)."""
    return FeatureSpec(fingerprint=loaded.fingerprint, architecture=loaded.config.to_dict(), **options)


def feature_autocast(device: torch.device) -> AbstractContextManager:
    """The precision VGGT runs in: bfloat16 autocast on CUDA (VGGT's own inference setting), else the model's dtype.

    The service and online training both use it, so a cached entry and one computed
    during training come from the same arithmetic, whatever autocast surrounds the call.
    """
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def compute_features(aggregator: torch.nn.Module, images: Tensor, spec: FeatureSpec, **kwargs) -> Tensor:
    """Run ``aggregator`` on ``images`` ``[B, S, 3, H, W]`` as ``spec`` says; entries as :func:`select_features`.

    No gradients; the result can still feed a trainable module. Extra keyword arguments
    (e.g. a ``kv_cache`` for causal streaming) go to the aggregator.
    """
    with torch.no_grad(), feature_autocast(images.device):
        outputs, patch_start_idx = aggregator(images, attention=spec.attention, layers=list(spec.layers), **kwargs)
        return select_features(outputs, patch_start_idx, spec)
