"""JSONL samples -> Qwen2.5-VL inputs plus VGGT inputs (cached features or frames to compute them from).

**Sample shape** (one JSON object per line, in ``*.jsonl`` files under the data root)::

    {"history_images": ["scene1/img_0001.jpg", ...], "current_image": "scene1/img_0004.jpg",
     "instruction": "Walk to the door.", "answer": "forward"}

Images: ``history_images`` + ``current_image``, or ``images`` (a list, the last is the
current view), or ``image`` (one path). Relative paths resolve exactly as
``vggt-cache precompute`` resolves them (``service.sources``: the sample's or the
run's ``data_path``, else next to the JSONL file, then under the data root), so
training asks for the very clips the service computed.

Text: ``instruction`` + ``answer`` (one exchange), or ``conversations``: a list of
``{"from": "human"|"user"|"gpt"|"assistant", "value": str}`` (or ``role``/``content``)
turns; every assistant turn is learned. The images go where the first ``<image>``
placeholder stands in a user turn (other placeholders are dropped), else at the start
of the first user turn. Prompts follow Qwen2.5-VL's chat format.

Each image is preprocessed once (VGGT's reference preprocessing, the spec's mode,
size and alignment) and given to both models: Qwen's image processor takes it
as it is (no resize, no rescale), VGGT sees the same pixels.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import Dataset
from transformers import Qwen2_5_VLConfig

from client.cache import FeatureCache
from client.spec import FeatureSpec
from service.preprocess import preprocess
from service.sources import SAMPLE_SUFFIX, PathResolver, sample_images, walk_files

log = logging.getLogger("vggt_cache")

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


@dataclass(frozen=True)
class Sample:
    clip: tuple[str, ...]  # resolved image paths in order, the current view last; empty for text only
    turns: tuple[tuple[str, str], ...]  # (role, text), role "user" | "assistant"
    where: str  # "file:line", for messages


class SampleError(ValueError):
    """A sample that cannot be used; the message names its file and line."""


def chat_turns(sample: dict) -> tuple[tuple[str, str], ...]:
    """A sample's exchange as ``(role, text)`` turns; raises ValueError for a sample without one."""
    if "conversations" in sample:
        raw = sample["conversations"]
        if not isinstance(raw, list) or not raw:
            raise ValueError("'conversations' must be a non-empty list of turns")
        turns = []
        for turn in raw:
            if not isinstance(turn, dict):
                raise ValueError("each turn must be a JSON object")
            role, text = turn.get("from", turn.get("role")), turn.get("value", turn.get("content"))
            if role not in _ROLES or not isinstance(text, str):
                raise ValueError(f"a turn needs 'from' in {sorted(_ROLES)} and a string 'value', got {turn!r}")
            turns.append((_ROLES[role], text))
    elif isinstance(sample.get("instruction"), str) and isinstance(sample.get("answer"), str):
        turns = [("user", sample["instruction"]), ("assistant", sample["answer"])]
    else:
        raise ValueError("a sample needs 'instruction' and 'answer' strings, or 'conversations'")
    if not any(role == "assistant" for role, _ in turns):
        raise ValueError("the conversation has no assistant turn to learn")
    return tuple(turns)


def sample_files(data_root: str, files: Sequence[str] | None = None) -> list[str]:
    """``files`` (relative to ``data_root`` unless absolute), or every ``*.jsonl`` under it in scan order."""
    if files:
        return [os.path.normpath(os.path.join(data_root, f)) for f in files]
    found = [os.path.join(folder, name) for folder, names in walk_files(data_root) for name in names
             if name.endswith(SAMPLE_SUFFIX)]
    if not found:
        raise ValueError(f"no *{SAMPLE_SUFFIX} sample files under {data_root}")
    return found


def load_samples(data_root: str, files: Sequence[str] | None = None, data_path: str | None = None) -> list[Sample]:
    """Every usable sample of the JSONL files; a malformed line raises, a sample with a missing image is skipped."""
    root = os.path.abspath(data_root)
    if not os.path.isdir(root):
        raise ValueError(f"data root is not a directory: {root}")
    resolver = PathResolver(root, data_path)
    samples: list[Sample] = []
    skipped: list[str] = []
    for path in sample_files(root, files):
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    raw = json.loads(line)
                    raw_clip, sample_data_path = sample_images(raw)
                    turns = chat_turns(raw)
                except ValueError as exc:
                    raise SampleError(f"{where}: malformed sample: {exc}") from None
                clip = [resolver.resolve(p, os.path.dirname(path), sample_data_path) for p in raw_clip]
                if None in clip:
                    skipped.append(f"{where}: image not found: {raw_clip[clip.index(None)]}")
                    continue
                samples.append(Sample(tuple(clip), turns, where))
    if skipped:
        log.warning("Skipped %d sample(s) with missing images, e.g. %s", len(skipped), skipped[0])
    if not samples:
        raise ValueError(f"no usable samples under {root}")
    return samples


class VLNDataset(Dataset):
    """Items for :class:`~training.model.Qwen25VLWithVGGT`, one per sample.

    ``cache``: features of the current frame come from it when it has them (then the
    clip's other frames are not even decoded unless Qwen sees them); otherwise the
    item carries ``images_vggt``, the frames the model computes them from (only the
    current frame in ``frame`` attention, the whole clip otherwise).
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        tokenizer,
        image_processor,
        config: Qwen2_5_VLConfig,
        spec: FeatureSpec,
        cache: FeatureCache | None = None,
        qwen_images: str = "all",
        system_prompt: str = "You are a helpful assistant.",
    ) -> None:
        self.samples = list(samples)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.spec = spec
        self.cache = cache
        self.qwen_images = qwen_images
        self.system_prompt = system_prompt
        self.image_token_id = config.image_token_id
        self.vision_start_id = config.vision_start_token_id
        self.vision_end_id = config.vision_end_token_id
        self.merge = config.vision_config.spatial_merge_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        """Keys: ``input_ids``/``labels`` ``[T]``; ``pixel_values`` ``[N, D]`` and ``image_grid_thw``
        ``[n, 3]`` (None for text only); ``vggt_features`` (the cached entry or None);
        ``images_vggt`` ``[S, 3, H, W]`` or None; ``vggt_source``: "cache" | "service" | "online" | None.
        """
        sample = self.samples[index]
        if not sample.clip:
            ids, labels = self._tokens(sample.turns, [])
            return {"input_ids": ids, "labels": labels, "pixel_values": None, "image_grid_thw": None,
                    "vggt_features": None, "images_vggt": None, "vggt_source": None}
        features, source = self._cached_features(sample.clip)
        frames: dict[str, Tensor] = {}
        qwen_clip = sample.clip if self.qwen_images == "all" else sample.clip[-1:]
        vision = self.image_processor(images=[self._frame(p, frames) for p in qwen_clip], do_resize=False,
                                      do_rescale=False, return_tensors="pt")
        grid = vision["image_grid_thw"]  # [n, 3]
        ids, labels = self._tokens(sample.turns, (grid.prod(-1) // self.merge**2).tolist())
        images_vggt = None
        if features is None:
            vggt_clip = sample.clip[-1:] if self.spec.attention == "frame" else sample.clip
            clip = [self._frame(p, frames) for p in vggt_clip]
            if len({tuple(f.shape) for f in clip}) > 1:
                raise ValueError(f"{sample.where}: the clip's frames preprocess to different sizes "
                                 f"{sorted({tuple(f.shape[1:]) for f in clip})}; VGGT needs one size per clip "
                                 "(use --image_preprocess pad)")
            images_vggt = torch.stack(clip)  # [S, 3, H, W]
        return {"input_ids": ids, "labels": labels, "pixel_values": vision["pixel_values"], "image_grid_thw": grid,
                "vggt_features": features, "images_vggt": images_vggt, "vggt_source": source}

    def _cached_features(self, clip: tuple[str, ...]) -> tuple[Tensor | None, str]:
        if self.cache is None:
            return None, "online"
        before = self.cache.stats
        features = self.cache.get_sample(clip)
        if features is None:
            return None, "online"
        # Counters are per process and a worker handles one item at a time.
        return features, "cache" if self.cache.stats["hits"] > before["hits"] else "service"

    def _frame(self, path: str, decoded: dict[str, Tensor]) -> Tensor:
        if path not in decoded:
            decoded[path] = preprocess(path, self.spec.preprocess, self.spec.size, self.spec.align)  # [3, H, W]
        return decoded[path]

    def _tokens(self, turns: Sequence[tuple[str, str]], image_tokens: list[int]) -> tuple[Tensor, Tensor]:
        """Qwen2.5-VL chat tokens with each image's pad tokens expanded; only assistant replies are labelled."""
        ids: list[int] = []
        labels: list[int] = []

        def add(text_or_ids: str | list[int], learn: bool = False) -> None:
            new = (self.tokenizer.encode(text_or_ids, add_special_tokens=False)
                   if isinstance(text_or_ids, str) else text_or_ids)
            ids.extend(new)
            labels.extend(new if learn else [IGNORE_INDEX] * len(new))

        add(f"<|im_start|>system\n{self.system_prompt}<|im_end|>\n")
        pending = list(image_tokens)
        for role, text in turns:
            if role == "assistant":
                add("<|im_start|>assistant\n")
                add(f"{text}<|im_end|>", learn=True)
                add("\n")
                continue
            add("<|im_start|>user\n")
            if pending:
                before, found, after = text.partition(IMAGE_PLACEHOLDER)
                if found:
                    add(before)
                    text = after
                for n in pending:
                    add([self.vision_start_id, *[self.image_token_id] * n, self.vision_end_id])
                pending = []
            add(text.replace(IMAGE_PLACEHOLDER, "") + "<|im_end|>\n")
        if pending:
            raise ValueError("a sample with images needs a user turn to show them in")
        return torch.tensor(ids), torch.tensor(labels)


@dataclass
class VGGTCollator:
    """Right-pads tokens; concatenates images in sample order; VGGT inputs stay per-sample lists."""

    pad_token_id: int

    def __call__(self, items: Sequence[dict]) -> dict:
        width = max(len(item["input_ids"]) for item in items)
        input_ids = torch.full((len(items), width), self.pad_token_id)
        labels = torch.full((len(items), width), IGNORE_INDEX)
        attention_mask = torch.zeros(len(items), width, dtype=torch.long)
        for b, item in enumerate(items):
            n = len(item["input_ids"])
            input_ids[b, :n] = item["input_ids"]
            labels[b, :n] = item["labels"]
            attention_mask[b, :n] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        with_images = [item for item in items if item["pixel_values"] is not None]
        if with_images:
            batch["pixel_values"] = torch.cat([item["pixel_values"] for item in with_images])
            batch["image_grid_thw"] = torch.cat([item["image_grid_thw"] for item in with_images])
        for key in ("vggt_features", "images_vggt", "vggt_source"):
            batch[key] = [item[key] for item in items]
        return batch
