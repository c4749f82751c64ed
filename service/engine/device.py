"""The device stage: one worker per device, one forward per batch, an out-of-memory batch split in halves."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import torch

from client.spec import FeatureSpec
from service.engine.scheduler import Scheduler
from service.engine.stats import Window, process_rss
from service.engine.work import Complete, Job, describe, failed_result
from service.engine.writer import WriterStage
from service.model.features import entry_features

log = logging.getLogger("vggt_cache")

# [B, S, 3, H, W] batch on the device -> None; raising is handled like a failing forward.
ForwardHook = Callable[[torch.Tensor], None]


class Device:
    """One device with its resident replica of the model and its counters (under the stage's lock)."""

    def __init__(self, name: str, model: torch.nn.Module) -> None:
        self.name = name
        self.device = torch.device(name)
        self.model = model
        self.is_cuda = self.device.type == "cuda"
        self.batches = 0
        self.frames = 0
        self.busy = Window()
        self.busy_since: float | None = None  # start of the forward in flight

    def memory(self) -> dict[str, int]:
        if self.is_cuda:
            return {
                "allocated_bytes": torch.cuda.memory_allocated(self.device),
                "max_allocated_bytes": torch.cuda.max_memory_allocated(self.device),
            }
        return {"rss_bytes": process_rss()}


class DeviceStage:
    """A thread per device taking due batches from the scheduler; results go to the writer stage."""

    def __init__(self, spec: FeatureSpec, scheduler: Scheduler, devices: list[Device], writer: WriterStage,
                 complete: Complete, before_forward: ForwardHook | None) -> None:
        self.spec = spec
        self.devices = devices
        self._scheduler = scheduler
        self._writer = writer
        self._complete = complete
        self._before_forward = before_forward
        self.lock = threading.Lock()  # the counters below and each device's
        self.in_flight = 0
        self.oom_splits = 0
        self.throughput = Window()
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        self.threads = [threading.Thread(target=self._loop, args=(dev,), name=f"vggt-{dev.name}", daemon=True)
                        for dev in self.devices]
        for t in self.threads:
            t.start()

    def _loop(self, dev: Device) -> None:
        if dev.is_cuda:
            torch.cuda.set_device(dev.device)
        while (batch := self._scheduler.next_batch()) is not None:
            with self.lock:
                self.in_flight += len(batch)
            try:
                self._run_batch(dev, batch)
            except Exception as exc:  # a bug here must fail the batch, not kill the device worker
                log.exception("Batch on %s failed", dev.name)
                for job in batch:  # units already handed to a writer keep their result (the engine's complete)
                    self._complete(job, failed_result(job.unit, describe(exc)))
            finally:
                with self.lock:
                    self.in_flight -= len(batch)

    def _run_batch(self, dev: Device, batch: list[Job]) -> None:
        """Forward `batch`; on out-of-memory, retry each half; a single unit that still fails is failed."""
        parts = [batch]
        while parts:
            part = parts.pop()
            oom, error = False, None
            try:
                features = self._forward(dev, part)
            except Exception as exc:  # handled after the except block so its frames (activations) are freed
                oom, error = _is_oom(exc), describe(exc)
            if error is None:
                self._writer.store(part, features)
                continue
            if dev.is_cuda:
                torch.cuda.empty_cache()
            if oom and len(part) > 1:
                half = len(part) // 2
                with self.lock:
                    self.oom_splits += 1
                log.warning("Out of memory on %s with %d units (%d frames): retrying in halves", dev.name,
                            len(part), sum(j.n_frames for j in part))
                parts += [part[half:], part[:half]]  # first half runs first
                continue
            log.warning("Forward failed on %s for %d unit(s): %s", dev.name, len(part), error)
            for job in part:
                self._complete(job, failed_result(job.unit, error))

    def _forward(self, dev: Device, jobs: list[Job]) -> torch.Tensor:
        """CPU features of the targets' frames: [B, T, P, C] or [B, T, L, P, C] (T = S or 1)."""
        start = time.monotonic()
        with self.lock:
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
            with self.lock:
                dev.busy_since = None
                dev.busy.add(start, end, 0.0)
        frames = sum(j.n_frames for j in jobs)
        with self.lock:
            dev.batches += 1
            dev.frames += frames
            self.throughput.add(end, end, frames)
        return features

    def stats(self, now: float, since: float, span: float) -> dict:
        """Per device batches, frames, busy fraction and memory; throughput over the window."""
        with self.lock:
            devices = []
            for dev in self.devices:
                busy = dev.busy.overlap(since)
                if dev.busy_since is not None:
                    busy += now - max(dev.busy_since, since)
                devices.append({"device": dev.name, "batches": dev.batches, "frames": dev.frames,
                                "busy_fraction": round(min(busy / span, 1.0), 4), "memory": dev.memory()})
            return {
                "in_flight": self.in_flight,
                "batches": sum(d["batches"] for d in devices),
                "frames": sum(d["frames"] for d in devices),
                "oom_splits": self.oom_splits,
                "images_per_s": round(self.throughput.total(since) / span, 3),
                "busy_fraction": round(sum(d["busy_fraction"] for d in devices) / len(devices), 4),
                "devices": devices,
            }


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    # The CPU allocator reports exhaustion as a plain RuntimeError.
    return isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)
