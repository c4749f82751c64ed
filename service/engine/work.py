"""What flows through the engine: a unit in flight, its result, the priorities, the engine's errors."""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TypeVar

import torch

from vggt_cache.client.cachefile import Outcome
from vggt_cache.client.wire import EntryStatus
from vggt_cache.service.units import Unit

log = logging.getLogger("vggt_cache")
T = TypeVar("T")
SHUTDOWN_MESSAGE = "service shutting down"
WITHDRAWN_MESSAGE = "taken back before it ran: its job was cancelled"
# Pauses before each retry of a step that ran out of descriptors (EMFILE/ENFILE): 15.5 s in all, so a
# passing flood of connections (closed by their header deadline within seconds) fails nothing.
DESCRIPTOR_PAUSES_S = (0.5, 1.0, 2.0, 4.0, 8.0)
FrameKey = tuple[str, int, int]  # a decoded frame: path, size, mtime_ns (a rewritten image is another key)
# Told which units go on a device just before their forward (1), and off it once the forward is over (-1).
StartHook = Callable[[list[Unit], int], None]


class Priority(IntEnum):
    ON_DEMAND = 0
    BULK = 1


class EngineStopped(RuntimeError):
    """Raised by `submit` on an engine that is not running; set on futures that `stop` dropped."""


class Withdrawn(RuntimeError):
    """Set on the futures of queued units taken back by `Engine.withdraw` (their job was cancelled)."""


class QueueFull(RuntimeError):
    """`submit` would exceed the queue limit it was given: nothing was queued (the API answers 429)."""


@dataclass
class EntryResult:
    image: str
    status: EntryStatus
    features: torch.Tensor | None = None  # None when failed or when return_features=False
    grid: tuple[int, int] | None = None  # [h, w] patches
    error: str | None = None
    # KEPT: not written, a valid entry of another clip holds the file; REPLACED: written over one (overwrite).
    write: str | None = None


KEPT, REPLACED = "kept", "replaced"


@dataclass
class UnitResult:
    unit: Unit
    entries: list[EntryResult]  # one per target, in `unit.targets` order

    @property
    def kind(self) -> EntryStatus:
        """failed if any entry failed, else computed if any was computed, else cached."""
        statuses = {e.status for e in self.entries}
        return next(s for s in (EntryStatus.FAILED, EntryStatus.COMPUTED, EntryStatus.CACHED) if s in statuses)


@dataclass(eq=False)
class Flight:
    """One unit in flight through the stages (a bulk job's many units are each a flight of their own)."""

    unit: Unit
    priority: Priority
    future: Future
    skip_existing: bool
    verify: bool
    return_features: bool
    lane: int | None = None  # the device that should run it (see Scheduler), or any
    overwrite: bool = False  # replace a valid entry of another clip (bulk jobs that ask); else keep it
    on_start: list[StartHook] = field(default_factory=list)  # each waiter's, told once the unit goes on a device
    withdrawn: bool = False  # no one waits for it any more: not to be run once decoded
    images: torch.Tensor | None = None  # [S, 3, H, W] once decoded
    frame_keys: list[FrameKey] = field(default_factory=list)  # per frame, once decoded
    sources: list[dict] = field(default_factory=list)  # per target, stat-ed before decoding
    contexts: list[dict | None] = field(default_factory=list)
    ready_at: float = 0.0
    found: Outcome | None = None  # what the read of an entry that skip_existing found invalid said
    completed: bool = False  # set once, under the engine's lock, by the path that completes it

    @property
    def n_frames(self) -> int:
        return len(self.unit.frames)


Complete = Callable[[Flight, UnitResult], None]  # how a stage hands a unit's result back to the engine


def failed_result(unit: Unit, message: str) -> UnitResult:
    return UnitResult(unit, [EntryResult(t, EntryStatus.FAILED, error=message) for t in unit.targets])


def fail_future(future: Future, exc: BaseException) -> None:
    # A queued future may have been cancelled by its caller; a decoded one is already running.
    if future.running() or future.set_running_or_notify_cancel():
        future.set_exception(exc)


def out_of_descriptors(exc: BaseException) -> bool:
    """Whether `exc`, or an error it was raised from, is EMFILE or ENFILE (the process or the system is full)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.EMFILE, errno.ENFILE):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def when_descriptors_free(step: Callable[[], T], what: str) -> T:
    """`step()`, run again after a pause while it fails for want of descriptors; the last failure is raised."""
    for pause in DESCRIPTOR_PAUSES_S:
        try:
            return step()
        except Exception as exc:
            if not out_of_descriptors(exc):
                raise
            log.warning("Out of file descriptors %s; retrying in %g s", what, pause)
        time.sleep(pause)  # a pause, not synchronisation: descriptors come back as connections close
    return step()
