"""The unit of work: one forward pass over an ordered clip, and the images it produces."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

from vggt_cache.client.spec import ATTENTION, Attention

# Read once: an Enum member's read costs ~0.2 us on Python 3.11 (EnumType.__getattr__), and a plan makes a unit for
# every sample.
_FRAME, _SEQUENCE, _CAUSAL = Attention.FRAME, Attention.SEQUENCE, Attention.CAUSAL


@dataclass(frozen=True, slots=True)  # a plan holds one per sample: no __dict__ each
class Unit:
    """Frames (resolved paths, clip order) fed to the model together; targets get cache entries.

    frame: one frame, its own target. sequence: every distinct frame is a target.
    causal: the last frame is the target, the earlier ones are its context.
    A clip may repeat a frame (history padded with its first frame): the repeats stay in `frames`.
    """

    frames: tuple[str, ...]
    targets: tuple[str, ...]

    def __post_init__(self) -> None:
        # Accept lists (e.g. decoded from JSON) but keep the frozen value hashable.
        if type(self.frames) is not tuple:
            object.__setattr__(self, "frames", tuple(self.frames))
        if type(self.targets) is not tuple:
            object.__setattr__(self, "targets", tuple(self.targets))
        frames, targets = self.frames, self.targets
        if not frames or not targets:
            raise ValueError("a Unit needs at least one frame and one target")
        # A causal clip's one target, in a plan's every unit: looked for in the clip, not set against it.
        if not (targets[0] in frames if len(targets) == 1 else set(targets).issubset(frames)):
            raise ValueError("every target of a Unit must be one of its frames")

    @property
    def key(self) -> bytes:
        """The unit in 16 bytes: what a plan resumed after a restart holds of each unit recorded before it."""
        return unit_key(self.frames, self.targets)

    @classmethod
    def frame(cls, image: str) -> Unit:
        return cls((image,), (image,))

    @classmethod
    def sequence(cls, frames: Sequence[str]) -> Unit:
        return cls(tuple(frames), tuple(dict.fromkeys(frames)))

    @classmethod
    def causal(cls, frames: Sequence[str]) -> Unit:
        return cls(tuple(frames), (frames[-1],))

    @classmethod
    def for_clip(cls, attention: str, frames: Sequence[str]) -> Unit:
        """The unit an ordered clip makes in `attention` mode (frame mode takes one frame)."""
        if attention == _FRAME:
            if len(frames) != 1:
                raise ValueError(f"frame attention takes one frame per unit, got {len(frames)}")
            return cls.frame(frames[0])
        if attention == _SEQUENCE:
            return cls.sequence(frames)
        if attention == _CAUSAL:
            return cls.causal(frames)
        raise ValueError(f"attention must be one of {'|'.join(ATTENTION)}, got {attention!r}")


def unit_key(frames: Sequence[str], targets: Sequence[str]) -> bytes:
    """`Unit(frames, targets).key`, without the Unit. Hashed as JSON (ASCII, every name quoted and escaped),
    so no two units read alike: a sample can name a path with a NUL, or a lone surrogate, in it."""
    text = json.dumps([list(frames), list(targets)])
    return hashlib.blake2b(text.encode("ascii"), digest_size=16).digest()
