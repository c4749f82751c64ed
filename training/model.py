"""Qwen2.5-VL with VGGT spatial features added to its visual tokens.

Per sample, the VGGT entry of the sample (filed under its last image) comes either
from the cache (``vggt_features``: the sibling file's ``"features"`` tensor) or from
the frozen aggregator run here on the sample's frames (``images_vggt``). Both paths
go through the same cache-entry function (:func:`service.model.features.entry_features`:
same layers, tokens, reference frame, precision and storage-dtype cast), so a cached
sample trains as if its features had been computed online.

Input pipeline: VGGT sees the preprocessed frame whole (``h x w`` patches); Qwen's
image processor gets the same pixels cut at the bottom/right to whole 2x2 blocks
(``training.data.qwen_crop``), so its grid is ``h - h % 2`` by ``w - w % 2`` patches.
The VGGT grid is cut the same way, then :class:`~training.merger.VGGTMerger` merges it
2x2 onto exactly Qwen's tokens (JanusVLN's arithmetic).

**Fusion** (:class:`Fusion`): the merged tokens, times ``vggt_weight``, are added to the
current frame's visual tokens (``add_to="current"``) or to every frame's of the sample
(``"all_frames"``, JanusVLN). ``FUSIONS["janusvln"]`` is JanusVLN's recipe: RMSNorm
merger, hidden width 4096, weight 0.2, all frames.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from vggt_cache.client.spec import FeatureSpec
from vggt_cache.client.storage import as_stored
from vggt_cache.service.model import LoadedModel
from vggt_cache.service.model.features import entry_features
from vggt_cache.training.merger import NORMS, VGGTMerger

FUSION_FILE = "vggt_fusion.json"
MERGER_FILE = "vggt_merger.safetensors"
ADD_TO = ("current", "all_frames")


@dataclass(frozen=True)
class Fusion:
    """How merged VGGT tokens join Qwen's visual tokens (see the module docstring)."""

    vggt_weight: float = 1.0
    merger_hidden_dim: int | None = None  # None: the merger's input width
    merger_norm: str = "layernorm"  # layernorm | rmsnorm
    add_to: str = "current"  # current | all_frames

    def __post_init__(self) -> None:
        if self.add_to not in ADD_TO:
            raise ValueError(f"add_to must be one of {'|'.join(ADD_TO)}, got {self.add_to!r}")
        if self.merger_norm not in NORMS:
            raise ValueError(f"merger_norm must be one of {'|'.join(NORMS)}, got {self.merger_norm!r}")


FUSIONS = {
    "default": Fusion(),
    "janusvln": Fusion(vggt_weight=0.2, merger_hidden_dim=4096, merger_norm="rmsnorm", add_to="all_frames"),
}


class Qwen25VLWithVGGT(nn.Module):
    """``Qwen2_5_VLForConditionalGeneration`` + frozen VGGT aggregator + trainable :class:`VGGTMerger`.

    The fused frames' visual tokens become ``qwen_tokens + vggt_weight * merger(vggt_patches)``.
    """

    # HF Trainer: like Qwen2.5-VL itself, the loss takes no `num_items_in_batch`.
    accepts_loss_kwargs = False

    def __init__(
        self,
        qwen: Qwen2_5_VLForConditionalGeneration,
        vggt: LoadedModel,
        spec: FeatureSpec,
        fusion: Fusion = Fusion(),
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
        self.fusion = fusion
        self.patch_start_idx = vggt.config.patch_start_idx
        self.feature_dim = 2 * arch["embed_dim"]  # C of one layer's tokens (frame + global halves)
        self.merger = VGGTMerger(
            vggt_dim=len(spec.layers) * self.feature_dim,
            llm_dim=qwen.config.text_config.hidden_size,
            spatial_merge=vision.spatial_merge_size,
            hidden_dim=fusion.merger_hidden_dim,
            norm=fusion.merger_norm,
        ).to(device=qwen.device, dtype=qwen.dtype)

    def save_pretrained(self, output_dir: str | os.PathLike) -> None:
        """Qwen in transformers' format, plus the merger and the fusion settings.

        The VGGT weights are not copied: ``spec.fingerprint`` names them.
        """
        out = Path(output_dir)
        self.qwen.save_pretrained(out)
        save_file({k: v.contiguous() for k, v in self.merger.state_dict().items()}, out / MERGER_FILE)
        fusion = {"spec": self.spec.to_dict(), **asdict(self.fusion), "merger_hidden_dim": self.merger.hidden_dim}
        (out / FUSION_FILE).write_text(json.dumps(fusion, indent=2))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, vggt: LoadedModel, **qwen_kwargs) -> Qwen25VLWithVGGT:
        """Load what :meth:`save_pretrained` wrote; ``qwen_kwargs`` go to transformers' ``from_pretrained``."""
        path = Path(path)
        fusion = json.loads((path / FUSION_FILE).read_text())
        qwen = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, **qwen_kwargs)
        spec = FeatureSpec.from_dict(fusion.pop("spec"))
        model = cls(qwen, vggt, spec, Fusion(**fusion))  # files of older releases lack the newer fields
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
        vggt_grid: Sequence[tuple[int, int] | None] | None = None,
        mm_token_type_ids: Tensor | None = None,
        **kwargs,
    ):
        """HF-style forward; returns Qwen's output (``.loss`` when ``labels`` are given).

        ``vggt_features[b]``: sample b's cached entry, ``[P, C]`` or ``[L, P, C]`` in the
        spec's storage dtype, or None. ``images_vggt[b]``: its frames ``[S, 3, H, W]`` in
        ``[0, 1]``, the current frame last, used when it has no cached entry.
        ``vggt_grid[b]``: the entry's (h, w) patch grid when it is larger than Qwen's (an odd
        VGGT grid); None means Qwen's own.
        """
        if mm_token_type_ids is None:
            # Without it transformers falls back to 1-D positions for the visual tokens.
            mm_token_type_ids = self._token_types(input_ids)
        encoder_outputs = None
        if pixel_values is not None:
            encoder_outputs = self.qwen.model.get_image_features(pixel_values, image_grid_thw, return_dict=True)
            encoder_outputs.pooler_output = self._add_vggt(
                list(encoder_outputs.pooler_output), input_ids, image_grid_thw, vggt_features, images_vggt, vggt_grid
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
        vggt_grid: Sequence[tuple[int, int] | None] | None,
    ) -> tuple[Tensor, ...]:
        """Add each sample's merged VGGT tokens to its fused images; ``embeds[i]``: ``[t*h*w/4, D]``."""
        config = self.qwen.config
        merge = config.vision_config.spatial_merge_size
        images = sample_images(input_ids, image_grid_thw, merge, config.image_token_id)
        batch = len(images)
        vggt_features = _per_sample("vggt_features", vggt_features, batch)
        images_vggt = _per_sample("images_vggt", images_vggt, batch)
        vggt_grid = _per_sample("vggt_grid", vggt_grid, batch)
        qwen_grids = {b: tuple(image_grid_thw[idx[-1], 1:].tolist()) for b, idx in enumerate(images) if idx}
        entries = {b: f for b, f in enumerate(vggt_features) if f is not None}
        grids: dict[int, tuple[int, int]] = {}  # each entry's VGGT patch grid
        online = {}
        for b, indices in enumerate(images):
            if not indices:
                if b in entries or images_vggt[b] is not None:
                    raise ValueError(f"sample {b} has VGGT inputs but no image")
                continue
            if b not in entries:
                if images_vggt[b] is None:
                    raise ValueError(f"sample {b} has neither vggt_features nor images_vggt")
                online[b] = self._check_frames(b, images_vggt[b])
            grids[b] = self._vggt_grid(b, vggt_grid[b], images_vggt[b] if b in online else None, qwen_grids[b])
        entries.update(self._compute_entries(online))
        for b, entry in sorted(entries.items()):  # a fixed order keeps cached and online paths bit-equal
            tokens = self._entry_to_patches(b, entry, grids[b], qwen_grids[b])  # [h*w, L*C] on Qwen's grid
            merged = self.merger(tokens[None].to(self.merger.dtype), qwen_grids[b])[0]  # [h*w/4, D]
            fused = images[b] if self.fusion.add_to == "all_frames" else images[b][-1:]
            for i in fused:
                if embeds[i].shape[0] != merged.shape[0]:
                    raise ValueError(
                        f"sample {b}: image {i} has {embeds[i].shape[0]} tokens, the current frame "
                        f"{merged.shape[0]}; add_to='all_frames' needs frames of one size"
                    )
                embeds[i] = embeds[i] + self.fusion.vggt_weight * merged.to(embeds[i].dtype)
        return tuple(embeds)

    def _check_frames(self, b: int, frames: Tensor) -> Tensor:
        if frames.ndim != 4 or frames.shape[1] != 3:
            raise ValueError(f"sample {b}: images_vggt must be [S, 3, H, W], got {list(frames.shape)}")
        # Frame attention makes the context irrelevant: only the current frame is computed.
        return self.spec.frames_of(frames)

    def _vggt_grid(
        self, b: int, given: tuple[int, int] | None, frames: Tensor | None, qwen: tuple[int, int]
    ) -> tuple[int, int]:
        """The entry's patch grid; Qwen's grid must be its even part (both saw the same pixels)."""
        patch = self.vggt.patch_size
        grid = tuple(given) if given is not None else qwen
        if frames is not None:
            grid = (frames.shape[-2] // patch, frames.shape[-1] // patch)
            if given is not None and tuple(given) != grid:
                raise ValueError(f"sample {b}: vggt_grid {list(given)} but images_vggt frames give {list(grid)}")
        merge = self.merger.spatial_merge
        if (grid[0] - grid[0] % merge, grid[1] - grid[1] % merge) != qwen:
            raise ValueError(
                f"sample {b}: the VGGT grid {grid[0]}x{grid[1]} does not hold Qwen's {qwen[0]}x{qwen[1]} "
                f"({grid[0] * patch}x{grid[1] * patch} px vs {qwen[0] * patch}x{qwen[1] * patch}); both must see "
                "the same image, Qwen's cut to whole 2x2 blocks (training.data.qwen_crop)"
            )
        return grid

    def _compute_entries(self, clips: dict[int, Tensor]) -> dict[int, Tensor]:
        """Each clip's cache entry, computed by the frozen aggregator; clips of one shape share a forward."""
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for b, frames in clips.items():
            groups[tuple(frames.shape)].append(b)
        device = self.vggt.camera_token.device
        entries = {}
        for samples in groups.values():
            images = torch.stack([clips[b] for b in samples]).to(device)  # [B, S, 3, H, W]
            last = entry_features(self.vggt, images, self.spec)[:, -1]  # [B, P, C] | [B, L, P, C]
            last = as_stored(last, self.spec.storage)  # as a cache hit would give it (fp8 is lossy)
            entries.update(zip(samples, last, strict=True))
        return entries

    def _entry_to_patches(self, b: int, entry: Tensor, grid: tuple[int, int], qwen: tuple[int, int]) -> Tensor:
        """A cache entry ``[P, C]`` / ``[L, P, C]`` -> its patch tokens on Qwen's grid ``[hq*wq, L*C]``.

        Layers side by side; the VGGT grid is cut at the bottom/right to Qwen's, as JanusVLN does.
        """
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
            raise ValueError(f"sample {b}: VGGT features are {entry.dtype}, the spec stores {self.spec.torch_dtype}")
        entry = entry.to(self.merger.norm.weight.device)
        patches = entry[start:] if layers == 1 else entry[:, start:].permute(1, 0, 2)  # [h*w, (L,) C]
        patches = patches.reshape(h, w, layers * self.feature_dim)[: qwen[0], : qwen[1]]
        return patches.reshape(qwen[0] * qwen[1], layers * self.feature_dim)

    def _token_types(self, input_ids: Tensor) -> Tensor:
        config = self.qwen.config
        return (input_ids == config.image_token_id).int() + 2 * (input_ids == config.video_token_id).int()


def sample_images(input_ids: Tensor, image_grid_thw: Tensor, merge: int, image_token_id: int) -> list[list[int]]:
    """Per sample, the indices (into ``image_grid_thw``) of its images, the current one last.

    Images are assigned to rows in order, by counting each row's image tokens.
    """
    tokens_per_image = (image_grid_thw.prod(-1) // merge**2).tolist()
    counts = (input_ids == image_token_id).sum(-1).tolist()
    images: list[list[int]] = []
    i = 0
    for b, remaining in enumerate(counts):
        mine = []
        while remaining > 0 and i < len(tokens_per_image):
            remaining -= tokens_per_image[i]
            mine.append(i)
            i += 1
        if remaining != 0:
            raise ValueError(f"sample {b}: its image tokens do not line up with image_grid_thw")
        images.append(mine)
    if i != len(tokens_per_image):
        raise ValueError(f"image_grid_thw lists {len(tokens_per_image)} images, the tokens account for {i}")
    return images


def _per_sample(name: str, values: Sequence[Tensor | None] | None, batch: int) -> list[Tensor | None]:
    if values is None:
        return [None] * batch
    if len(values) != batch:
        raise ValueError(f"{name} has {len(values)} entries for a batch of {batch}")
    return list(values)


def _any(values: Sequence[Tensor | None] | None) -> bool:
    return values is not None and any(v is not None for v in values)
