"""A data root's samples -> Qwen2.5-VL inputs plus VGGT inputs (cached features or frames to compute them from).

**Samples** come from the parser every bulk job uses (:mod:`service.samples`), so training asks
for exactly the clips the service computed: ``*.jsonl`` lines and ``*.json`` arrays of sample
objects (JanusVLN), or episode folders of ``step_<n>_<ACTION>.png`` frames with the
``max_history_images`` rule (NewJanusVLN). A sample object looks like::

    {"history_images": ["scene1/img_0001.jpg", ...], "current_image": "scene1/img_0004.jpg",
     "instruction": "Walk to the door.", "answer": "forward"}

Images: ``history_images`` + ``current_image``, or ``images`` (a list, the last is the
current view), or ``image`` (one path); relative paths resolve as ``vggt-cache precompute``
resolves them.

Text: ``instruction`` + ``answer`` (one exchange), or ``conversations``: a list of
``{"from": "human"|"user"|"gpt"|"assistant", "value": str}`` (or ``role``/``content``)
turns; every assistant turn is learned. An episode step's exchange is built from the
episode's ``milestones_result.json`` (``instruction_text``) and the step's own JSON
(``landmark_description``, ``spatial_description``) and action. The images go where the
first ``<image>`` placeholder stands in a user turn (other placeholders are dropped), else
at the start of the first user turn. Prompts follow Qwen2.5-VL's chat format.

Each image is preprocessed once (VGGT's reference preprocessing, the spec's mode,
size and alignment): VGGT sees it whole, Qwen's image processor gets it cropped at the
bottom/right to whole 2x2 token blocks (no resize, no rescale), as JanusVLN does.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import Dataset
from transformers import Qwen2_5_VLConfig

from vggt_cache.client.cache import FeatureCache
from vggt_cache.client.spec import FeatureSpec
from vggt_cache.service.preprocess import preprocess
from vggt_cache.service.samples import DEFAULT_MAX_HISTORY, find_samples

log = logging.getLogger("vggt_cache")

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


@dataclass(frozen=True)
class TrainingSample:
    clip: tuple[str, ...]  # resolved image paths in order, the current view last; empty for text only
    turns: tuple[tuple[str, str], ...]  # (role, text), role "user" | "assistant"
    where: str  # "file:line", "file[i]" or an episode step's image, for messages


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


@functools.lru_cache(maxsize=1024)
def _json_object(path: str) -> dict:
    """A small JSON object file (an episode's description files), {} when absent or not an object."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    return value if isinstance(value, dict) else {}


def episode_turns(step: dict) -> tuple[tuple[str, str], ...]:
    """The exchange of one episode step (``service.samples`` step record): task in, descriptions and action out."""
    instruction = _json_object(os.path.join(step["episode"], "milestones_result.json")).get("instruction_text", "")
    described = _json_object(os.path.splitext(step["image"])[0] + ".json")
    prompt = (
        f"{IMAGE_PLACEHOLDER}Your task is to {instruction or 'follow the route'}.\n"
        "Choose one action: MOVE_FORWARD, TURN_LEFT, TURN_RIGHT or STOP."
    )
    lines = [
        f"{label}: {described[key]}"
        for label, key in (("2D_DESCRIPTION", "landmark_description"), ("3D_DESCRIPTION", "spatial_description"))
        if isinstance(described.get(key), str) and described[key]
    ]
    return (("user", prompt), ("assistant", "\n".join([*lines, f"ACTION: {step['action']}"])))


def load_samples(
    data_root: str,
    files: Sequence[str] | None = None,
    data_path: str | None = None,
    max_history_images: int = DEFAULT_MAX_HISTORY,
) -> list[TrainingSample]:
    """Every usable sample under ``data_root``; a malformed one raises, one with a missing image is skipped."""
    found = find_samples(data_root, max_history_images, data_path, files, keep_records=True)
    unusable = found.malformed + found.unlisted  # a folder the walk could not list may hold samples
    if unusable:
        where, why = unusable[0]
        more = f" (and {len(unusable) - 1} more)" if len(unusable) > 1 else ""
        raise SampleError(f"{where}: {why}{more}")
    if found.missing:
        log.warning("Skipped %d sample(s) with missing images, e.g. %s: %s", len(found.missing), *found.missing[0])
    if found.source == "images":
        raise ValueError(
            f"no samples under {data_root}: no *.jsonl, *.json sample arrays or step_<n>_<ACTION> "
            "episode folders (loose images carry no text to train on)"
        )
    samples = []
    for sample in found.samples:
        try:
            turns = episode_turns(sample.record) if found.source == "episodes" else chat_turns(sample.record)
        except ValueError as exc:
            raise SampleError(f"{sample.where}: malformed sample: {exc}") from None
        samples.append(TrainingSample(sample.frames, turns, sample.where))
    if not samples:
        raise ValueError(f"no usable samples under {os.path.abspath(data_root)}")
    return samples


def qwen_crop(image: Tensor, merge: int, patch: int) -> Tensor:
    """``image`` ``[3, H, W]`` cut at the bottom/right to whole ``merge x merge`` blocks of ``patch`` px."""
    block = merge * patch
    return image[:, : image.shape[1] // block * block, : image.shape[2] // block * block]


class VLNDataset(Dataset):
    """Items for :class:`~training.model.Qwen25VLWithVGGT`, one per sample.

    ``cache``: features of the current frame come from it when it has them (then the
    clip's other frames are not even decoded unless Qwen sees them); otherwise the
    item carries ``images_vggt``, the frames the model computes them from (only the
    current frame in ``frame`` attention, the whole clip otherwise).
    """

    def __init__(
        self,
        samples: Sequence[TrainingSample],
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
        self.qwen_patch = config.vision_config.patch_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        """Keys: ``input_ids``/``labels`` ``[T]``; ``pixel_values`` ``[N, D]`` and ``image_grid_thw``
        ``[n, 3]`` (None for text only); ``vggt_features`` (the cached entry or None);
        ``images_vggt`` ``[S, 3, H, W]`` or None; ``vggt_grid`` (h, w) of the current frame's VGGT
        patches (Qwen's grid is its even part); ``vggt_source``: "cache" | "service" | "online" | None.
        """
        sample = self.samples[index]
        if not sample.clip:
            ids, labels = self._tokens(sample.turns, [])
            return {
                "input_ids": ids,
                "labels": labels,
                "pixel_values": None,
                "image_grid_thw": None,
                "vggt_features": None,
                "images_vggt": None,
                "vggt_grid": None,
                "vggt_source": None,
            }
        features, source = self._cached_features(sample.clip)
        frames: dict[str, Tensor] = {}
        qwen_clip = sample.clip if self.qwen_images == "all" else sample.clip[-1:]
        qwen_frames = [qwen_crop(self._frame(p, frames), self.merge, self.qwen_patch) for p in qwen_clip]
        vision = self.image_processor(images=qwen_frames, do_resize=False, do_rescale=False, return_tensors="pt")
        patch = self.spec.architecture.get("patch_size", 14)
        current = self._frame(sample.clip[-1], frames)
        vggt_grid = (current.shape[1] // patch, current.shape[2] // patch)
        grid = vision["image_grid_thw"]  # [n, 3]
        ids, labels = self._tokens(sample.turns, (grid.prod(-1) // self.merge**2).tolist())
        images_vggt = None
        if features is None:
            clip = [self._frame(p, frames) for p in self.spec.frames_of(sample.clip)]
            if len({tuple(f.shape) for f in clip}) > 1:
                raise ValueError(
                    f"{sample.where}: the clip's frames preprocess to different sizes "
                    f"{sorted({tuple(f.shape[1:]) for f in clip})}; VGGT needs one size per clip "
                    "(use --image_preprocess pad)"
                )
            images_vggt = torch.stack(clip)  # [S, 3, H, W]
        return {
            "input_ids": ids,
            "labels": labels,
            "pixel_values": vision["pixel_values"],
            "image_grid_thw": grid,
            "vggt_features": features,
            "images_vggt": images_vggt,
            "vggt_grid": vggt_grid,
            "vggt_source": source,
        }

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
            new = (
                self.tokenizer.encode(text_or_ids, add_special_tokens=False)
                if isinstance(text_or_ids, str)
                else text_or_ids
            )
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
        for key in ("vggt_features", "images_vggt", "vggt_grid", "vggt_source"):
            batch[key] = [item[key] for item in items]
        return batch
