"""Qwen2.5-VL with VGGT spatial features added to the current frame's visual tokens.

Per sample, the VGGT features of the current frame (the sample's last image)
come either from the cache (``vggt_features``: the sibling file's
``"features"`` tensor) or from the frozen aggregator run here on the sample's
frames (``images_vggt``). Both paths go through the same cache-entry function
(:func:`service.model.features.compute_features`: same layers, same tokens, same
precision, same storage-dtype cast), so a cached sample trains as if its
features had been computed online.

Input pipeline: Qwen's image and VGGT's last frame must be the same ``H x W``
image, 28-aligned (e.g. ``service.preprocess.preprocess(img, "pad", 504, 28)``
handed to Qwen's image processor with ``do_resize=False, do_rescale=False``):
Qwen then yields ``(H/28)*(W/28)`` tokens and VGGT ``(H/14)*(W/14)`` patches,
which :class:`~training.merger.VGGTMerger` merges 2x2 into the same count.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from client.spec import FeatureSpec
from service.model import LoadedModel
from service.model.features import compute_features
from training.merger import VGGTMerger

FUSION_FILE = "vggt_fusion.json"
MERGER_FILE = "vggt_merger.safetensors"


class Qwen25VLWithVGGT(nn.Module):
    """``Qwen2_5_VLForConditionalGeneration`` + frozen VGGT aggregator + trainable :class:`VGGTMerger`.

    The current frame's visual tokens become ``qwen_tokens + vggt_weight * merger(vggt_patches)``.
    """

    # HF Trainer: like Qwen2.5-VL itself, the loss takes no `num_items_in_batch`.
    accepts_loss_kwargs = False

    def __init__(
        self,
        qwen: Qwen2_5_VLForConditionalGeneration,
        vggt: LoadedModel,
        spec: FeatureSpec,
        vggt_weight: float = 1.0,
        merger_hidden_dim: int | None = None,
    ) -> None:
        super().__init__()
        # Online features equal cached ones only if both come from the same weights.
        if vggt.fingerprint != spec.fingerprint:
            raise ValueError(f"VGGT weights {vggt.fingerprint} are not the spec's {spec.fingerprint}")
        arch = vggt.config.to_dict()
        if arch != spec.architecture:
            raise ValueError("the VGGT aggregator's architecture differs from the feature spec's")
        vision = qwen.config.vision_config
        if arch["patch_size"] != vision.patch_size:
            raise ValueError(f"VGGT patch size {arch['patch_size']} differs from Qwen's {vision.patch_size}")
        self.qwen = qwen
        self.vggt = vggt.model.requires_grad_(False).eval()
        self.spec = spec
        self.vggt_weight = vggt_weight
        self.patch_start_idx = vggt.config.patch_start_idx
        self.feature_dim = 2 * arch["embed_dim"]  # C of one layer's tokens (frame + global halves)
        self.merger = VGGTMerger(
            vggt_dim=len(spec.layers) * self.feature_dim,
            llm_dim=qwen.config.text_config.hidden_size,
            spatial_merge=vision.spatial_merge_size,
            hidden_dim=merger_hidden_dim,
        ).to(device=qwen.device, dtype=qwen.dtype)

    def save_pretrained(self, output_dir: str | os.PathLike) -> None:
        """Qwen in transformers' format, plus the merger and the fusion settings.

        The VGGT weights are not copied: ``spec.fingerprint`` names them.
        """
        out = Path(output_dir)
        self.qwen.save_pretrained(out)
        save_file({k: v.contiguous() for k, v in self.merger.state_dict().items()}, out / MERGER_FILE)
        fusion = {
            "spec": self.spec.to_dict(),
            "vggt_weight": self.vggt_weight,
            "merger_hidden_dim": self.merger.hidden_dim,
        }
        (out / FUSION_FILE).write_text(json.dumps(fusion, indent=2))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, vggt: LoadedModel, **qwen_kwargs) -> Qwen25VLWithVGGT:
        """Load what :meth:`save_pretrained` wrote; ``qwen_kwargs`` go to transformers' ``from_pretrained``."""
        path = Path(path)
        fusion = json.loads((path / FUSION_FILE).read_text())
        qwen = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, **qwen_kwargs)
        spec = FeatureSpec.from_dict(fusion["spec"])
        model = cls(qwen, vggt, spec, fusion["vggt_weight"], fusion["merger_hidden_dim"])
        model.merger.load_state_dict(load_file(path / MERGER_FILE))
        return model

    @property
    def config(self) -> Qwen2_5_VLConfig:
        return self.qwen.config

    def train(self, mode: bool = True) -> Qwen25VLWithVGGT:
        super().train(mode)
        self.vggt.eval()  # a fixed feature extractor, the same function the cache service runs
        return self

    def activation_checkpointing_enable(self, **kwargs) -> None:
        """What HF Trainer calls for ``activation_checkpointing=True``; VGGT runs without gradients anyway."""
        self.qwen.activation_checkpointing_enable(**kwargs)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        pixel_values: Tensor | None = None,
        image_grid_thw: Tensor | None = None,
        labels: Tensor | None = None,
        vggt_features: Sequence[Tensor | None] | None = None,
        images_vggt: Sequence[Tensor | None] | None = None,
        mm_token_type_ids: Tensor | None = None,
        **kwargs,
    ):
        """HF-style forward; returns Qwen's output (``.loss`` when ``labels`` are given).

        ``vggt_features[b]``: sample b's cached entry, ``[P, C]`` or ``[L, P, C]`` in the
        spec's storage dtype, or None. ``images_vggt[b]``: its frames ``[S, 3, H, W]`` in
        ``[0, 1]``, the current frame last, used when it has no cached entry.
        """
        if mm_token_type_ids is None:
            # Without it transformers falls back to 1-D positions for the visual tokens.
            mm_token_type_ids = self._token_types(input_ids)
        encoder_outputs = None
        if pixel_values is not None:
            encoder_outputs = self.qwen.model.get_image_features(pixel_values, image_grid_thw, return_dict=True)
            encoder_outputs.pooler_output = self._add_vggt(
                list(encoder_outputs.pooler_output), input_ids, image_grid_thw, vggt_features, images_vggt
            )
            encoder_outputs = {"image": encoder_outputs}
        elif _any(vggt_features) or _any(images_vggt):
            raise ValueError("VGGT inputs were given for a batch without images")
        return self.qwen(
            input_ids=input_ids,
            attention_mask=attention_mask,
            image_grid_thw=image_grid_thw,
            labels=labels,
            mm_token_type_ids=mm_token_type_ids,
            mm_encoder_outputs=encoder_outputs,
            **kwargs,
        )

    def _add_vggt(
        self,
        embeds: list[Tensor],
        input_ids: Tensor,
        image_grid_thw: Tensor,
        vggt_features: Sequence[Tensor | None] | None,
        images_vggt: Sequence[Tensor | None] | None,
    ) -> tuple[Tensor, ...]:
        """Add the merged VGGT tokens to each sample's current image; ``embeds[i]``: ``[t*h*w/4, D]``."""
        config = self.qwen.config
        merge = config.vision_config.spatial_merge_size
        current = current_images(input_ids, image_grid_thw, merge, config.image_token_id)
        batch = len(current)
        vggt_features = _per_sample("vggt_features", vggt_features, batch)
        images_vggt = _per_sample("images_vggt", images_vggt, batch)
        grids = {b: tuple(image_grid_thw[i, 1:].tolist()) for b, i in enumerate(current) if i is not None}
        entries = {b: f for b, f in enumerate(vggt_features) if f is not None}
        online = {}
        for b, i in enumerate(current):
            if i is None:
                if b in entries or images_vggt[b] is not None:
                    raise ValueError(f"sample {b} has VGGT inputs but no image")
            elif b not in entries:
                if images_vggt[b] is None:
                    raise ValueError(f"sample {b} has neither vggt_features nor images_vggt")
                online[b] = self._check_frames(b, images_vggt[b], grids[b])
        entries.update(self._compute_entries(online))
        for b, entry in sorted(entries.items()):  # a fixed order keeps cached and online paths bit-equal
            tokens = self._entry_to_patches(b, entry, grids[b])  # [h*w, L*C]
            merged = self.merger(tokens[None].to(self.merger.dtype), grids[b])[0]  # [h*w/4, D]
            i = current[b]
            embeds[i] = embeds[i] + self.vggt_weight * merged.to(embeds[i].dtype)
        return tuple(embeds)

    def _check_frames(self, b: int, frames: Tensor, grid: tuple[int, int]) -> Tensor:
        if frames.ndim != 4 or frames.shape[1] != 3:
            raise ValueError(f"sample {b}: images_vggt must be [S, 3, H, W], got {list(frames.shape)}")
        qwen_size = (grid[0] * self.vggt.patch_size, grid[1] * self.vggt.patch_size)
        if tuple(frames.shape[-2:]) != qwen_size:
            raise ValueError(
                f"sample {b}: images_vggt frames are {frames.shape[-2]}x{frames.shape[-1]} but Qwen's image is "
                f"{qwen_size[0]}x{qwen_size[1]}; both must see the same image"
            )
        # Frame attention makes the context irrelevant: only the current frame is computed.
        return frames[-1:] if self.spec.attention == "frame" else frames

    def _compute_entries(self, clips: dict[int, Tensor]) -> dict[int, Tensor]:
        """Cache entries of each clip's last frame, computed by the frozen aggregator.

        Clips of one shape share a forward pass.
        """
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for b, frames in clips.items():
            groups[tuple(frames.shape)].append(b)
        device = self.vggt.camera_token.device
        entries = {}
        for samples in groups.values():
            images = torch.stack([clips[b] for b in samples]).to(device)  # [B, S, 3, H, W]
            last = compute_features(self.vggt, images, self.spec)[:, -1]  # [B, P, C] | [B, L, P, C]
            entries.update(zip(samples, last))
        return entries

    def _entry_to_patches(self, b: int, entry: Tensor, grid: tuple[int, int]) -> Tensor:
        """A cache entry ``[P, C]`` / ``[L, P, C]`` -> its patch tokens ``[h*w, L*C]`` (layers side by side)."""
        h, w = grid
        start = self.patch_start_idx if self.spec.tokens == "all" else 0
        layers = len(self.spec.layers)
        expected = (start + h * w, self.feature_dim) if layers == 1 else (layers, start + h * w, self.feature_dim)
        if tuple(entry.shape) != expected:
            raise ValueError(
                f"sample {b}: VGGT features have shape {list(entry.shape)}, expected {list(expected)} "
                f"for a {h}x{w} patch grid (layers={list(self.spec.layers)}, tokens={self.spec.tokens!r})"
            )
        if entry.dtype != self.spec.torch_dtype:
            raise ValueError(
                f"sample {b}: VGGT features are {entry.dtype}, the spec stores {self.spec.torch_dtype}"
            )
        entry = entry.to(self.merger.norm.weight.device)
        if layers == 1:
            return entry[start:]
        return entry[:, start:].permute(1, 0, 2).reshape(h * w, layers * self.feature_dim)

    def _token_types(self, input_ids: Tensor) -> Tensor:
        config = self.qwen.config
        return (input_ids == config.image_token_id).int() + 2 * (input_ids == config.video_token_id).int()


def current_images(input_ids: Tensor, image_grid_thw: Tensor, merge: int, image_token_id: int) -> list[int | None]:
    """Per sample, the index (into ``image_grid_thw``) of its last image; None for samples without one.

    Images are assigned to rows in order, by counting each row's image tokens.
    """
    tokens_per_image = (image_grid_thw.prod(-1) // merge**2).tolist()
    counts = (input_ids == image_token_id).sum(-1).tolist()
    current: list[int | None] = []
    i = 0
    for b, remaining in enumerate(counts):
        if remaining == 0:
            current.append(None)
            continue
        while remaining > 0 and i < len(tokens_per_image):
            remaining -= tokens_per_image[i]
            i += 1
        if remaining != 0:
            raise ValueError(f"sample {b}: its image tokens do not line up with image_grid_thw")
        current.append(i - 1)
    if i != len(tokens_per_image):
        raise ValueError(f"image_grid_thw lists {len(tokens_per_image)} images, the tokens account for {i}")
    return current


def _per_sample(name: str, values: Sequence[Tensor | None] | None, batch: int) -> list[Tensor | None]:
    if values is None:
        return [None] * batch
    if len(values) != batch:
        raise ValueError(f"{name} has {len(values)} entries for a batch of {batch}")
    return list(values)


def _any(values: Sequence[Tensor | None] | None) -> bool:
    return values is not None and any(v is not None for v in values)
