"""Key/value cache of the global blocks, for streaming block-causal attention."""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    """Keys and values of the global blocks for the frames already fed, per clip of a batch.

    Feed a clip to ``VGGTAggregator.forward(frames, attention="causal", kv_cache=cache)`` one or
    several frames at a time: each call attends to every earlier frame through the cache and appends
    its own, so the results equal one ``causal`` forward over the whole clip. The first frame after
    construction or ``reset()`` uses camera/register token 0; every later frame uses token 1.

    Every call must use the same batch size and image size. The first call fixes how many global
    blocks are cached (up to its deepest requested layer); later calls always run at least that deep
    and cannot ask for deeper layers. Cost: ``2 * num_frames * tokens_per_frame * embed_dim``
    values per cached block. If a call raises, ``reset()`` before reusing the cache.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget every frame: the next call starts a new clip."""
        self.keys: list[Tensor] = []  # per global block: [B, heads, num_frames * tokens_per_frame, head_dim]
        self.values: list[Tensor] = []  # same shape; keys are stored after qk-norm and RoPE
        self.num_frames = 0
        self.batch_size: int | None = None
        self.tokens_per_frame: int | None = None

    @property
    def num_layers(self) -> int:
        """Number of global blocks cached (0 before the first call)."""
        return len(self.keys)

    def begin(self, batch_size: int, tokens_per_frame: int, num_layers: int) -> int:
        """Check a new call against the cache; return how many global blocks it must run."""
        if self.num_frames == 0:
            self.reset()
            self.batch_size, self.tokens_per_frame = batch_size, tokens_per_frame
            return num_layers
        if (batch_size, tokens_per_frame) != (self.batch_size, self.tokens_per_frame):
            raise ValueError(
                f"KVCache holds {self.batch_size} clip(s) of {self.tokens_per_frame} tokens per frame; "
                f"got {batch_size} of {tokens_per_frame}: reset() it to start new clips"
            )
        if num_layers > self.num_layers:
            raise ValueError(
                f"KVCache holds {self.num_layers} global block(s) from its first call; "
                f"layers up to {self.num_layers - 1} can be requested until reset()"
            )
        expected = self.num_frames * tokens_per_frame
        if any(k.shape[2] != expected for k in self.keys):
            raise ValueError("KVCache is inconsistent (did an earlier call fail?): reset() it")
        return self.num_layers

    def append(self, layer: int, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Add a call's keys/values [B, heads, N_new, head_dim] for `layer`; return all of them."""
        if layer < len(self.keys):
            keys = torch.cat((self.keys[layer], keys), dim=2)
            values = torch.cat((self.values[layer], values), dim=2)
            self.keys[layer], self.values[layer] = keys, values
        else:
            self.keys.append(keys)
            self.values.append(values)
        return keys, values

    def end(self, new_frames: int) -> None:
        """Record that a call has appended `new_frames` frames to every cached block."""
        self.num_frames += new_frames
