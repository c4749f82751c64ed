"""The writer stage: each computed unit's entries written (atomically) and, if asked, read back to verify."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import torch

from vggt_cache.client.cachefile import Outcome, holds_other_context, read_entry, write_entry
from vggt_cache.client.spec import Attention, FeatureSpec
from vggt_cache.client.storage import as_stored
from vggt_cache.client.text import error_text
from vggt_cache.client.wire import EntryStatus
from vggt_cache.service.engine.work import (
    KEPT,
    REPLACED,
    Complete,
    EntryResult,
    Flight,
    UnitResult,
    failed_result,
    when_descriptors_free,
)

log = logging.getLogger("vggt_cache")


class WriterStage:
    """A pool of `workers` threads; at most `slots` units wait for one, so slow storage stalls the device
    instead of filling memory."""

    def __init__(
        self,
        spec: FeatureSpec,
        complete: Complete,
        workers: int,
        slots: int,
        patch_size: int,
        roots: Sequence[str] | None,
        file_mode: int,
    ) -> None:
        """`roots` (real paths): every folder written must lie inside one when it is opened; `file_mode`: the
        entries' permissions."""
        self.spec = spec
        self.roots = roots
        self.file_mode = file_mode
        self._complete = complete
        self._workers = workers
        self._slots = threading.Semaphore(slots)
        self._patch_size = patch_size
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self.writing = 0  # units taken by the stage and not yet completed

    def start(self) -> None:
        self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="vggt-write")

    def shutdown(self, wait: bool) -> None:
        assert self._pool is not None
        self._pool.shutdown(wait=wait)

    def store(self, flights: list[Flight], features: torch.Tensor) -> None:
        """Hand a batch's results to the writers: `features` is `[B, T, (L,) P, C]`, one row per flight."""
        images = flights[0].images
        assert images is not None  # decoded before the forward
        grid = (images.shape[-2] // self._patch_size, images.shape[-1] // self._patch_size)
        assert self._pool is not None
        for flight, unit_features in zip(flights, features, strict=True):
            self._slots.acquire()
            with self._lock:
                self.writing += 1
            try:
                self._pool.submit(self._write_unit, flight, unit_features, grid)
            except BaseException:  # the pool is shut down (an unclean stop): give the slot back
                with self._lock:
                    self.writing -= 1
                self._slots.release()
                raise

    def _write_unit(self, flight: Flight, features: torch.Tensor, grid: tuple[int, int]) -> None:
        """Write every target's entry of one unit. features: [T, (L,) P, C]."""
        try:
            unit = flight.unit
            entries = []
            frames = self.spec.context_of(unit.frames)
            for i, target in enumerate(unit.targets):
                # A frame repeated in a clip (padded history) takes its last position's output, the one
                # training computes for a clip's current frame.
                index = 0
                if self.spec.attention == Attention.SEQUENCE:
                    index = len(unit.frames) - 1 - unit.frames[::-1].index(target)
                # Own storage: a result must not pin the whole batch (and write_entry need not copy).
                entry = features[index].clone()
                try:
                    stored = as_stored(entry, self.spec.storage)  # what a read of the entry gives (fp8 is lossy)
                    returned = stored if flight.return_features else None
                    write = REPLACED if holds_other_context(target, self.spec, frames, self.roots) else None
                    if write and not flight.overwrite:
                        entries.append(EntryResult(target, EntryStatus.COMPUTED, returned, grid, write=KEPT))
                        continue
                    when_descriptors_free(
                        partial(
                            write_entry,
                            target,
                            entry,
                            self.spec,
                            grid,
                            flight.sources[i],
                            flight.contexts[i],
                            roots=self.roots,
                            mode=self.file_mode,
                        ),
                        f"writing the entry of {target}",
                    )
                    if flight.verify:
                        self._verify(target, stored, unit.frames)
                except Exception as exc:
                    log.warning("Cannot store the entry of %s: %s", target, error_text(exc))
                    entries.append(EntryResult(target, EntryStatus.FAILED, None, grid, error_text(exc)))
                    continue
                entries.append(EntryResult(target, EntryStatus.COMPUTED, returned, grid, write=write))
            self._complete(flight, UnitResult(unit, entries))
        except Exception as exc:  # anything else (e.g. no memory for the clone): fail the unit, never hang it
            log.exception("Storing the entries of %s failed", flight.unit.targets[-1])
            self._complete(flight, failed_result(flight.unit, error_text(exc)))
        finally:
            with self._lock:
                self.writing -= 1
            self._slots.release()

    def _verify(self, target: str, expected: torch.Tensor, frames: tuple[str, ...]) -> None:
        read = read_entry(
            target, self.spec, context_frames=self.spec.context_of(frames), mmap=False, roots=self.roots, check_crc=True
        )
        if read.outcome is not Outcome.HIT or read.features is None:
            raise OSError(f"verify failed: entry reads back as {read.outcome.value} ({read.reason})")
        if not torch.equal(read.features, expected):
            raise OSError("verify failed: entry reads back with different features")
