"""The engine: VGGT resident on the device(s), turning units of work into cache entries.

A pipeline, each stage on its own threads so that the device never waits for disk:

    submit -> decode workers (skip-existing check, stat, decode + preprocess)
           -> scheduler (dynamic batches of equal clip shape; on-demand before bulk)
           -> one worker per device (one forward per batch, OOM -> split in halves)
           -> writer pool (write_entry, optional verify) -> the unit's Future

Work that fails (an undecodable image, a forward that runs out of memory on a
single unit, a write error) completes its future with ``status="failed"``
entries; only an engine that stops before running a unit fails the future
itself, with ``EngineStopped``.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import torch

from client.cachefile import Outcome, context_record, read_entry, source_record, write_entry
from client.spec import Attention, FeatureSpec
from service.model import LoadedModel
from service.model.features import entry_features
from service.preprocess import load_image, preprocess
from service.settings import ServiceSettings
from service.units import Unit

__all__ = ["Engine", "EngineStopped", "EntryResult", "Priority", "Unit", "UnitResult"]

log = logging.getLogger("vggt_cache")

SHUTDOWN_MESSAGE = "service shutting down"
_DEFAULTS = ServiceSettings()  # the one place engine settings have their defaults
STATS_WINDOW_S = 30.0

# [B, S, 3, H, W] batch on the device -> None; raising is handled like a failing forward.
ForwardHook = Callable[[torch.Tensor], None]
FrameKey = tuple[str, int, int]  # path, size, mtime_ns


class Priority(IntEnum):
    ON_DEMAND = 0
    BULK = 1


class EngineStopped(RuntimeError):
    """Raised by `submit` on an engine that is not running; set on futures that `stop` dropped."""


@dataclass
class EntryResult:
    image: str
    status: str  # "cached" | "computed" | "failed"
    features: torch.Tensor | None = None  # None when failed or when return_features=False
    grid: tuple[int, int] | None = None  # [h, w] patches
    error: str | None = None


@dataclass
class UnitResult:
    unit: Unit
    entries: list[EntryResult]  # one per target, in `unit.targets` order


@dataclass(eq=False)
class _Job:
    unit: Unit
    priority: Priority
    future: Future
    skip_existing: bool
    verify: bool
    return_features: bool
    seq: int = 0
    images: torch.Tensor | None = None  # [S, 3, H, W] once decoded
    sources: list[dict] = field(default_factory=list)  # per target, stat-ed before decoding
    contexts: list[dict | None] = field(default_factory=list)
    ready_at: float = 0.0

    @property
    def n_frames(self) -> int:
        return len(self.unit.frames)


@dataclass(eq=False)
class _Group:
    """Decoded jobs of one priority that can share a forward: same [S, 3, H, W]."""

    jobs: deque[_Job] = field(default_factory=deque)
    frames: int = 0

    @property
    def oldest(self) -> float:
        return self.jobs[0].ready_at


class _Scheduler:
    """The decode queue and the ready groups, both served on-demand first, under one lock.

    Bulk admission is bounded: `admit` blocks while `bulk_limit` frames of bulk
    work wait for a device (decoding or decoded), so a bulk backlog never sits
    in front of an on-demand request for more than about one batch.
    """

    def __init__(self, max_batch_frames: int, max_wait_s: float, bulk_limit: int) -> None:
        self.max_batch_frames = max_batch_frames
        self.max_wait_s = max_wait_s
        self.bulk_limit = bulk_limit
        self._lock = threading.Lock()
        self._decode_cv = threading.Condition(self._lock)
        self._ready_cv = threading.Condition(self._lock)
        self._space_cv = threading.Condition(self._lock)
        self._decode: dict[Priority, deque[_Job]] = {p: deque() for p in Priority}
        self._ready: dict[Priority, dict[tuple[int, ...], _Group]] = {p: {} for p in Priority}
        self._waiting = {p: 0 for p in Priority}  # units not yet on a device
        self._waiting_frames = {p: 0 for p in Priority}
        self._decoding = {p: 0 for p in Priority}  # queued for decode or being decoded
        self._seq = 0
        self._closed = False

    def admit(self, jobs: Sequence[_Job], priority: Priority) -> list[_Job]:
        """Queue jobs for decoding; returns those refused because the scheduler closed."""
        with self._lock:
            for i, job in enumerate(jobs):
                if priority is Priority.BULK:
                    while not self._closed and 0 < self._waiting_frames[priority] and (
                        self._waiting_frames[priority] + job.n_frames > self.bulk_limit
                    ):
                        self._space_cv.wait()
                if self._closed:
                    return list(jobs[i:])
                self._seq += 1
                job.seq = self._seq
                self._decode[priority].append(job)
                self._waiting[priority] += 1
                self._waiting_frames[priority] += job.n_frames
                self._decoding[priority] += 1
                self._decode_cv.notify()
            return []

    def next_to_decode(self) -> _Job | None:
        """The oldest job of the most urgent priority; None once closed."""
        with self._lock:
            while not self._closed:
                for p in Priority:
                    if self._decode[p]:
                        return self._decode[p].popleft()
                self._decode_cv.wait()
            return None

    def decoded(self, job: _Job, runnable: bool) -> bool:
        """Hand a decoded job to the devices (runnable) or retire it; False if closed meanwhile."""
        with self._lock:
            p = job.priority
            self._decoding[p] -= 1
            if runnable and not self._closed:
                job.ready_at = time.monotonic()
                key = tuple(job.images.shape)
                group = self._ready[p].setdefault(key, _Group())
                group.jobs.append(job)
                group.frames += job.n_frames
                self._ready_cv.notify_all()
                return True
            self._retire(p, 1, job.n_frames)
            # One job fewer decoding can make a forming batch due.
            self._ready_cv.notify_all()
            return not self._closed

    def next_batch(self) -> list[_Job] | None:
        """Block until a batch is due; None once closed.

        A group is due when it is full, when its oldest job has waited
        `max_wait_s` for company, or when no job of its priority is still
        decoding (no company is coming). While on-demand work is forming a
        batch, bulk work waits too: starting a bulk batch would delay the
        on-demand one by a whole forward.
        """
        with self._lock:
            while not self._closed:
                timeout = None
                for p in Priority:
                    groups = self._ready[p]
                    if not groups:
                        continue
                    now = time.monotonic()
                    idle = self._decoding[p] == 0
                    due = [
                        (key, g) for key, g in groups.items()
                        if idle or g.frames >= self.max_batch_frames or now >= g.oldest + self.max_wait_s
                    ]
                    if due:
                        key, _ = min(due, key=lambda kg: kg[1].oldest)
                        return self._take(p, key)
                    timeout = min(g.oldest for g in groups.values()) + self.max_wait_s - now
                    break
                self._ready_cv.wait(timeout)
            return None

    def _take(self, p: Priority, key: tuple[int, ...]) -> list[_Job]:
        group = self._ready[p][key]
        batch = [group.jobs.popleft()]
        frames = batch[0].n_frames
        while group.jobs and frames + group.jobs[0].n_frames <= self.max_batch_frames:
            job = group.jobs.popleft()
            batch.append(job)
            frames += job.n_frames
        group.frames -= frames
        if not group.jobs:
            del self._ready[p][key]
        self._retire(p, len(batch), frames)
        return batch

    def _retire(self, p: Priority, units: int, frames: int) -> None:
        self._waiting[p] -= units
        self._waiting_frames[p] -= frames
        self._space_cv.notify_all()

    def close(self) -> list[_Job]:
        """Refuse further work; returns every job still queued (decode queue and ready groups)."""
        with self._lock:
            self._closed = True
            dropped: list[_Job] = []
            for p in Priority:
                dropped += self._decode[p]
                self._decoding[p] -= len(self._decode[p])
                self._decode[p].clear()
                for group in self._ready[p].values():
                    dropped += group.jobs
                self._ready[p].clear()
            for job in dropped:
                self._waiting[job.priority] -= 1
                self._waiting_frames[job.priority] -= job.n_frames
            for cv in (self._decode_cv, self._ready_cv, self._space_cv):
                cv.notify_all()
            return dropped

    def counts(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {
                "queued": {p.name.lower(): self._waiting[p] for p in Priority},
                "decoding": {p.name.lower(): self._decoding[p] for p in Priority},
            }

    def waiting(self, p: Priority) -> int:
        with self._lock:
            return self._waiting[p]


class _FrameCache:
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
            if owner:
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


class _Window:
    """Intervals (start, end, amount) of the last `STATS_WINDOW_S` seconds: busy time, frames computed."""

    def __init__(self) -> None:
        self._events: deque[tuple[float, float, float]] = deque()  # (start, end, amount)

    def add(self, start: float, end: float, amount: float) -> None:
        self._events.append((start, end, amount))
        while self._events and self._events[0][1] < end - STATS_WINDOW_S:
            self._events.popleft()

    def total(self, since: float) -> float:
        return sum(amount for _, end, amount in self._events if end >= since)

    def overlap(self, since: float) -> float:
        return sum(end - max(start, since) for start, end, _ in self._events if end > since)


class _Device:
    """One device with its resident replica of the model and its counters (under the engine's lock)."""

    def __init__(self, name: str, model: torch.nn.Module) -> None:
        self.name = name
        self.device = torch.device(name)
        self.model = model
        self.is_cuda = self.device.type == "cuda"
        self.batches = 0
        self.frames = 0
        self.busy = _Window()
        self.busy_since: float | None = None  # start of the forward in flight

    def memory(self) -> dict[str, int]:
        if self.is_cuda:
            return {
                "allocated_bytes": torch.cuda.memory_allocated(self.device),
                "max_allocated_bytes": torch.cuda.max_memory_allocated(self.device),
            }
        return {"rss_bytes": _process_rss()}


class Engine:
    """VGGT resident on `devices`, computing and storing cache entries for submitted units.

    loaded: the model as `load_aggregator` returns it, already on `devices[0]`;
        each further device gets a deep copy.
    max_batch_frames: frames per forward (a unit longer than this runs alone).
    max_wait_ms: how long a decoded unit waits for company before its batch runs.
    decode_workers / write_workers: threads that decode images / write entries.
    bulk_queue_batches: bulk work allowed to wait for a device, in batches;
        `submit(..., Priority.BULK)` blocks beyond it.
    frame_cache_frames: preprocessed frames kept for reuse by overlapping clips
        (sequence/causal modes only).
    before_forward: called on the device thread with each batch `[B, S, 3, H, W]`
        just before its forward; whatever it raises is handled as the forward's
        error (raise `torch.cuda.OutOfMemoryError` to rehearse the split path,
        or block to hold the device, e.g. in tests or drills).

    `stop` finishes the batches in flight and their writes; queued units are
    not run: their futures fail with `EngineStopped("service shutting down")`.
    An engine runs once: it cannot be started again after `stop`.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        spec: FeatureSpec,
        devices: Sequence[str] = ("cpu",),
        max_batch_frames: int = _DEFAULTS.max_batch_frames,
        max_wait_ms: float = _DEFAULTS.max_wait_ms,
        decode_workers: int = _DEFAULTS.decode_workers,
        write_workers: int = _DEFAULTS.write_workers,
        bulk_queue_batches: int = 2,
        frame_cache_frames: int = 64,
        before_forward: ForwardHook | None = None,
    ) -> None:
        if not devices:
            raise ValueError("give at least one device")
        for name, value in (("max_batch_frames", max_batch_frames), ("decode_workers", decode_workers),
                            ("write_workers", write_workers), ("bulk_queue_batches", bulk_queue_batches)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        self.spec = spec
        self.max_batch_frames = max_batch_frames
        self.patch_size = loaded.config.patch_size
        self._before_forward = before_forward
        self._decode_workers = decode_workers
        self._write_workers = write_workers
        first = loaded.model.to(devices[0]).eval()
        # Replicas: a deep copy per extra device, so every GPU holds the same resident weights.
        self._devices = [_Device(devices[0], first)] + [
            _Device(name, copy.deepcopy(first).to(name).eval()) for name in devices[1:]
        ]
        self._scheduler = _Scheduler(max_batch_frames, max_wait_ms / 1000.0, bulk_queue_batches * max_batch_frames)
        self._frame_cache = _FrameCache(frame_cache_frames if spec.attention != Attention.FRAME else 0)
        # Bounds results waiting for a writer, so slow storage stalls the device instead of filling memory.
        self._write_slots = threading.Semaphore(2 * max_batch_frames * len(self._devices))
        self._lock = threading.Lock()  # counters and state below
        self._state = "new"  # new -> running -> stopped
        self._threads: list[threading.Thread] = []
        self._device_threads: list[threading.Thread] = []
        self._writer: ThreadPoolExecutor | None = None
        self._started_at = time.monotonic()
        self._throughput = _Window()
        self._in_flight = 0
        self._writing = 0
        self._oom_splits = 0
        self._units = {"computed": 0, "cached": 0, "failed": 0}

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        with self._lock:
            if self._state != "new":
                raise RuntimeError(f"engine already {self._state}; an engine runs once")
            self._state = "running"
            self._started_at = time.monotonic()
        self._writer = ThreadPoolExecutor(self._write_workers, thread_name_prefix="vggt-write")
        self._threads = [
            threading.Thread(target=self._decode_loop, name=f"vggt-decode-{i}", daemon=True)
            for i in range(self._decode_workers)
        ]
        self._device_threads = [
            threading.Thread(target=self._device_loop, args=(dev,), name=f"vggt-{dev.name}", daemon=True)
            for dev in self._devices
        ]
        for t in self._threads + self._device_threads:
            t.start()
        log.info("Engine started on %s: batches of up to %d frames, %s attention",
                 ", ".join(d.name for d in self._devices), self.max_batch_frames, self.spec.attention)

    def stop(self, timeout: float | None = None) -> bool:
        """Finish the batches in flight and their writes; fail queued futures. True if all threads ended."""
        with self._lock:
            was_running = self._state == "running"
            self._state = "stopped"
        if not was_running:
            return True
        dropped = self._scheduler.close()
        for job in dropped:
            _fail_future(job.future, EngineStopped(SHUTDOWN_MESSAGE))
        if dropped:
            log.info("Engine stopping: %d queued unit(s) dropped", len(dropped))
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self._threads + self._device_threads:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        clean = not any(t.is_alive() for t in self._threads + self._device_threads)
        assert self._writer is not None
        self._writer.shutdown(wait=clean)
        return clean

    def __enter__(self) -> Engine:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def ready(self) -> bool:
        """Running, with every device worker alive."""
        return self._state == "running" and all(t.is_alive() for t in self._device_threads)

    @property
    def stopped(self) -> bool:
        return self._state == "stopped"

    @property
    def devices(self) -> list[str]:
        return [d.name for d in self._devices]

    # -- submitting -----------------------------------------------------------------------------
    def submit(
        self,
        units: Iterable[Unit],
        priority: Priority = Priority.ON_DEMAND,
        skip_existing: bool = True,
        verify: bool = False,
        return_features: bool = True,
    ) -> list[Future[UnitResult]]:
        """Queue units; one future per unit, in order. Thread-safe.

        Bulk submissions block while the bulk queue is full. `skip_existing`:
        a unit whose every target already has a valid entry completes as
        "cached" without compute. `verify`: re-read each written entry and
        fail it unless it validates. `return_features=False` keeps no tensors
        in the results (bulk jobs only need statuses).
        """
        if self._state != "running":
            raise EngineStopped(SHUTDOWN_MESSAGE if self.stopped else "engine not started")
        priority = Priority(priority)
        jobs = []
        for unit in units:
            self._check_unit(unit)
            jobs.append(_Job(unit, priority, Future(), skip_existing, verify, return_features))
        for job in self._scheduler.admit(jobs, priority):
            _fail_future(job.future, EngineStopped(SHUTDOWN_MESSAGE))
        return [job.future for job in jobs]

    def pending(self, priority: Priority) -> int:
        """Units of `priority` submitted but not yet taken by a device (decoding or decoded)."""
        return self._scheduler.waiting(Priority(priority))

    def _check_unit(self, unit: Unit) -> None:
        mode = self.spec.attention
        if mode == Attention.FRAME and len(unit.frames) != 1:
            raise ValueError(f"frame attention takes one frame per unit, got {len(unit.frames)}")
        if mode == Attention.CAUSAL and unit.targets != unit.frames[-1:]:
            raise ValueError("a causal unit has one target, its last frame")

    # -- decode stage ---------------------------------------------------------------------------
    def _decode_loop(self) -> None:
        while (job := self._scheduler.next_to_decode()) is not None:
            if not job.future.set_running_or_notify_cancel():
                self._scheduler.decoded(job, runnable=False)  # cancelled while queued
                continue
            result = None
            try:
                result = self._cached_result(job) if job.skip_existing else None
                if result is None:
                    self._decode(job)
            except Exception as exc:  # ImageError, a missing file, ...: this unit only
                result = self._failed_result(job.unit, _describe(exc))
                log.warning("Cannot prepare %s: %s", job.unit.targets[-1], result.entries[0].error)
            if result is not None:
                self._scheduler.decoded(job, runnable=False)
                self._complete(job, result)
            elif not self._scheduler.decoded(job, runnable=True):
                _fail_future(job.future, EngineStopped(SHUTDOWN_MESSAGE))

    def _cached_result(self, job: _Job) -> UnitResult | None:
        """The unit's result read from disk when every target's entry validates, else None."""
        entries = []
        for target in job.unit.targets:
            # Read whole (no mmap): another NFS client may replace the file while we hold it. Work that
            # returns no features (bulk jobs) checks the metadata alone: a few KB instead of megabytes.
            read = read_entry(target, self.spec, context_frames=self.spec.context_of(job.unit.frames), mmap=False,
                              tensor=job.return_features)
            if read.outcome is not Outcome.HIT:
                return None
            entries.append(EntryResult(target, "cached", read.features, tuple(read.meta["grid"])))
        return UnitResult(job.unit, entries)

    def _decode(self, job: _Job) -> None:
        unit = job.unit
        # Stat before decoding: an image rewritten meanwhile leaves an entry that is already stale.
        job.sources = [source_record(t) for t in unit.targets]
        frames = self.spec.context_of(unit.frames)
        job.contexts = [None if frames is None else context_record(t, frames) for t in unit.targets]
        images = [self._load_frame(path) for path in unit.frames]
        shapes = {tuple(im.shape) for im in images}
        if len(shapes) > 1:
            raise ValueError(f"the frames of a clip must share one size after preprocessing, got {sorted(shapes)}")
        job.images = torch.stack(images)  # [S, 3, H, W]

    def _load_frame(self, path: str) -> torch.Tensor:
        st = os.stat(path)
        spec = self.spec
        return self._frame_cache.get(  # [3, H, W]
            (path, st.st_size, st.st_mtime_ns),
            lambda: preprocess(load_image(path), mode=spec.preprocess, size=spec.size, align=spec.align))

    # -- device stage ---------------------------------------------------------------------------
    def _device_loop(self, dev: _Device) -> None:
        if dev.is_cuda:
            torch.cuda.set_device(dev.device)
        while (batch := self._scheduler.next_batch()) is not None:
            with self._lock:
                self._in_flight += len(batch)
            try:
                self._run_batch(dev, batch)
            except Exception as exc:  # a bug here must fail the batch, not kill the device worker
                log.exception("Batch on %s failed", dev.name)
                for job in batch:  # units already handed to a writer keep their result (_complete)
                    self._complete(job, self._failed_result(job.unit, _describe(exc)))
            finally:
                with self._lock:
                    self._in_flight -= len(batch)

    def _run_batch(self, dev: _Device, batch: list[_Job]) -> None:
        """Forward `batch`; on out-of-memory, retry each half; a single unit that still fails is failed."""
        parts = [batch]
        while parts:
            part = parts.pop()
            oom, error = False, None
            try:
                features = self._forward(dev, part)
            except Exception as exc:  # handled after the except block so its frames (activations) are freed
                oom, error = _is_oom(exc), _describe(exc)
            if error is None:
                self._store(part, features)
                continue
            if dev.is_cuda:
                torch.cuda.empty_cache()
            if oom and len(part) > 1:
                half = len(part) // 2
                with self._lock:
                    self._oom_splits += 1
                log.warning("Out of memory on %s with %d units (%d frames): retrying in halves", dev.name,
                            len(part), sum(j.n_frames for j in part))
                parts += [part[half:], part[:half]]  # first half runs first
                continue
            log.warning("Forward failed on %s for %d unit(s): %s", dev.name, len(part), error)
            for job in part:
                self._complete(job, self._failed_result(job.unit, error))

    def _forward(self, dev: _Device, jobs: list[_Job]) -> torch.Tensor:
        """CPU features of the targets' frames: [B, T, P, C] or [B, T, L, P, C] (T = S or 1)."""
        start = time.monotonic()
        with self._lock:
            dev.busy_since = start
        try:
            images = torch.stack([j.images for j in jobs]).to(dev.device, non_blocking=True)  # [B, S, 3, H, W]
            with torch.inference_mode():
                if self._before_forward is not None:
                    self._before_forward(images)
                # causal: all clips of the batch in one block-causal forward, not frame by frame.
                # Cast on the device (halves the transfer for 16-bit storage), then to the host.
                features = entry_features(dev.model, images, self.spec).to("cpu")
        finally:
            end = time.monotonic()
            with self._lock:
                dev.busy_since = None
                dev.busy.add(start, end, 0.0)
        frames = sum(j.n_frames for j in jobs)
        with self._lock:
            dev.batches += 1
            dev.frames += frames
            self._throughput.add(end, end, frames)
        return features

    # -- write stage ----------------------------------------------------------------------------
    def _store(self, jobs: list[_Job], features: torch.Tensor) -> None:
        grid = (jobs[0].images.shape[-2] // self.patch_size, jobs[0].images.shape[-1] // self.patch_size)
        assert self._writer is not None
        for job, unit_features in zip(jobs, features):
            self._write_slots.acquire()
            with self._lock:
                self._writing += 1
            self._writer.submit(self._write_unit, job, unit_features, grid)

    def _write_unit(self, job: _Job, features: torch.Tensor, grid: tuple[int, int]) -> None:
        """Write every target's entry of one unit. features: [T, (L,) P, C]."""
        try:
            unit = job.unit
            entries = []
            for i, target in enumerate(unit.targets):
                # A frame repeated in a clip (padded history) takes its last position's output, the one
                # training computes for a clip's current frame.
                index = 0
                if self.spec.attention == Attention.SEQUENCE:
                    index = len(unit.frames) - 1 - unit.frames[::-1].index(target)
                # Own storage: a result must not pin the whole batch (and write_entry need not copy).
                entry = features[index].clone()
                try:
                    write_entry(target, entry, self.spec, grid, job.sources[i], job.contexts[i])
                    if job.verify:
                        self._verify(target, entry, unit)
                except Exception as exc:
                    log.warning("Cannot store the entry of %s: %s", target, _describe(exc))
                    entries.append(EntryResult(target, "failed", None, grid, _describe(exc)))
                    continue
                entries.append(EntryResult(target, "computed", entry if job.return_features else None, grid))
            self._complete(job, UnitResult(unit, entries))
        except Exception as exc:  # anything else (e.g. no memory for the clone): fail the unit, never hang it
            log.exception("Storing the entries of %s failed", job.unit.targets[-1])
            self._complete(job, self._failed_result(job.unit, _describe(exc)))
        finally:
            with self._lock:
                self._writing -= 1
            self._write_slots.release()

    def _verify(self, target: str, expected: torch.Tensor, unit: Unit) -> None:
        read = read_entry(target, self.spec, context_frames=self.spec.context_of(unit.frames), mmap=False)
        if read.outcome is not Outcome.HIT:
            raise OSError(f"verify failed: entry reads back as {read.outcome.value} ({read.reason})")
        if not torch.equal(read.features, expected):
            raise OSError("verify failed: entry reads back with different features")

    # -- results and stats ----------------------------------------------------------------------
    def _failed_result(self, unit: Unit, message: str) -> UnitResult:
        return UnitResult(unit, [EntryResult(t, "failed", error=message) for t in unit.targets])

    def _complete(self, job: _Job, result: UnitResult) -> None:
        statuses = {e.status for e in result.entries}
        kind = "failed" if "failed" in statuses else "computed" if "computed" in statuses else "cached"
        with self._lock:
            if job.future.done():  # a failure path raced the normal one: the first result stands
                return
            self._units[kind] += 1
        with contextlib.suppress(InvalidStateError):  # callbacks run outside the lock
            job.future.set_result(result)

    def stats(self) -> dict[str, Any]:
        """Queue depths, work done, recent throughput, device memory and busy fraction."""
        now = time.monotonic()
        since = now - STATS_WINDOW_S
        span = max(min(STATS_WINDOW_S, now - self._started_at), 1e-3)
        counts = self._scheduler.counts()
        with self._lock:
            devices = []
            for dev in self._devices:
                busy = dev.busy.overlap(since)
                if dev.busy_since is not None:
                    busy += now - max(dev.busy_since, since)
                devices.append({"device": dev.name, "batches": dev.batches, "frames": dev.frames,
                                "busy_fraction": round(min(busy / span, 1.0), 4), "memory": dev.memory()})
            return {
                "state": self._state,
                "ready": self.ready,
                **counts,
                "in_flight": self._in_flight,
                "writing": self._writing,
                "batches": sum(d["batches"] for d in devices),
                "frames": sum(d["frames"] for d in devices),
                "oom_splits": self._oom_splits,
                # Frames decoded, and frames a clip took from another clip's decode (overlapping histories).
                "frames_decoded": self._frame_cache.misses,
                "frames_reused": self._frame_cache.hits,
                "units": dict(self._units),
                "images_per_s": round(self._throughput.total(since) / span, 3),
                "busy_fraction": round(sum(d["busy_fraction"] for d in devices) / len(devices), 4),
                "window_s": STATS_WINDOW_S,
                "max_batch_frames": self.max_batch_frames,
                "devices": devices,
            }


def _fail_future(future: Future, exc: BaseException) -> None:
    # A queued future may have been cancelled by its caller; a decoded one is already running.
    if future.running() or future.set_running_or_notify_cancel():
        future.set_exception(exc)


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    # The CPU allocator reports exhaustion as a plain RuntimeError.
    return isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)


def _describe(exc: BaseException) -> str:
    # ImageError and OSError messages already name the file; others get their type for context.
    if isinstance(exc, (ValueError, OSError)):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def _process_rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # peak, where /proc is missing
