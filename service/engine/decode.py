"""The decode stage: skip-existing checks, stat, decode and preprocess, on a few threads of its own.

A decoded unit goes to the scheduler to wait for a device; one whose every entry is already
valid (`skip_existing`), or that cannot be prepared, completes here.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future

import torch

from vggt_cache.client.cachefile import Outcome, context_record, holds_other_context, read_entry, source_record
from vggt_cache.client.spec import Attention, FeatureSpec
from vggt_cache.client.text import error_text
from vggt_cache.client.wire import EntryStatus
from vggt_cache.service.engine.scheduler import Scheduler
from vggt_cache.service.engine.work import (
    KEPT,
    SHUTDOWN_MESSAGE,
    WITHDRAWN_MESSAGE,
    Complete,
    EngineStopped,
    EntryResult,
    Flight,
    FrameKey,
    UnitResult,
    Withdrawn,
    fail_future,
    failed_result,
    when_descriptors_free,
)
from vggt_cache.service.preprocess import as_float, load_image, preprocess_pixels

log = logging.getLogger("vggt_cache")


class FrameCache:
    """Recently preprocessed frames, so overlapping clips (sequence/causal) decode each frame once.

    Keyed by path, size and mtime_ns: a rewritten image is a different key. A frame that one
    decode worker is loading is waited for by the others, not decoded twice (padded histories
    and neighbouring samples ask for the same frames at the same time).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._lock = threading.Lock()
        self._items: OrderedDict[FrameKey, torch.Tensor] = OrderedDict()
        self._loading: dict[FrameKey, Future] = {}
        self.hits = 0  # frames served from here instead of decoded again
        self.misses = 0

    def get(self, key: FrameKey, load: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The frame of `key`, from here, from a worker loading it now, or from `load()`."""
        with self._lock:
            tensor = self._items.get(key)
            if tensor is not None:
                self.hits += 1
                self._items.move_to_end(key)
                return tensor
            pending = self._loading.get(key)
            owner = pending is None
            if pending is None:
                pending = self._loading[key] = Future()
                self.misses += 1
            else:
                self.hits += 1
        if not owner:
            return pending.result()  # the loader's error, if it failed, fails this clip too
        try:
            tensor = load()
        except BaseException as exc:
            with self._lock:
                del self._loading[key]
            pending.set_exception(exc)
            raise
        with self._lock:
            del self._loading[key]
            if self.capacity > 0:
                self._items[key] = tensor
                while len(self._items) > self.capacity:
                    self._items.popitem(last=False)
        pending.set_result(tensor)
        return tensor


class DecodeStage:
    """`workers` threads taking flights from the scheduler's decode queue, most urgent first."""

    def __init__(
        self,
        spec: FeatureSpec,
        scheduler: Scheduler,
        complete: Complete,
        workers: int,
        frame_cache_frames: int,
        roots: Sequence[str] | None,
        max_image_bytes: int,
    ) -> None:
        """`roots` (real paths): every image and cache file read must lie inside one when opened."""
        self.spec = spec
        self.roots = roots
        self.max_image_bytes = max_image_bytes
        self._scheduler = scheduler
        self._complete = complete
        self._workers = workers
        # Only clips (sequence/causal) share frames between units.
        self.frames = FrameCache(frame_cache_frames if spec.attention != Attention.FRAME else 0)

    def start(self) -> list[threading.Thread]:
        threads = [
            threading.Thread(target=self._loop, name=f"vggt-decode-{i}", daemon=True) for i in range(self._workers)
        ]
        for t in threads:
            t.start()
        return threads

    def _loop(self) -> None:
        while (flight := self._scheduler.next_to_decode()) is not None:
            if not flight.future.set_running_or_notify_cancel():
                self._scheduler.decoded(flight, runnable=False)  # cancelled while queued
                continue
            result = None
            try:
                result = self._cached_result(flight) if flight.skip_existing else None
                if result is None:
                    when_descriptors_free(lambda: self._decode(flight), f"decoding {flight.unit.targets[-1]}")
            except Exception as exc:  # ImageError, a missing file, ...: this unit only
                result = failed_result(flight.unit, error_text(exc))
                log.warning("Cannot prepare %s: %s", flight.unit.targets[-1], result.entries[0].error)
            if result is not None:
                self._scheduler.decoded(flight, runnable=False)
                self._complete(flight, result)
            elif not self._scheduler.decoded(flight, runnable=True):
                stopped = Withdrawn(WITHDRAWN_MESSAGE) if flight.withdrawn else EngineStopped(SHUTDOWN_MESSAGE)
                fail_future(flight.future, stopped)

    def _cached_result(self, flight: Flight) -> UnitResult | None:
        """The unit's result read from disk when every target's entry validates, else None."""
        entries = []
        frames = self.spec.context_of(flight.unit.frames)
        for target in flight.unit.targets:
            # Read whole (no mmap): another NFS client may replace the file while we hold it. Work that
            # returns no features (bulk jobs) checks the metadata alone: a few KB instead of megabytes;
            # features served are checked against their CRC-32 first.
            read = read_entry(
                target,
                self.spec,
                context_frames=frames,
                mmap=False,
                tensor=flight.return_features,
                roots=self.roots,
                check_crc=flight.return_features,
            )
            if (
                read.outcome is Outcome.STALE
                and not flight.return_features
                and not flight.overwrite
                and holds_other_context(target, self.spec, frames, self.roots)
            ):
                # Another clip's valid entry, kept: computing ours would only be thrown away.
                assert read.meta is not None  # a STALE entry was read
                entries.append(EntryResult(target, EntryStatus.CACHED, None, tuple(read.meta["grid"]), write=KEPT))
                continue
            if read.outcome is not Outcome.HIT:
                flight.found = read.outcome
                return None
            assert read.meta is not None  # set on HIT
            entries.append(EntryResult(target, EntryStatus.CACHED, read.features, tuple(read.meta["grid"])))
        return UnitResult(flight.unit, entries)

    def _decode(self, flight: Flight) -> None:
        unit = flight.unit
        # Each image stat-ed once, before decoding: one rewritten meanwhile leaves an entry already stale.
        sources = {path: source_record(path) for path in dict.fromkeys([*unit.frames, *unit.targets])}
        flight.sources = [sources[t] for t in unit.targets]
        frames = self.spec.context_of(unit.frames)
        flight.contexts = [context_record(t, frames, sources) for t in unit.targets]
        flight.frame_keys = [(path, sources[path]["size"], sources[path]["mtime_ns"]) for path in unit.frames]
        images = [self._load_frame(key) for key in flight.frame_keys]
        shapes = {tuple(im.shape) for im in images}
        if len(shapes) > 1:
            raise ValueError(f"the frames of a clip must share one size after preprocessing, got {sorted(shapes)}")
        if len({im.dtype for im in images}) > 1:  # some frames resized to the alignment: float already
            images = [as_float(im) for im in images]
        flight.images = torch.stack(images)  # [S, 3, H, W], uint8 (scaled on the device) or float32

    def _load_frame(self, key: FrameKey) -> torch.Tensor:
        spec = self.spec
        return self.frames.get(  # [3, H, W]
            key,
            lambda: preprocess_pixels(
                load_image(key[0], max_bytes=self.max_image_bytes, roots=self.roots),
                mode=spec.preprocess,
                size=spec.size,
                align=spec.align,
            ),
        )
