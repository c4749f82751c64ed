"""Helpers shared by the tests that drive a real service: tiny images, job polling, the service's spec."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import httpx
import numpy as np
import pytest
from PIL import Image

from client.service import spec_of_status
from client.spec import FeatureSpec
from service.jobview import TERMINAL

T = TypeVar("T")
POLL_S = 0.02


def write_images(folder: str | os.PathLike, names: Sequence[str], size: tuple[int, int] = (56, 56),
                 seed: int = 0) -> list[str]:
    """Random RGB PNGs (width, height = `size`) under `folder`; returns their absolute paths."""
    rng = np.random.default_rng(seed)
    paths = []
    for name in names:
        path = Path(folder, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path)
        paths.append(str(path.resolve()))
    return paths


def poll(fn: Callable[[], T | None], timeout: float, what: str) -> T:
    """Call `fn` until it returns something truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(POLL_S)  # polling with a deadline, not synchronising


def job(http: httpx.Client, job_id: str) -> dict:
    return http.get(f"/jobs/{job_id}").raise_for_status().json()


def wait_job(http: httpx.Client, job_id: str, until: Callable[[dict], bool] | None = None,
             timeout: float = 60.0) -> dict:
    """Poll `/jobs/{id}` until `until(view)` (default: a terminal state); returns that view."""
    until = until or (lambda view: view["state"] in TERMINAL)

    def reached() -> dict | None:
        view = job(http, job_id)
        return view if until(view) else None

    return poll(reached, timeout, f"job {job_id} to reach the expected state")


def done(view: dict) -> int:
    return view["computed"] + view["skipped"] + view["failed"]


def service_spec(http: httpx.Client) -> FeatureSpec:
    """The FeatureSpec the service writes entries with, as `/status` reports it."""
    return spec_of_status(http.get("/status").raise_for_status().json())


@contextlib.contextmanager
def tmpfs(mount_point: Path, size: str) -> Iterator[Path]:
    """A small file system of its own at `mount_point` (skips the test where mounting is not allowed)."""
    mount_point.mkdir(parents=True)
    try:
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)],
                                capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot mount a small tmpfs ({exc}); needs root outside a sandbox")
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs: {result.stderr.strip()}; needs root outside a sandbox")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True, timeout=30)


def cache_files(folder: str | os.PathLike) -> list[Path]:
    return sorted(Path(folder).rglob("*.vggt_cache.pt"))


def temp_files(folder: str | os.PathLike) -> list[Path]:
    return sorted(p for p in Path(folder).rglob("*") if p.name.endswith(".tmp"))
