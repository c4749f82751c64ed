"""Frames go to the device as uint8 and are scaled there, bit for bit as `preprocess` (issue 23 item 6)."""

from __future__ import annotations

from concurrent.futures import Future

import pytest
import torch

from vggt_cache.service.engine.device import Device, DeviceStage
from vggt_cache.service.engine.work import Flight, Priority
from vggt_cache.service.model import load_aggregator
from vggt_cache.service.preprocess import preprocess, preprocess_pixels
from vggt_cache.service.units import Unit

from helpers.service import FIXTURES as TEST_FIXTURES
from helpers.service import TINY_MODEL

FIXTURES = TEST_FIXTURES / "vggt_tiny" / "preprocess"
IMAGES = [FIXTURES / "landscape.jpg", FIXTURES / "portrait.png"]


def flight(frames: torch.Tensor) -> Flight:
    return Flight(Unit.frame(str(IMAGES[0])), Priority.BULK, Future(), True, False, False, images=frames)


def clips(align: int) -> tuple[list[Flight], torch.Tensor]:
    """Two one-frame flights of the fixtures in pad mode (one size), and what `preprocess` makes of them."""
    flights = [flight(preprocess_pixels(p, mode="pad", size=56, align=align)[None]) for p in IMAGES]
    expected = torch.stack([preprocess(p, mode="pad", size=56, align=align)[None] for p in IMAGES])
    return flights, expected


def device(name: str) -> Device:
    return Device(name, load_aggregator(str(TINY_MODEL), device=name).model)


def test_uint8_frames_reach_the_cpu_device_as_preprocess_makes_them() -> None:
    flights, expected = clips(14)
    assert all(j.images.dtype == torch.uint8 for j in flights)
    images = DeviceStage._to_device(device("cpu"), flights)
    assert images.dtype == torch.float32 and torch.equal(images, expected)


def test_a_batch_mixing_uint8_and_float_frames_is_scaled_alike() -> None:
    flights, expected = clips(14)
    flights[1].images = preprocess(IMAGES[1], mode="pad", size=56)[None]  # a frame that came back float
    assert torch.equal(DeviceStage._to_device(device("cpu"), flights), expected)


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="the pinned staging, the upload stream and the lookup on the GPU need a CUDA device",
)
def test_uint8_frames_reach_a_gpu_as_preprocess_makes_them_on_the_cpu() -> None:
    flights, expected = clips(14)
    dev = device("cuda")
    images = DeviceStage._to_device(dev, flights)
    torch.cuda.current_stream().synchronize()
    assert images.device.type == "cuda" and torch.equal(images.cpu(), expected)
