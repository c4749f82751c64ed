"""A data root's samples -> the units of work of a bulk precompute job (or of `verify`)."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

from vggt_cache.client.spec import ATTENTION, Attention
from vggt_cache.service.errors import UnusableInput
from vggt_cache.service.frametable import FrameTable
from vggt_cache.service.paths import AllowedRoots
from vggt_cache.service.samples import DEFAULT_MAX_HISTORY, MAX_SAMPLE_BYTES, SampleSet, SampleStream
from vggt_cache.service.units import Unit

T = TypeVar("T")


@dataclass
class ScanResult:
    units: list[Unit]
    problems: list[tuple[str, str]]  # (where, reason): "file:line", "file[i]" or a path
    samples: SampleSet
    # Targets that more than one distinct clip produces: a sibling file holds one
    # context, so such images flip between contexts (the last one computed wins).
    conflicts: int = 0

    @property
    def source_kind(self) -> str:
        return self.samples.source

    @property
    def num_samples(self) -> int:
        return self.samples.num_samples


class UnitPlanner:
    """Turns resolved clips into deduplicated units, in first-seen order."""

    def __init__(self, attention: str) -> None:
        self.attention = attention
        # Decided once, not for every clip: an Enum member's read costs ~0.2 us on Python 3.11.
        self._frame, self._sequence = attention == Attention.FRAME, attention == Attention.SEQUENCE
        self.units: list[Unit] = []
        # target -> the first clip that made it. A clip whose targets all name it was seen; so was one in
        # `_shared` (it met a target of another clip): no set of every clip (612k tuples) is kept.
        self._owner: dict[str, tuple[str, ...]] = {}
        self._shared: set[tuple[str, ...]] = set()
        self._conflicted: set[str] = set()

    def add_clip(self, frames: tuple[str, ...] | list[str]) -> None:
        attention, owner = self.attention, self._owner
        clips = [(f,) for f in frames] if self._frame else (tuple(frames),)
        for clip in clips:
            if not clip:  # a text-only sample needs no features
                continue
            # In sequence attention every frame is a target, else the last frame is the one target.
            seen = all(owner.get(f) == clip for f in clip) if self._sequence else owner.get(clip[-1]) == clip
            if seen or clip in self._shared:
                continue
            unit = Unit.for_clip(attention, clip)
            self.units.append(unit)
            for target in unit.targets:
                if owner.setdefault(target, clip) != clip:
                    self._conflicted.add(target)
                    self._shared.add(clip)

    @property
    def conflicts(self) -> int:
        return len(self._conflicted)

    def take(self) -> list[Unit]:
        """The units added since the last `take` (a streamed plan does not hold them all)."""
        units, self.units = self.units, []
        return units


def scan_data_root(
    data_root: str,
    attention: str,
    data_path: str | None = None,
    max_history_images: int = DEFAULT_MAX_HISTORY,
    files: Sequence[str] | None = None,
    allowed: AllowedRoots | None = None,
    max_sample_bytes: int = MAX_SAMPLE_BYTES,
    table: FrameTable | None = None,
) -> ScanResult:
    """The units of work under `data_root` for `attention` mode (samples: `service.samples`; `files`
    names the sample files to read instead of every one found; `allowed`: what the walk and the
    sample files stay inside; `table`: the plan's frame table, see `service.frametable`).

    `frame` -> one unit per unique image of any sample; `sequence` -> one per unique clip, all
    its frames targets; `causal` -> one per unique clip, its last frame the target. Loose image
    files (no sample files, no episode folders) are work for `frame` attention only.
    """
    stream = SampleStream(
        data_root, max_history_images, data_path, files, allowed=allowed, max_sample_bytes=max_sample_bytes, table=table
    )
    planner = UnitPlanner(attention)
    units = [unit for piece, _ in scan_pieces(stream, planner, None) for unit in piece]
    samples = stream.sample_set()
    return ScanResult(units, samples.problems, samples, planner.conflicts)


def scan_pieces(
    stream: SampleStream,
    planner: UnitPlanner,
    piece_samples: int | None,
    stop: threading.Event | None = None,
) -> Iterator[tuple[list[Unit], bool]]:
    """The new units of each `piece_samples` samples of `stream` (None: all in one piece), then of the rest,
    each with whether it is the last: a streamed job plans and computes a piece while the next is read.
    `stop` set: no more pieces (checked at every sample)."""
    attention = planner.attention
    if attention not in ATTENTION:
        raise ValueError(f"attention must be one of {'|'.join(ATTENTION)}, got {attention!r}")
    needs_clips = attention != Attention.FRAME  # once: this loop runs per sample
    for sample in stream:
        if stop is not None and stop.is_set():
            return
        if sample.frames:
            if needs_clips and stream.loose_images:
                break
            planner.add_clip(sample.frames)
        if piece_samples and stream.count % piece_samples == 0:
            yield planner.take(), False
    if needs_clips and stream.loose_images:
        raise UnusableInput(
            f"{attention} attention needs clips: no samples (*.jsonl, *.json arrays or step_<n>_<action> "
            f"episode folders) found under {stream.root} (an image folder alone is only work for frame attention)"
        )
    yield planner.take(), True


def shard(units: list[T], rank: int, world_size: int) -> list[T]:
    """This rank's share: one contiguous run of the units, in order (sizes balanced to within one).

    Contiguous, not every `world_size`-th unit: neighbouring samples of an episode share frames,
    and a rank (or a device's lane, `service.jobs.runner.lane_chunks`) embeds a shared frame once only
    if it gets the samples that share it.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
    n = len(units)
    return units[rank * n // world_size : (rank + 1) * n // world_size]
