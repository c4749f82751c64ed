"""The engine: VGGT resident on the device(s), turning units of work into cache entries.

A pipeline, each stage on its own threads so that the device never waits for disk:

    submit -> scheduler.admit (limits decided under its lock; on-demand before bulk)
           -> decode stage (skip-existing check, stat, decode + preprocess)      decode.py
           -> scheduler (dynamic batches of equal clip shape)                    scheduler.py
           -> device stage (one forward per batch, OOM -> split in halves)      device.py
           -> writer stage (write_entry, optional verify)                        writer.py
           -> Engine.complete -> the unit's Future -> every waiter's Future

Identical work runs once (single-flight, singleflight.py): a unit submitted while the same unit is
in flight (same frames and targets; the spec is the engine's) joins it when that flight serves it,
and every waiter gets the one result. Withdrawing or cancelling one waiter leaves the others theirs.

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
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, InvalidStateError
from enum import Enum
from typing import Any

import torch

from vggt_cache.client.cachefile import Outcome
from vggt_cache.client.spec import Attention, FeatureSpec
from vggt_cache.client.wire import EntryStatus
from vggt_cache.service.engine.decode import DecodeStage
from vggt_cache.service.engine.device import Device, DeviceStage, ForwardHook
from vggt_cache.service.engine.scheduler import Scheduler
from vggt_cache.service.engine.singleflight import SingleFlight
from vggt_cache.service.engine.stats import STATS_WINDOW_S, History
from vggt_cache.service.engine.warmup import WarmupReport, warm_up, warmup_shapes
from vggt_cache.service.engine.work import (
    KEPT,
    REPLACED,
    SHUTDOWN_MESSAGE,
    EngineStopped,
    Flight,
    Priority,
    QueueFull,
    StartHook,
    UnitResult,
    fail_future,
)
from vggt_cache.service.engine.writer import WriterStage
from vggt_cache.service.model import LoadedModel
from vggt_cache.service.model.resident import compile_blocks, compile_counts, make_resident, weights_dtype
from vggt_cache.service.samples import DEFAULT_MAX_HISTORY
from vggt_cache.service.settings import ServiceSettings
from vggt_cache.service.units import Unit

log = logging.getLogger("vggt_cache")

_DEFAULTS = ServiceSettings()  # the one place engine settings have their defaults


# What an on-demand unit found: the read outcome (client.cachefile.Outcome, the one vocabulary for what a read
# found; `FeatureCache.stats` names the same outcomes in its own keys), a forced recompute (skip_existing off),
# or a failure.
RECOMPUTED = "recomputed"
LOOKUPS = (*(o.value for o in Outcome), RECOMPUTED, EntryStatus.FAILED.value)


def _lookup(flight: Flight, result: UnitResult) -> str:
    if result.kind is EntryStatus.CACHED:
        return Outcome.HIT.value
    if result.kind is EntryStatus.FAILED:
        return EntryStatus.FAILED.value
    if flight.found is not None:
        return flight.found.value
    return Outcome.MISSING.value if flight.skip_existing else RECOMPUTED


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
    compile: `torch.compile` the transformer blocks (the first batches of each shape are slow: see
        `warm_up`); compile_backend: Dynamo's backend for it.
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
        bulk_queue_batches: int = _DEFAULTS.bulk_queue_batches,
        hint_queue_batches: int = _DEFAULTS.hint_queue_batches,
        frame_cache_frames: int = _DEFAULTS.frame_cache_frames,
        patch_cache_bytes: int = _DEFAULTS.patch_cache_mb << 20,
        fp32_weights: bool = _DEFAULTS.fp32_weights,
        compile: bool = _DEFAULTS.compile,
        compile_backend: str = _DEFAULTS.compile_backend,
        before_forward: ForwardHook | None = None,
        roots: Sequence[str] | None = None,
        max_image_bytes: int = _DEFAULTS.max_image_bytes,
        file_mode: int = _DEFAULTS.file_mode,
    ) -> None:
        if not devices:
            raise ValueError("give at least one device")
        for name, value in (
            ("max_batch_frames", max_batch_frames),
            ("decode_workers", decode_workers),
            ("write_workers", write_workers),
            ("bulk_queue_batches", bulk_queue_batches),
        ):
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
                compile_blocks(model, len(devices), compile_backend)
        replicas = [Device(name, model, patch_cache_bytes) for name, model in zip(devices, models, strict=True)]
        # Every device gets its own bulk batches queued; hints (lane-less) do not need more room per device.
        self._scheduler = Scheduler(
            max_batch_frames,
            max_wait_ms / 1000.0,
            bulk_queue_batches * max_batch_frames * len(replicas),
            hint_queue_batches * max_batch_frames,
        )
        # Clips share frames: a lane per device keeps one stretch of episodes with its patch cache.
        self.lanes = len(replicas) if spec.attention != Attention.FRAME and patch_cache_bytes > 0 else 1
        self._decode = DecodeStage(
            spec,
            self._scheduler,
            self._complete,
            decode_workers,
            frame_cache_frames * self.lanes,
            roots,
            max_image_bytes,
        )
        self._writer = WriterStage(
            spec,
            self._complete,
            write_workers,
            2 * max_batch_frames * len(replicas),
            loaded.config.patch_size,
            roots,
            file_mode,
        )
        self._device = DeviceStage(
            spec, self._scheduler, replicas, self._writer, self._complete, before_forward, self.lanes
        )
        self._lock = threading.Lock()  # the state and unit counts below
        self._state = EngineState.NEW
        self._decode_threads: list[threading.Thread] = []
        self._started_at = time.monotonic()
        self._units = dict.fromkeys(EntryStatus, 0)
        self._computed = History()  # entries computed per interval: the status page's chart
        self._lookups: dict[str, int] = dict.fromkeys(LOOKUPS, 0)
        # Entries of another clip's valid entry: kept (not written) or replaced (overwrite asked).
        self._other_context: dict[str, int] = dict.fromkeys((KEPT, REPLACED), 0)
        self._single = SingleFlight()
        self._warmup: WarmupReport | None = None

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
        log.info(
            "Engine started on %s: batches of up to %d frames, %s attention, %s weights",
            ", ".join(self.devices),
            self.max_batch_frames,
            self.spec.attention,
            self.weights_dtype_name,
        )

    def warm_up(
        self, budget_s: float, max_frames: int = DEFAULT_MAX_HISTORY + 1, stopping: Callable[[], bool] = lambda: False
    ) -> WarmupReport | None:
        """With `compile`, compile the batch shapes the spec implies (`warmup_shapes`, clips of up to
        `max_frames` frames) on every device, within `budget_s` seconds; None without `compile`."""
        if not self.compiled:
            return None
        shapes = warmup_shapes(self.spec, self.max_batch_frames, max_frames)
        log.info("Compile warm-up: %d shape(s) on %s, within %g s", len(shapes), ", ".join(self.devices), budget_s)
        self._warmup = warm_up(self._device, shapes, budget_s, stopping)
        return self._warmup

    def stop(self, timeout: float | None = None) -> bool:
        """Finish the batches in flight and their writes; fail queued futures. True if all threads ended."""
        with self._lock:
            was_running = self._state is EngineState.RUNNING
            self._state = EngineState.STOPPED
        if not was_running:
            return True
        dropped = self._scheduler.close()
        for flight in dropped:
            fail_future(flight.future, EngineStopped(SHUTDOWN_MESSAGE))
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
        return (
            self._state is EngineState.RUNNING
            and all(t.is_alive() for t in self._device.threads)
            and not self.lost_devices
        )

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
        if lanes is not None and (
            priority is not Priority.BULK
            or len(lanes) != len(units)
            or not all(0 <= lane < self.lanes for lane in lanes)
        ):
            # An on-demand group with a lane would hold back the other devices' bulk work while it forms.
            raise ValueError(
                f"give bulk units one lane each in 0..{self.lanes - 1}, got {list(lanes)[:8]} "
                f"for {len(units)} {priority.name.lower()} unit(s)"
            )
        for unit in units:
            self._check_unit(unit)
        boarded = self._single.board(
            units, priority, skip_existing, verify, return_features, overwrite, lanes, on_start
        )
        try:
            refused = self._scheduler.admit(boarded.new, priority, block=block, max_units=max_pending)
        except QueueFull:
            self._single.unboard(boarded)
            raise
        for flight in refused:
            fail_future(flight.future, EngineStopped(SHUTDOWN_MESSAGE))
        return boarded.waiters

    def withdraw(self, futures: Iterable[Future]) -> int:
        """Take back the units of `futures` still queued (not yet decoding or on a device); their futures
        fail with `Withdrawn`. A future whose unit others also wait for leaves it at once, whatever its
        stage; the unit goes on for them. Returns how many futures were taken back. Thread-safe."""
        return self._single.withdraw(futures, self._scheduler.withdraw)

    def pending(self, priority: Priority) -> int:
        """Units of `priority` submitted but not yet taken by a device (decoding or decoded)."""
        return self._scheduler.waiting(Priority(priority))

    def _check_unit(self, unit: Unit) -> None:
        """The unit must be the one its clip makes in the spec's attention mode (`Unit.for_clip` says which)."""
        if Unit.for_clip(self.spec.attention, unit.frames) != unit:
            mode = Attention(self.spec.attention).value
            raise ValueError(
                f"a {mode} clip of these {len(unit.frames)} frames has other targets than the unit's "
                f"{len(unit.targets)}"
            )

    # -- results and stats ----------------------------------------------------------------------
    def _complete(self, flight: Flight, result: UnitResult) -> None:
        """Every stage ends a unit here: its future gets the result (the first one, if two paths race)."""
        with self._lock:
            if flight.completed or flight.future.done():
                return
            flight.completed = True  # claimed under the lock: a racing path neither counts nor sets it again
            self._units[result.kind] += 1
            computed = sum(e.status is EntryStatus.COMPUTED for e in result.entries)
            if computed:
                self._computed.add(time.monotonic(), computed)
            if flight.priority is Priority.ON_DEMAND:
                self._lookups[_lookup(flight, result)] += 1
            for entry in result.entries:
                if entry.write:
                    self._other_context[entry.write] += 1
        with contextlib.suppress(InvalidStateError):  # callbacks run outside the lock
            flight.future.set_result(result)

    def stats(self) -> dict[str, Any]:
        """Queue depths, work done, recent throughput, device memory and busy fraction."""
        now = time.monotonic()
        since = now - STATS_WINDOW_S
        span = max(min(STATS_WINDOW_S, now - self._started_at), 1e-3)
        with self._lock:
            units = {status.value: n for status, n in self._units.items()}
            lookups = dict(self._lookups)
            other_context = dict(self._other_context)
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
            # Submissions that joined identical work in flight instead of running it again.
            "coalesced": self._single.joined,
            "on_demand_lookups": lookups,
            "other_context": other_context,
            "history": {"interval_s": self._computed.interval_s, "computed_per_s": computed},
            "window_s": STATS_WINDOW_S,
            "max_batch_frames": self.max_batch_frames,
            # Each new clip length or batch shape compiles anew on the device thread (seconds to a minute for
            # VGGT-1B): graphs growing while serving explain a slow batch.
            "compile": (
                {**compile_counts(), "warmup": self._warmup and self._warmup.as_dict()} if self.compiled else None
            ),
        }


def _summed(counts: Iterable[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for c in counts:
        for key, value in c.items():
            total[key] = total.get(key, 0) + value
    return total
