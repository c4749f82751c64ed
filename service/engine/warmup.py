"""With `--compile`: compile the shapes the spec implies before the service reports ready.

A compiled block meets a new shape on the device thread and compiles there (tens of seconds for
VGGT-1B, its GPU idle, Dynamo's lock holding the others). The chunked block-causal loop is unrolled,
so each clip length is a graph of its own; the batch dimension is not: Dynamo specialises a batch of
1 and compiles the second size it meets dynamic, which then serves every batch of 2 or more. So the
warm-up forwards, on every device, batches of 1 and 2 clips of each clip length the spec's mode
forms (1 in frame mode; 1 to the default history + 1 in sequence/causal mode, which covers the
padded histories of bulk jobs and shorter on-demand clips), at the frame size the spec gives a 4:3
landscape image (every image in pad mode). A clip length or image shape outside that set still
compiles when first met, as before (logged, and counted in `/status`). The warm-up's batches go
through the device stage's forward, its `before_forward` hook included.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from vggt_cache.client.spec import Attention, FeatureSpec
from vggt_cache.client.text import error_text
from vggt_cache.service.engine.device import Device, DeviceStage, compiled_graphs, is_out_of_memory
from vggt_cache.service.engine.patches import PatchCache
from vggt_cache.service.model.resident import use_recompile_limit
from vggt_cache.service.preprocess import output_size

log = logging.getLogger("vggt_cache")

# (width, height) of the image whose frame size is warmed up in crop mode, where the frame's height
# follows the data's aspect ratio: 4:3, the frames of the Habitat episodes JanusVLN trains on.
WARMUP_IMAGE = (640, 480)
WARMUP_BATCHES = (1, 2)  # 1 is specialised; 2 makes the batch dimension dynamic for every larger batch


@dataclass(frozen=True)
class WarmupShape:
    batch: int
    frames: int
    height: int
    width: int

    def __str__(self) -> str:
        return f"{self.batch} clip(s) of {self.frames} frame(s) at {self.height}x{self.width}"


@dataclass(frozen=True)
class WarmupReport:
    """What a warm-up did, for the log and `/status`."""

    shapes: int  # shapes planned, per device
    done: int  # shapes forwarded, all devices together
    graphs: int  # graphs compiled meanwhile
    seconds: float
    finished: bool  # every shape on every device, within the budget

    def as_dict(self) -> dict[str, object]:
        return {
            "shapes": self.shapes,
            "done": self.done,
            "graphs": self.graphs,
            "seconds": self.seconds,
            "finished": self.finished,
        }


def warmup_shapes(spec: FeatureSpec, max_batch_frames: int, max_frames: int) -> list[WarmupShape]:
    """The batch shapes to compile at start: batches of 1 and 2 (within `max_batch_frames`) of each clip
    length up to `max_frames` (1 in frame mode), shortest first."""
    height, width = output_size(*WARMUP_IMAGE, spec.preprocess, spec.size, spec.align)
    lengths = [1] if spec.attention == Attention.FRAME else range(1, max_frames + 1)
    return [
        WarmupShape(batch, frames, height, width)
        for frames in lengths
        for batch in WARMUP_BATCHES
        if batch == 1 or batch * frames <= max_batch_frames
    ]


def warm_up(
    stage: DeviceStage, shapes: Sequence[WarmupShape], budget_s: float, stopping: Callable[[], bool] = lambda: False
) -> WarmupReport:
    """Forward random batches of `shapes` on every device of `stage` at once, until done, `budget_s`
    seconds have passed (checked before each shape) or `stopping()`; a shape that fails is logged and skipped."""
    started = time.monotonic()
    deadline = started + budget_s
    graphs = compiled_graphs()
    done = [0] * len(stage.devices)

    def run(i: int, dev: Device) -> None:
        use_recompile_limit()
        if dev.is_cuda:
            torch.cuda.set_device(dev.device)
        patches = PatchCache(0)  # the device's own cache keeps only real frames
        for shape in shapes:
            if stopping() or time.monotonic() >= deadline:
                return
            t0 = time.monotonic()
            try:
                _forward(stage, dev, shape, patches)
            except Exception as exc:  # e.g. out of memory for the larger batch: the service still starts
                log.warning(
                    "Warm-up on %s: %s failed (%s)",
                    dev.name,
                    shape,
                    "out of memory" if is_out_of_memory(exc) else error_text(exc),
                )
                if dev.is_cuda:
                    torch.cuda.empty_cache()
                continue
            done[i] += 1
            log.info("Warm-up on %s: %s in %.1f s", dev.name, shape, time.monotonic() - t0)

    threads = [
        threading.Thread(target=run, args=(i, dev), name=f"vggt-warmup-{dev.name}", daemon=True)
        for i, dev in enumerate(stage.devices)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    report = WarmupReport(
        len(shapes),
        sum(done),
        compiled_graphs() - graphs,
        round(time.monotonic() - started, 1),
        sum(done) == len(shapes) * len(stage.devices),
    )
    if report.finished:
        log.info(
            "Compile warm-up done: %d shape(s) on %d device(s), %d graph(s) compiled in %.1f s",
            report.shapes,
            len(stage.devices),
            report.graphs,
            report.seconds,
        )
    else:
        log.warning(
            "Compile warm-up stopped after %d of %d shape-device(s) in %.1f s (budget %g s, "
            "--compile-warmup): the rest compile when a batch first meets them",
            report.done,
            report.shapes * len(stage.devices),
            report.seconds,
            budget_s,
        )
    return report


def _forward(stage: DeviceStage, dev: Device, shape: WarmupShape, patches: PatchCache) -> None:
    images = torch.rand(shape.batch, shape.frames, 3, shape.height, shape.width, device=dev.device)
    keys = [[("<warm-up>", b, s) for s in range(shape.frames)] for b in range(shape.batch)]
    with torch.inference_mode():
        stage.forward(dev, images, keys, patches)
    if dev.is_cuda:
        torch.cuda.synchronize(dev.device)
