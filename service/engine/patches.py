"""DINOv2 patch tokens of recently forwarded frames, so the clips that share a frame embed it once.

In a JanusVLN-style job a frame is in up to nine samples' clips (its own, as history of the
later ones, and step 0 in all of its episode's), and a padded history repeats a frame within
one clip. Its patch tokens depend on the frame alone, so every distinct frame of a batch is
embedded once and its tokens kept, most recently used first, within a byte budget. Each device
has its own cache: a copy from another GPU would run on that GPU's stream, behind its whole
queued forward, and tie the devices' work together.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor

from vggt_cache.service.engine.work import FrameKey
from vggt_cache.service.model.aggregator import VGGTAggregator
from vggt_cache.service.model.features import frame_patches


class PatchCache:
    """One device's patch tokens by frame key; thread-safe (the device thread writes, stats read).

    `budget_bytes` 0 keeps nothing between batches; a batch's repeated frames are still shared.
    """

    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes < 0:
            raise ValueError(f"the patch cache budget must be at least 0 bytes, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self.nbytes = 0
        self.embedded = 0  # frames run through DINOv2
        self.reused = 0  # frames of a clip served from a frame embedded before (this batch or earlier)
        self._items: OrderedDict[FrameKey, Tensor] = OrderedDict()
        self._lock = threading.Lock()  # the items and counters; embedding runs outside it

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def patches(self, model: VGGTAggregator, images: Tensor, keys: Sequence[Sequence[FrameKey]]) -> Tensor:
        """Patch tokens [B, S, h*w, C] of images [B, S, 3, H, W], whose frame (b, s) has key keys[b][s]."""
        B, S = images.shape[:2]
        flat = [key for clip in keys for key in clip]
        if len(flat) != B * S or any(len(clip) != S for clip in keys):
            raise ValueError(f"need {S} frame keys for each of {B} clips")
        rows: dict[FrameKey, Tensor] = {}
        first_seen: dict[FrameKey, int] = {}  # keys to embed -> index of their frame in `flat`
        with self._lock:
            for i, key in enumerate(flat):
                if key in rows or key in first_seen:
                    continue
                kept = self._items.get(key)
                if kept is None:
                    first_seen[key] = i
                else:
                    self._items.move_to_end(key)
                    rows[key] = kept
        if first_seen:
            # Stacked views, not indexing by a list: that would copy the index to the GPU and wait for it.
            flat_images = images.flatten(0, 1)  # [B*S, 3, H, W]
            frames = torch.stack([flat_images[i] for i in first_seen.values()])  # [M, 3, H, W]
            embedded = frame_patches(model, frames)  # [M, h*w, C]
            rows.update(zip(first_seen, embedded, strict=True))
            self._keep(list(first_seen), embedded)
        with self._lock:  # counted once the batch's tokens exist (a forward that fails is retried)
            self.embedded += len(first_seen)
            self.reused += len(flat) - len(first_seen)
        return torch.stack([rows[key] for key in flat]).unflatten(0, (B, S))  # [B, S, h*w, C]

    def _keep(self, keys: list[FrameKey], embedded: Tensor) -> None:
        if self.budget_bytes == 0:
            return
        # Copies, so an evicted row frees its memory instead of pinning the batch's tensor.
        rows = [row.clone() for row in embedded]
        with self._lock:
            for key, row in zip(keys, rows, strict=True):
                if key not in self._items:
                    self._items[key] = row
                    self.nbytes += row.nbytes
            while self.nbytes > self.budget_bytes:
                _, row = self._items.popitem(last=False)
                self.nbytes -= row.nbytes

    def clear(self) -> None:
        """Drop every kept row (the device ran out of memory: the forward needs it more)."""
        with self._lock:
            self._items.clear()
            self.nbytes = 0

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "embedded": self.embedded,
                "reused": self.reused,
                "frames": len(self._items),
                "bytes": self.nbytes,
                "budget_bytes": self.budget_bytes,
            }
