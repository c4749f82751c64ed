"""The engine: VGGT resident on the device(s), turning units of work into cache entries.

A pipeline, each stage on its own threads so that the device never waits for disk:

    submit -> scheduler.admit (limits decided under its lock; on-demand before bulk)
           -> decode stage (skip-existing check, stat, decode + preprocess)      decode.py
           -> scheduler (dynamic batches of equal clip shape)                    scheduler.py
           -> device stage (one forward per batch, OOM -> split in halves)      device.py
           -> writer stage (write_entry, optional verify)                        writer.py
           -> Engine.complete -> the unit's Future -> every waiter's Future

Identical work runs once (single-flight): a unit submitted while the same unit is in flight
(same frames and targets; the spec is the engine's) joins it when that flight serves it, and
every waiter gets the one result. Withdrawing or cancelling one waiter leaves the others theirs.

Work that fails (an undecodable image, a forward that runs out of memory on a
single unit, a write error) completes its future with `failed` entries; only an
engine that stops before running a unit fails the future itself, with
`EngineStopped`.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from enum import Enum
from functools import partial
from typing import Any

import torch

from vggt_cache.client.cachefile import Outcome
from vggt_cache.client.spec import Attention, FeatureSpec
from vggt_cache.client.wire import EntryStatus
from vggt_cache.service.engine.decode import DecodeStage
from vggt_cache.service.engine.device import Device, DeviceStage, ForwardHook
from vggt_cache.service.engine.scheduler import Scheduler
from vggt_cache.service.engine.stats import STATS_WINDOW_S, History
from vggt_cache.service.engine.work import (
    KEPT,
    REPLACED,
    SHUTDOWN_MESSAGE,
    WITHDRAWN_MESSAGE,
    EngineStopped,
    Job,
    Priority,
    QueueFull,
    StartHook,
    UnitResult,
    Withdrawn,
    fail_future,
)
from vggt_cache.service.engine.writer import WriterStage
from vggt_cache.service.model import LoadedModel
from vggt_cache.service.model.resident import compile_blocks, compile_counts, make_resident, weights_dtype
from vggt_cache.service.settings import ServiceSettings
from vggt_cache.service.units import Unit

log = logging.getLogger("vggt_cache")

_DEFAULTS = ServiceSettings()  # the one place engine settings have their defaults


# What an on-demand unit found: a valid entry (hit), a read outcome that made it a miss, a forced
# recompute (skip_existing off), or a failure.
LOOKUPS = ("hit", *(o.value for o in Outcome if o is not Outcome.HIT), "recomputed", "failed")


def _lookup(job: Job, result: UnitResult) -> str:
    if result.kind is EntryStatus.CACHED:
        return "hit"
    if result.kind is EntryStatus.FAILED:
        return "failed"
    return job.found or ("missing" if job.skip_existing else "recomputed")


@dataclass(eq=False)
class _Flight:
    """A unit in the engine and the futures waiting for its result (each submission has its own)."""

    job: Job
    waiters: set[Future] = field(default_factory=set)
    open: bool = True  # new submissions may join; closed once landed or being withdrawn

    def serves(self, priority: Priority, skip_existing: bool, verify: bool, return_features: bool,
               overwrite: bool) -> bool:
        """Whether this flight's result is what such a submission would get, at least as soon.

        An on-demand waiter does not join bulk work (it would wait behind the bulk backlog): it
        runs on its own, at its priority.
        """
        job = self.job
        return (self.open and job.priority <= priority and job.skip_existing == skip_existing
                and job.verify >= verify and job.return_features >= return_features
                and job.overwrite == overwrite)


def _settle(waiter: Future, done: Future) -> None:
    """Give `waiter` the outcome of its flight's `done` future (unless its caller cancelled it)."""
    exc: BaseException | None = None if not done.cancelled() else Withdrawn("cancelled before it ran")
    exc = exc or done.exception()
    if exc is not None:
        fail_future(waiter, exc)
    elif waiter.set_running_or_notify_cancel():
        waiter.set_result(done.result())


class EngineState(str, Enum):
    NEW = "new"
    RUNNING = "running"
    STOPPED = "stopped"  # an engine runs once


class Engine:
    """VGGT resident on `devices`, computing and storing cache entries for submitted units.

    loaded: the model as `load_aggregator` returns it, already on `devices[0]`;
        each further device gets a deep copy.
    max_batch_frames: frames per forward (a unit longer than this runs alone).
    max_wait_ms: how long a decoded unit waits for company before its batch runs.
    decode_workers / write_workers: threads that decode images / write entries.
    bulk_queue_batches: bulk work allowed to wait for a device, in batches per device (see `submit`).
    hint_queue_batches: further room, in batches, for non-blocking bulk work (prefetch hints),
        so hints are taken while a job keeps the bulk backlog full.
    frame_cache_frames: preprocessed frames kept for reuse by overlapping clips, per lane
        (sequence/causal modes only: each device's lane is a stretch of episodes of its own).
    patch_cache_bytes: per device, memory for the DINOv2 patch tokens of recent frames, reused
        by the clips that share them (sequence/causal modes only; 0: shared within a batch only).
    fp32_weights: keep every weight float32 under bfloat16 autocast on CUDA even when entries are
        stored in 16 bits (default there: matmul and conv weights held in bfloat16, which autocast
        casts them to anyway; see `weights_dtype`).
    compile: `torch.compile` the transformer blocks (the first batches of each shape are slow).
    roots: the allowed roots (real paths): every image, cache file and folder the engine opens must
        lie inside one when it is opened (None: no containment, e.g. in-process tools).
    max_image_bytes: image files larger than this fail unread.
    file_mode: permissions of the entries written, whatever the process's umask.
    before_forward: called on the device thread with each batch `[B, S, 3, H, W]`
        just before its forward; whatever it raises is handled as the forward's
        error (raise `torch.cuda.OutOfMemoryError` to rehearse the split path,
        or block to hold the device, e.g. in tests or drills).

    `stop` finishes the batches in flight and their writes; queued units are
    not run: their futures fail with `EngineStopped("service shutting down")`.
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
        hint_queue_batches: int = 8,
        frame_cache_frames: int = 64,
        patch_cache_bytes: int = _DEFAULTS.patch_cache_mb << 20,
        fp32_weights: bool = _DEFAULTS.fp32_weights,
        compile: bool = _DEFAULTS.compile,
        before_forward: ForwardHook | None = None,
        roots: Sequence[str] | None = None,
        max_image_bytes: int = _DEFAULTS.max_image_bytes,
        file_mode: int = _DEFAULTS.file_mode,
    ) -> None:
        if not devices:
            raise ValueError("give at least one device")
        for name, value in (("max_batch_frames", max_batch_frames), ("decode_workers", decode_workers),
                            ("write_workers", write_workers), ("bulk_queue_batches", bulk_queue_batches)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        self.spec = spec
        self.max_batch_frames = max_batch_frames
        self.max_image_bytes = max_image_bytes
        self.file_mode = file_mode  # of the entries written, and of a job's manifest
        self.weights_dtype = weights_dtype(torch.device(devices[0]), spec.torch_dtype, fp32_weights)
        # Replicas: the first device's resident model copied to each further device in turn (one copy
        # at a time on the first GPU), compiled once all exist, so every GPU holds the same weights.
        models = [make_resident(loaded.model, torch.device(devices[0]), self.weights_dtype)]
        for name in devices[1:]:
            models.append(make_resident(copy.deepcopy(models[0]), torch.device(name), self.weights_dtype))
        self.compiled = compile
        if compile:
            for model in models:
                compile_blocks(model, len(devices))
        replicas = [Device(name, model, patch_cache_bytes) for name, model in zip(devices, models, strict=True)]
        # Every device gets its own bulk batches queued; hints (lane-less) do not need more room per device.
        self._scheduler = Scheduler(max_batch_frames, max_wait_ms / 1000.0,
                                    bulk_queue_batches * max_batch_frames * len(replicas),
                                    hint_queue_batches * max_batch_frames)
        # Clips share frames: a lane per device keeps one stretch of episodes with its patch cache.
        self.lanes = len(replicas) if spec.attention != Attention.FRAME and patch_cache_bytes > 0 else 1
        self._decode = DecodeStage(spec, self._scheduler, self._complete, decode_workers,
                                   frame_cache_frames * self.lanes, roots, max_image_bytes)
        self._writer = WriterStage(spec, self._complete, write_workers, 2 * max_batch_frames * len(replicas),
                                   loaded.config.patch_size, roots, file_mode)
        self._device = DeviceStage(spec, self._scheduler, replicas, self._writer, self._complete, before_forward,
                                   self.lanes)
        self._lock = threading.Lock()  # the state and unit counts below
        self._state = EngineState.NEW
        self._decode_threads: list[threading.Thread] = []
        self._started_at = time.monotonic()
        self._units = dict.fromkeys(EntryStatus, 0)
        self._computed = History()  # entries computed per interval: the status page's chart
        self._lookups: dict[str, int] = dict.fromkeys(LOOKUPS, 0)
        # Entries of another clip's valid entry: kept (not written) or replaced (overwrite asked).
        self._other_context: dict[str, int] = dict.fromkeys((KEPT, REPLACED), 0)
        self._flights: dict[Unit, _Flight] = {}  # the open flight of each unit in the engine
        self._flight_of: dict[Future, _Flight] = {}  # each waiter's flight, until it is settled
        self._joined = 0  # submissions that joined a flight instead of running again

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        with self._lock:
            if self._state is not EngineState.NEW:
                raise RuntimeError(f"engine already {self._state.value}; an engine runs once")
            self._state = EngineState.RUNNING
            self._started_at = time.monotonic()
        self._writer.start()
        self._decode_threads = self._decode.start()
        self._device.start()
        log.info("Engine started on %s: batches of up to %d frames, %s attention, %s weights",
                 ", ".join(self.devices), self.max_batch_frames, self.spec.attention, self.weights_dtype_name)

    def stop(self, timeout: float | None = None) -> bool:
        """Finish the batches in flight and their writes; fail queued futures. True if all threads ended."""
        with self._lock:
            was_running = self._state is EngineState.RUNNING
            self._state = EngineState.STOPPED
        if not was_running:
            return True
        dropped = self._scheduler.close()
        for job in dropped:
            fail_future(job.future, EngineStopped(SHUTDOWN_MESSAGE))
        if dropped:
            log.info("Engine stopping: %d queued unit(s) dropped", len(dropped))
        deadline = None if timeout is None else time.monotonic() + timeout
        threads = self._decode_threads + self._device.threads
        for t in threads:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        clean = not any(t.is_alive() for t in threads)
        self._writer.shutdown(wait=clean)
        return clean

    def __enter__(self) -> Engine:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def weights_dtype_name(self) -> str:
        return str(self.weights_dtype).removeprefix("torch.")

    @property
    def ready(self) -> bool:
        """Running, with every device worker alive and no device lost."""
        return (self._state is EngineState.RUNNING and all(t.is_alive() for t in self._device.threads)
                and not self.lost_devices)

    @property
    def lost_devices(self) -> dict[str, str]:
        """Device name -> why it was given up (a fatal CUDA error), for the probes."""
        return {d.name: d.failed for d in self._device.devices if d.failed is not None}

    @property
    def stopped(self) -> bool:
        return self._state is EngineState.STOPPED

    @property
    def devices(self) -> list[str]:
        return [d.name for d in self._device.devices]

    # -- submitting -----------------------------------------------------------------------------
    def submit(
        self,
        units: Iterable[Unit],
        priority: Priority = Priority.ON_DEMAND,
        skip_existing: bool = True,
        verify: bool = False,
        return_features: bool = True,
        block: bool = True,
        max_pending: int | None = None,
        lanes: Sequence[int] | None = None,
        overwrite: bool = False,
        on_start: StartHook | None = None,
    ) -> list[Future[UnitResult]]:
        """Queue units; one future per unit, in order. Thread-safe.

        Bulk work waits while the bulk queue is full (`block`), or is refused whole with
        `QueueFull` (`block=False`: a request handler must not wait). `max_pending` caps the
        units of `priority` waiting for a device: past it the submission is refused whole
        with `QueueFull`. `skip_existing`: a unit whose every target already has a valid
        entry completes as "cached" without compute. `verify`: re-read each written entry and
        fail it unless it validates. `return_features=False` keeps no tensors in the results
        (bulk jobs only need statuses). `lanes`, one per bulk unit (0 to `lanes` - 1): the device
        that should run it, so that units sharing frames meet one patch cache; None: any device.
        `overwrite`: replace a valid entry computed with another clip (else it is kept: a unit that
        returns no features is not computed for it, one that does is computed and not written).
        `on_start`: called on the device thread with the units of a batch that were submitted with it
        and 1 just before their forward, -1 once it is over (a job counts the deaths of the service
        during a unit's forward there); what it raises is logged.
        """
        if self._state is not EngineState.RUNNING:
            raise EngineStopped(SHUTDOWN_MESSAGE if self.stopped else "engine not started")
        priority = Priority(priority)
        units = list(units)
        if lanes is not None and (priority is not Priority.BULK or len(lanes) != len(units)
                                  or not all(0 <= lane < self.lanes for lane in lanes)):
            # An on-demand group with a lane would hold back the other devices' bulk work while it forms.
            raise ValueError(f"give bulk units one lane each in 0..{self.lanes - 1}, got {list(lanes)[:8]} "
                             f"for {len(units)} {priority.name.lower()} unit(s)")
        for unit in units:
            self._check_unit(unit)
        waiters, jobs, joined = self._board(units, priority, skip_existing, verify, return_features, overwrite,
                                            lanes, on_start)
        try:
            refused = self._scheduler.admit(jobs, priority, block=block, max_units=max_pending)
        except QueueFull:
            self._unboard(jobs, joined)
            raise
        for job in refused:
            fail_future(job.future, EngineStopped(SHUTDOWN_MESSAGE))
        return waiters

    def _board(self, units: list[Unit], priority: Priority, skip_existing: bool, verify: bool,
               return_features: bool, overwrite: bool, lanes: Sequence[int] | None,
               on_start: StartHook | None) -> tuple[list[Future], list[Job], list[Future]]:
        """A waiter per unit, each joining the unit's flight if one serves it, else a new job's flight.

        Returns (waiters in unit order, the new jobs to admit, the waiters that joined earlier flights).
        """
        waiters: list[Future] = []
        jobs: list[Job] = []
        joined: list[Future] = []
        new: set[Future] = set()
        with self._lock:
            for i, unit in enumerate(units):
                waiter: Future = Future()
                flight = self._flights.get(unit)
                if flight is not None and flight.serves(priority, skip_existing, verify, return_features, overwrite):
                    if flight.job.future not in new:
                        joined.append(waiter)
                    self._joined += 1
                else:
                    job = Job(unit, priority, Future(), skip_existing, verify, return_features,
                              None if lanes is None else lanes[i], overwrite)
                    flight = self._flights[unit] = _Flight(job)
                    job.future.add_done_callback(partial(self._land, flight))
                    jobs.append(job)
                    new.add(job.future)
                if on_start is not None and on_start not in flight.job.on_start:
                    flight.job.on_start.append(on_start)
                flight.waiters.add(waiter)
                self._flight_of[waiter] = flight
                waiter.add_done_callback(self._left)
                waiters.append(waiter)
        return waiters, jobs, joined

    def _unboard(self, jobs: list[Job], joined: list[Future]) -> None:
        """Undo a refused submission: its new jobs fail (with whoever joined them meanwhile), its joins leave."""
        for waiter in joined:
            waiter.cancel()  # never running: `_left` takes it off its flight
        for job in jobs:
            fail_future(job.future, QueueFull("refused with the submission it belonged to"))

    def _land(self, flight: _Flight, _done: Future) -> None:
        """The flight's job ended (`_done`, its future): every waiter still attached gets its outcome."""
        with self._lock:
            self._close(flight)
            waiters = list(flight.waiters)
            flight.waiters.clear()
            for waiter in waiters:
                self._flight_of.pop(waiter, None)
        for waiter in waiters:
            _settle(waiter, flight.job.future)

    def _left(self, waiter: Future) -> None:
        """A waiter's caller cancelled it (a client gone): the job is cancelled too once no one waits for it."""
        if not waiter.cancelled():
            return
        with self._lock:
            flight = self._flight_of.pop(waiter, None)
            if flight is None:
                return
            flight.waiters.discard(waiter)
            if flight.waiters:
                return
            self._close(flight)
        flight.job.future.cancel()  # only while queued: a job being decoded or run finishes

    def _close(self, flight: _Flight) -> None:
        """No one may join `flight` any more (under the lock)."""
        flight.open = False
        if self._flights.get(flight.job.unit) is flight:
            del self._flights[flight.job.unit]

    def withdraw(self, futures: Iterable[Future]) -> int:
        """Take back the units of `futures` still queued (not yet decoding or on a device); their futures
        fail with `Withdrawn`. A future whose unit others also wait for leaves it at once, whatever its
        stage; the unit goes on for them. Returns how many futures were taken back. Thread-safe."""
        left: list[Future] = []
        alone: set[Future] = set()  # jobs that only the withdrawn futures wait for
        with self._lock:
            for waiter in set(futures):
                flight = self._flight_of.get(waiter)
                if flight is None:
                    continue
                if flight.waiters - {waiter}:
                    flight.waiters.discard(waiter)
                    del self._flight_of[waiter]
                    left.append(waiter)
                else:
                    self._close(flight)
                    flight.job.withdrawn = True  # one being decoded now is not run (see Scheduler.decoded)
                    alone.add(flight.job.future)
        for waiter in left:
            fail_future(waiter, Withdrawn(WITHDRAWN_MESSAGE))
        taken = self._scheduler.withdraw(alone)
        for job in taken:
            fail_future(job.future, Withdrawn(WITHDRAWN_MESSAGE))  # its waiter gets it through `_land`
        return len(left) + len(taken)

    def pending(self, priority: Priority) -> int:
        """Units of `priority` submitted but not yet taken by a device (decoding or decoded)."""
        return self._scheduler.waiting(Priority(priority))

    def _check_unit(self, unit: Unit) -> None:
        mode = self.spec.attention
        if mode == Attention.FRAME and len(unit.frames) != 1:
            raise ValueError(f"frame attention takes one frame per unit, got {len(unit.frames)}")
        if mode == Attention.CAUSAL and unit.targets != unit.frames[-1:]:
            raise ValueError("a causal unit has one target, its last frame")

    # -- results and stats ----------------------------------------------------------------------
    def _complete(self, job: Job, result: UnitResult) -> None:
        """Every stage ends a unit here: its future gets the result (the first one, if two paths race)."""
        with self._lock:
            if job.completed or job.future.done():
                return
            job.completed = True  # claimed under the lock: a racing path neither counts nor sets it again
            self._units[result.kind] += 1
            computed = sum(e.status is EntryStatus.COMPUTED for e in result.entries)
            if computed:
                self._computed.add(time.monotonic(), computed)
            if job.priority is Priority.ON_DEMAND:
                self._lookups[_lookup(job, result)] += 1
            for entry in result.entries:
                if entry.write:
                    self._other_context[entry.write] += 1
        with contextlib.suppress(InvalidStateError):  # callbacks run outside the lock
            job.future.set_result(result)

    def stats(self) -> dict[str, Any]:
        """Queue depths, work done, recent throughput, device memory and busy fraction."""
        now = time.monotonic()
        since = now - STATS_WINDOW_S
        span = max(min(STATS_WINDOW_S, now - self._started_at), 1e-3)
        with self._lock:
            units = {status.value: n for status, n in self._units.items()}
            lookups = dict(self._lookups)
            other_context = dict(self._other_context)
            joined = self._joined
            computed = self._computed.per_second(now)
        return {
            "state": self._state.value,
            "ready": self.ready,
            **self._scheduler.counts(),
            **self._device.stats(now, since, span),
            "writing": self._writer.writing,
            # Frames decoded, and frames a clip took from another clip's decode (overlapping histories).
            "frames_decoded": self._decode.frames.misses,
            "frames_reused": self._decode.frames.hits,
            # DINOv2 the same way: frames embedded, and frames a clip took from one embedded before.
            "patch_cache": _summed(dev.patches.stats() for dev in self._device.devices),
            "units": units,
            "coalesced": joined,  # submissions that joined identical work in flight instead of running it again
            "on_demand_lookups": lookups,
            "other_context": other_context,
            "history": {"interval_s": self._computed.interval_s, "computed_per_s": computed},
            "window_s": STATS_WINDOW_S,
            "max_batch_frames": self.max_batch_frames,
            # Each new clip length or batch shape compiles anew on the device thread (seconds to a minute for
            # VGGT-1B): graphs growing while serving explain a slow batch.
            "compile": compile_counts() if self.compiled else None,
        }


def _summed(counts: Iterable[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for c in counts:
        for key, value in c.items():
            total[key] = total.get(key, 0) + value
    return total
