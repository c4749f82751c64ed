"""Aggregator outputs -> cache-entry tensors: the one definition the service and training share."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from vggt_cache.client.spec import Attention, FeatureSpec

if TYPE_CHECKING:
    from vggt_cache.service.model.aggregator import VGGTAggregator
    from vggt_cache.service.model.loader import LoadedModel, ModelIdentity


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


def model_spec(loaded: LoadedModel | ModelIdentity, **options: Any) -> FeatureSpec:
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
    """Run ``aggregator`` on ``images`` ``[B, S, 3, H, W]`` in the order given, in the spec's attention mode.

    Every frame's features, as :func:`select_features` lays them out (``reference_frame`` is
    not applied here: :func:`entry_features` does that). No gradients; the result can still
    feed a trainable module. Extra keyword arguments (e.g. a ``kv_cache`` for causal
    streaming) go to the aggregator.
    """
    with torch.no_grad(), feature_autocast(images.device):
        outputs, patch_start_idx = aggregator(images, attention=spec.attention, layers=list(spec.layers), **kwargs)
        return select_features(outputs, patch_start_idx, spec)


def streams_reversed(spec: FeatureSpec) -> bool:
    """True when the model sees a clip newest frame first (``reference_frame="last"``)."""
    return spec.reference_frame == "last"  # FeatureSpec records "first" for frame attention


def frame_patches(aggregator: VGGTAggregator, frames: Tensor) -> Tensor:
    """DINOv2 patch tokens ``[N, h*w, C]`` of frames ``[N, 3, H, W]``, in the precision of a forward.

    What :func:`entry_features` takes as ``patches``: a frame's tokens depend on it alone, so
    clips that share a frame can share them.
    """
    with torch.no_grad(), feature_autocast(frames.device):
        return aggregator.embed_patches(frames)


def entry_features(
    aggregator: torch.nn.Module, images: Tensor, spec: FeatureSpec, patches: Tensor | None = None
) -> Tensor:
    """The cache entries of clips ``[B, S, 3, H, W]`` (frames in sample order, the current view last).

    frame/causal: ``[B, 1, ...]``, the entry filed under each clip's last frame: the output of
    the last frame the model sees, which is the clip's first frame when ``reference_frame`` is
    "last" (the clip streams reversed). sequence: ``[B, S, ...]``, one entry per frame in clip
    order. Layout as :func:`select_features`; one block-causal forward equals streaming the
    clip frame by frame with a fresh key/value cache. ``patches`` ``[B, S, h*w, C]``: the
    frames' :func:`frame_patches`, in the same order as ``images``, if already computed.
    """
    reverse = streams_reversed(spec)
    if reverse:
        images = images.flip(1)  # [B, S, 3, H, W], the current view first
        patches = None if patches is None else patches.flip(1)
    with torch.no_grad(), feature_autocast(images.device):
        outputs, patch_start_idx = aggregator(
            images, attention=spec.attention, layers=list(spec.layers), patches=patches
        )
        if spec.attention != Attention.SEQUENCE:
            # Only the last streamed frame has an entry: slice before the cast and the copy to the host.
            outputs = [o[:, -1:] for o in outputs]  # each [B, 1, P_all, C]
        elif reverse:
            outputs = [o.flip(1) for o in outputs]  # back to clip order
        return select_features(outputs, patch_start_idx, spec)
