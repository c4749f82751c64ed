"""The device stage: one worker per device, one forward per batch, an out-of-memory batch split in halves."""

from __future__ import annotations

import contextlib
import logging
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from vggt_cache.client.spec import Attention, FeatureSpec
from vggt_cache.client.text import error_text
from vggt_cache.service.engine.patches import PatchCache
from vggt_cache.service.engine.scheduler import Scheduler
from vggt_cache.service.engine.stats import Window, process_rss
from vggt_cache.service.engine.work import Complete, Flight, FrameKey, StartHook, failed_result
from vggt_cache.service.engine.writer import WriterStage
from vggt_cache.service.model.aggregator import VGGTAggregator
from vggt_cache.service.model.features import entry_features
from vggt_cache.service.model.resident import use_recompile_limit
from vggt_cache.service.preprocess import UNIT_VALUES, as_float

log = logging.getLogger("vggt_cache")

# [B, S, 3, H, W] batch on the device -> None; raising is handled like a failing forward.
ForwardHook = Callable[[torch.Tensor], None]


class Device:
    """One device with its resident replica of the model and its counters (under the stage's lock)."""

    def __init__(self, name: str, model: VGGTAggregator, patch_cache_bytes: int = 0) -> None:
        self.name = name
        self.device = torch.device(name)
        self.model = model
        self.is_cuda = self.device.type == "cuda"
        self.patches = PatchCache(patch_cache_bytes)
        # Results leave the GPU on their own stream while the next batch computes; frames arrive on another
        # (on the first, they would wait behind the copy of the results, which waits for the forward).
        self.copy_stream = torch.cuda.Stream(self.device) if self.is_cuda else None
        self.upload_stream = torch.cuda.Stream(self.device) if self.is_cuda else None
        self.unit_values = UNIT_VALUES.to(self.device)  # uint8 pixels -> [0, 1], as the CPU scales them
        self.batches = 0
        self.frames = 0
        self.busy = Window()
        self.launched: deque[Launched] = deque()  # forwards whose results have not reached the host yet
        self.last_end = 0.0  # when the last result reached the host
        self.failed: str | None = None  # why the device was given up (a fatal CUDA error): it takes no more work

    @property
    def busy_since(self) -> float | None:
        """Start of the device's current stretch of work, if it has any."""
        return max(self.launched[0].started, self.last_end) if self.launched else None

    def memory(self) -> dict[str, int]:
        if self.is_cuda:
            # Reserved: what the caching allocator holds (what nvidia-smi shows); peaks since the start.
            return {
                "allocated_bytes": torch.cuda.memory_allocated(self.device),
                "max_allocated_bytes": torch.cuda.max_memory_allocated(self.device),
                "reserved_bytes": torch.cuda.memory_reserved(self.device),
                "max_reserved_bytes": torch.cuda.max_memory_reserved(self.device),
            }
        return {"rss_bytes": process_rss()}


@dataclass(eq=False)
class Launched:
    """A batch whose forward was issued: its results are on the host once `done` (None on the CPU) is."""

    flights: list[Flight]
    started: float
    features: torch.Tensor | None = None  # [B, T, (L,) P, C] on the host
    done: torch.cuda.Event | None = None


class DeviceStage:
    """A thread per device taking due batches from the scheduler; results go to the writer stage.

    On CUDA a second thread per device waits for each batch's results to reach the host and hands
    them on, so the device thread issues the next forward while the last one's copy is in flight.
    """

    def __init__(
        self,
        spec: FeatureSpec,
        scheduler: Scheduler,
        devices: list[Device],
        writer: WriterStage,
        complete: Complete,
        before_forward: ForwardHook | None,
        lanes: int = 1,
    ) -> None:
        self.spec = spec
        self.devices = devices
        self._scheduler = scheduler
        self._writer = writer
        self._complete = complete
        self._before_forward = before_forward
        self._share_patches = spec.attention != Attention.FRAME  # only clips share frames
        self._lanes = lanes
        self.lock = threading.Lock()  # the counters below and each device's
        self._in_flight: set[Flight] = set()  # taken from the scheduler, results not yet with the writer
        self.oom_splits = 0
        self.throughput = Window()
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        # Device i serves lane i (the scheduler's), when there are lanes.
        lanes = range(self._lanes) if self._lanes > 1 else [None] * len(self.devices)
        self.threads = [
            threading.Thread(target=self._loop, args=(dev, lane), name=f"vggt-{dev.name}", daemon=True)
            for dev, lane in zip(self.devices, lanes, strict=True)
        ]
        for t in self.threads:
            t.start()

    def _loop(self, dev: Device, lane: int | None) -> None:
        use_recompile_limit()
        finishing: queue.Queue[Launched | None] | None = None
        finisher = None
        if dev.is_cuda:
            torch.cuda.set_device(dev.device)
            # One batch's results may wait for the host while the next computes; a second waits here.
            finishing = queue.Queue(maxsize=1)
            finisher = threading.Thread(
                target=self._finish_loop, args=(dev, finishing), name=f"vggt-{dev.name}-results", daemon=True
            )
            finisher.start()
        try:
            while dev.failed is None and (batch := self._scheduler.next_batch(lane)) is not None:
                with self.lock:
                    self._in_flight.update(batch)
                if dev.failed is not None:  # lost while this thread waited for the batch
                    self._fail(batch, dev.failed)
                    break
                _on_device(batch, 1)
                handed: set[Flight] = set()  # launched: their results are on their way to the writers
                graphs, started = compiled_graphs(), time.monotonic()
                try:
                    for launched in self._run_batch(dev, batch):
                        handed.update(launched.flights)
                        if finishing is None:
                            self._finish(dev, launched)
                        else:
                            assert finisher is not None  # started with `finishing`, on CUDA
                            self._hand_to_finisher(finishing, finisher, launched)
                except Exception as exc:  # a bug here must fail the batch, not kill the device worker
                    log.exception("Batch on %s failed", dev.name)
                    self._fail([j for j in batch if j not in handed], error_text(exc))
                _on_device(batch, -1)  # its forward is over: a death from here on is not this batch's doing
                _log_compiles(dev, batch, compiled_graphs() - graphs, time.monotonic() - started)
        finally:
            if finishing is not None and finisher is not None:
                with contextlib.suppress(RuntimeError):  # a dead results thread needs no end marker
                    self._hand_to_finisher(finishing, finisher, None)
                finisher.join()

    def _run_batch(self, dev: Device, batch: list[Flight]) -> Iterator[Launched]:
        """Issue `batch`'s forward; on out-of-memory, retry each half; a single unit that still fails is failed."""
        parts = [batch]
        while parts:
            part = parts.pop()
            oom, lost, error = False, False, None
            try:
                launched = self._launch(dev, part)
            except Exception as exc:  # handled after the except block so its frames (activations) are freed
                oom, lost, error = is_out_of_memory(exc), is_device_lost(exc), error_text(exc)
            if error is None:
                yield launched
                continue
            if lost:
                self._lose(dev, error)
                self._fail([j for p in (part, *parts) for j in p], error)
                return
            if oom:
                dev.patches.clear()  # kept tokens must not cost the forward its memory
            if dev.is_cuda:
                torch.cuda.empty_cache()
            if oom and len(part) > 1:
                half = len(part) // 2
                with self.lock:
                    self.oom_splits += 1
                log.warning(
                    "Out of memory on %s with %d units (%d frames): retrying in halves",
                    dev.name,
                    len(part),
                    sum(j.n_frames for j in part),
                )
                parts += [part[half:], part[:half]]  # first half runs first
                continue
            log.warning("Forward failed on %s for %d unit(s): %s", dev.name, len(part), error)
            self._fail(part, error)

    def _launch(self, dev: Device, flights: list[Flight]) -> Launched:
        """Issue the forward of `flights` and the copy of its features to the host."""
        launched = Launched(flights, time.monotonic())
        with self.lock:
            dev.launched.append(launched)  # busy from now on, for the stats
        try:
            with torch.inference_mode():
                images = self._to_device(dev, flights)  # [B, S, 3, H, W]
                features = self.forward(dev, images, [j.frame_keys for j in flights], dev.patches)
                if dev.is_cuda:
                    assert dev.copy_stream is not None  # made for a CUDA device
                    features, launched.done = _copy_to_host(features, dev.copy_stream)
                launched.features = features
        except BaseException:
            with self.lock:
                dev.launched.remove(launched)
            raise
        return launched

    def forward(
        self, dev: Device, images: torch.Tensor, keys: list[list[FrameKey]], patches: PatchCache
    ) -> torch.Tensor:
        """The entries [B, T, (L,) P, C] (T = S or 1) of clips `images` [B, S, 3, H, W] on `dev` (frame (b, s)
        keyed `keys[b][s]` in `patches`), still on the device, in the storage dtype (halves the transfer)."""
        if self._before_forward is not None:
            self._before_forward(images)
        tokens = patches.patches(dev.model, images, keys) if self._share_patches else None  # [B, S, h*w, C]
        # causal: all clips of the batch in one block-causal forward, not frame by frame.
        return entry_features(dev.model, images, self.spec, tokens)

    @staticmethod
    def _to_device(dev: Device, flights: list[Flight]) -> torch.Tensor:
        """The batch's frames on the device as float32 in [0, 1]; sent as uint8 (a quarter of the bytes of
        float32) and scaled there, unless a frame was resized to its alignment (float already)."""
        frames = [_decoded(j) for j in flights]
        if len({f.dtype for f in frames}) > 1:
            frames = [as_float(f) for f in frames]
        if not dev.is_cuda:
            return _scaled(torch.stack(frames), dev.unit_values)
        # Through page-locked memory, so the copy runs asynchronously (the allocator keeps the buffer
        # until the copy is done), on the upload stream: it overlaps the forward still running.
        assert dev.upload_stream is not None  # made for a CUDA device
        staging = torch.empty((len(frames), *frames[0].shape), dtype=frames[0].dtype, pin_memory=True)
        torch.stack(frames, out=staging)
        compute = torch.cuda.current_stream(dev.device)
        with torch.cuda.stream(dev.upload_stream):
            pixels = staging.to(dev.device, non_blocking=True)
        compute.wait_stream(dev.upload_stream)
        pixels.record_stream(compute)  # its memory is not reused before the forward's stream has read it
        return _scaled(pixels, dev.unit_values)

    def _lose(self, dev: Device, error: str) -> None:
        """Give `dev` up after a fatal error: it takes no more batches; the others take its lane's work.

        Every later kernel on a device after e.g. an illegal memory access fails, so the device must not
        look ready. With no device left, queued work fails now rather than waiting for a device forever.
        """
        with self.lock:
            if dev.failed is not None:
                return
            dev.failed = f"device lost: {error}"
            alive = [d for d in self.devices if d.failed is None]
        log.error(
            "%s is lost and takes no more work (%s); %s",
            dev.name,
            error,
            f"{len(alive)} device(s) go on" if alive else "no device is left: restart the service",
        )
        if not alive:
            for flight in self._scheduler.close():
                self._fail([flight], dev.failed)

    @staticmethod
    def _hand_to_finisher(
        finishing: queue.Queue[Launched | None], finisher: threading.Thread, launched: Launched | None
    ) -> None:
        while True:
            try:
                finishing.put(launched, timeout=1.0)
                return
            except queue.Full:
                if not finisher.is_alive():  # never block on a thread that is gone
                    raise RuntimeError("the results thread of this device died") from None

    def _finish_loop(self, dev: Device, finishing: queue.Queue[Launched | None]) -> None:
        torch.cuda.set_device(dev.device)
        while (launched := finishing.get()) is not None:
            try:
                assert launched.done is not None  # set on CUDA
                launched.done.synchronize()  # an asynchronous CUDA error surfaces here
            except Exception as exc:
                log.exception("Batch on %s failed", dev.name)
                with self.lock:
                    dev.launched.remove(launched)
                if is_device_lost(exc):
                    self._lose(dev, error_text(exc))
                self._fail(launched.flights, error_text(exc))
                continue
            try:
                self._finish(dev, launched)
            except Exception as exc:  # a bug here must fail the batch, not the thread the device waits on
                log.exception("Results on %s could not be handed on", dev.name)
                self._fail(launched.flights, error_text(exc))

    def _finish(self, dev: Device, launched: Launched) -> None:
        """The batch's results are on the host: count them, hand them to the writers."""
        end = time.monotonic()
        frames = sum(j.n_frames for j in launched.flights)
        with self.lock:
            dev.launched.remove(launched)
            dev.busy.add(max(launched.started, dev.last_end), end, 0.0)
            dev.last_end = end
            dev.batches += 1
            dev.frames += frames
            self.throughput.add(end, end, frames)
        try:
            assert launched.features is not None  # set by `_launch` before the batch was handed on
            self._writer.store(launched.flights, launched.features)
        except Exception as exc:  # e.g. the writer pool shut down by an unclean stop
            log.exception("Results on %s could not be stored", dev.name)
            self._fail(launched.flights, error_text(exc))
        finally:
            with self.lock:
                self._in_flight.difference_update(launched.flights)

    def _fail(self, flights: list[Flight], message: str) -> None:
        for flight in flights:
            self._complete(flight, failed_result(flight.unit, message))
        with self.lock:
            self._in_flight.difference_update(flights)

    def stats(self, now: float, since: float, span: float) -> dict:
        """Per device batches, frames, busy fraction and memory; throughput over the window."""
        with self.lock:
            devices: list[dict[str, Any]] = []
            for dev in self.devices:
                busy = dev.busy.overlap(since)
                if dev.busy_since is not None:
                    busy += now - max(dev.busy_since, since)
                devices.append(
                    {
                        "device": dev.name,
                        "batches": dev.batches,
                        "frames": dev.frames,
                        "busy_fraction": round(min(busy / span, 1.0), 4),
                        "failed": dev.failed,
                        "memory": {} if dev.failed else dev.memory(),
                    }
                )
            return {
                "in_flight": len(self._in_flight),
                "batches": sum(d["batches"] for d in devices),
                "frames": sum(d["frames"] for d in devices),
                "oom_splits": self.oom_splits,
                "images_per_s": round(self.throughput.total(since) / span, 3),
                "busy_fraction": round(sum(d["busy_fraction"] for d in devices) / len(devices), 4),
                "devices": devices,
            }


def _decoded(flight: Flight) -> torch.Tensor:
    """The flight's frames [S, 3, H, W]."""
    assert flight.images is not None  # decoded before the scheduler made it runnable
    return flight.images


def _scaled(pixels: torch.Tensor, unit_values: torch.Tensor) -> torch.Tensor:
    """uint8 `pixels` as float32 in [0, 1], by lookup (bit for bit `preprocess`'s on any device); float as is."""
    return pixels if pixels.is_floating_point() else unit_values[pixels.int()]


def _on_device(batch: list[Flight], step: int) -> None:
    """Tell each start hook which of its units go on the device (`step` 1) or are off it (-1), once per batch."""
    units: dict[StartHook, list] = {}
    for flight in batch:
        for hook in flight.on_start:
            units.setdefault(hook, []).append(flight.unit)
    for hook, started in units.items():
        try:
            hook(started, step)
        except Exception:  # e.g. a failing state dir: the units still run
            log.exception("Cannot record that %d unit(s) went on or off a device", len(started))


# Allocation failures that are not torch.cuda.OutOfMemoryError: cuBLAS/cuDNN/cuFFT workspaces, a kernel
# launch's "CUDA error: out of memory", the CPU allocator's "can't allocate memory".
_OOM_WORDS = ("out of memory", "alloc_failed", "can't allocate memory")
# CUDA errors after which the context is unusable: every later kernel on the device fails too.
_LOST_WORDS = (
    "illegal memory access",
    "device-side assert",
    "unspecified launch failure",
    "misaligned address",
    "illegal instruction",
    "uncorrectable ecc",
    "cuda error: unknown error",
    "device has fallen off",
)


def is_out_of_memory(exc: BaseException) -> bool:
    """True for an allocation failure, whatever library raised it: the batch may fit in halves."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(w in str(exc).lower() for w in _OOM_WORDS)


def is_device_lost(exc: BaseException) -> bool:
    """True for a fatal (sticky) CUDA error: the device computes nothing more until the process restarts."""
    return isinstance(exc, RuntimeError) and any(w in str(exc).lower() for w in _LOST_WORDS)


def compiled_graphs() -> int:
    """Graphs Dynamo compiled so far in this process (0 before anything was compiled: Dynamo not imported)."""
    utils = sys.modules.get("torch._dynamo.utils")
    return utils.counters["stats"]["unique_graphs"] if utils is not None else 0


def _log_compiles(dev: Device, batch: list[Flight], new: int, seconds: float) -> None:
    # A compile runs on the device thread and holds the device (tens of seconds for VGGT-1B): say which
    # shape caused it, so a slow batch in the log is explained and the shapes to warm up are known.
    if new > 0:
        log.warning(
            "%s compiled %d new graph(s) for a batch of %d unit(s) of %d frame(s) in %.1f s",
            dev.name,
            new,
            len(batch),
            batch[0].n_frames,
            seconds,
        )


def _copy_to_host(features: torch.Tensor, stream: torch.cuda.Stream) -> tuple[torch.Tensor, torch.cuda.Event]:
    """Copy device `features` into page-locked host memory on `stream`, after the forward that made them."""
    stream.wait_stream(torch.cuda.current_stream(features.device))
    with torch.cuda.stream(stream):
        host = torch.empty(features.shape, dtype=features.dtype, pin_memory=True)
        host.copy_(features, non_blocking=True)
        done = torch.cuda.Event(blocking=True)  # the waiting thread sleeps instead of spinning a core
        done.record(stream)
    features.record_stream(stream)  # not reused by the forward stream before the copy has read it
    return host, done
