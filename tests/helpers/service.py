"""Helpers shared by the tests: a real service to start, the app in-process, tiny images, polling with a deadline,
reference features."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from vggt_cache.client.http import wait_until_ready
from vggt_cache.client.service import spec_of_status
from vggt_cache.client.spec import DTYPES, FeatureSpec
from vggt_cache.service import demo
from vggt_cache.service.jobs.view import TERMINAL
from vggt_cache.service.preprocess import preprocess

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"
TINY_MODEL = FIXTURES / "vggt_tiny"
READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0
# Under pytest-xdist each worker takes its ports from a band of its own, below Linux's ephemeral range (32768+),
# so no other worker's service can take a port between one's probe of it and its service's bind.
PORT_BANDS = range(20_000, 32_768)


def free_port() -> int:
    """A loopback port free right now (for a service started next, or for nothing to listen on)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not worker.startswith("gw"):
        return demo.free_port()
    band = len(PORT_BANDS) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))  # however many workers
    low = PORT_BANDS.start + int(worker[2:]) * band
    for _ in range(200):
        port = random.randrange(low, low + band)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:  # one of this worker's services, or a socket still closing
                continue
            return port
    raise RuntimeError(f"no free port in {low}-{low + band - 1}")


@dataclass
class RunningService:
    """A `vggt-cache serve` subprocess; `stop()` sends SIGTERM, then kills after a timeout."""

    url: str
    proc: subprocess.Popen
    root: str
    state_dir: str
    log_path: str
    _log: IO = field(repr=False)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        shutil.rmtree(self.state_dir, ignore_errors=True)
        return self.proc.returncode

    def log(self) -> str:
        return Path(self.log_path).read_text(errors="replace")

    def requests(self, route: str) -> int:
        """Requests the service counted for `route` (all statuses), from its /metrics."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).raise_for_status().text
        pattern = re.compile(r"^vggt_cache_http_requests_total\{(.*)\} ([0-9.e+]+)$", re.M)
        return int(sum(float(value) for labels, value in pattern.findall(text) if f'route="{route}"' in labels))


def start_service(
    root: str | os.PathLike,
    *extra_args: str,
    ready_timeout: float = READY_TIMEOUT_S,
    preexec_fn: Callable[[], None] | None = None,
    prefix: Sequence[str] = (),
) -> RunningService:
    """Start `vggt-cache serve` on a free port with `root` allowed, and wait for /readyz.

    `preexec_fn` runs in the child before the service (e.g. to lower its resource limits); `prefix`: a
    command the service runs under (e.g. `setpriv` dropping capabilities)."""
    root = os.fspath(root)
    for _ in range(3):  # the free port can be taken between probing and binding
        port = free_port()
        state_dir = tempfile.mkdtemp(prefix="vggt-cache-state-")
        log_path = os.path.join(state_dir, "service.log")
        log = open(log_path, "w")  # noqa: SIM115 -- the service's log: RunningService.stop closes it
        cmd = [
            *prefix,
            sys.executable,
            "-m",
            "vggt_cache.service.cli",
            "serve",
            "--model",
            str(TINY_MODEL),
            "--device",
            "cpu",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--allowed-root",
            root,
            "--state-dir",
            state_dir,
            "--size",
            "56",
            *extra_args,
        ]
        proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            preexec_fn=preexec_fn,
        )
        service = RunningService(f"http://127.0.0.1:{port}", proc, root, state_dir, log_path, log)
        # B023 is wrong here: wait_until_ready calls the lambda before the loop moves on.
        if wait_until_ready(service.url, ready_timeout, is_alive=lambda: service.proc.poll() is None):  # noqa: B023
            return service
        text = service.log()
        service.stop()
        if "address already in use" not in text.lower():
            raise RuntimeError(f"vggt-cache serve did not become ready:\n{text[-3000:]}")
    raise RuntimeError("vggt-cache serve could not bind a free port")


T = TypeVar("T")
POLL_S = 0.02


def write_images(
    folder: str | os.PathLike, names: Sequence[str], size: tuple[int, int] = (56, 56), seed: int = 0
) -> list[str]:
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


def wait_job(
    http: httpx.Client, job_id: str, until: Callable[[dict], bool] | None = None, timeout: float = 60.0
) -> dict:
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
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)],
            capture_output=True,
            text=True,
            timeout=30,
        )
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


def reference_features(
    model: torch.nn.Module, frames: Sequence[str], spec: FeatureSpec, dtype: str | None = None
) -> torch.Tensor:
    """Every frame's entry for one clip, `[S, (L,) P, C]`, straight from the model's outputs.

    Its own token and layer slicing (not the service's `select_features`), in the spec's
    storage dtype or in `dtype` (float32 to compare against several storage dtypes).
    """
    clip = torch.stack([preprocess(p, spec.preprocess, spec.size, spec.align) for p in frames])  # [S, 3, H, W]
    with torch.inference_mode():
        outputs, start = model(clip[None], attention=spec.attention, layers=list(spec.layers))
    start = 0 if spec.tokens == "all" else start
    per_layer = [out[0, :, start:] for out in outputs]  # each [S, P, C]
    entries = per_layer[0] if len(per_layer) == 1 else torch.stack(per_layer, dim=1)  # [S, (L,) P, C]
    return entries.to(DTYPES[dtype or spec.dtype])


@contextlib.contextmanager
def service_in_process(
    root: Path,
    state_dir: Path,
    before_forward: Callable[[torch.Tensor], None],
    on_exit: Callable[[], None] = lambda: None,
) -> Iterator[str]:
    """A real uvicorn server on 127.0.0.1 in this process, whose forwards call `before_forward` (a test's hand
    on the device), ready when yielded; `on_exit` runs before the server is stopped (e.g. to release a held
    device)."""
    from vggt_cache.client.spec import resolve_options
    from vggt_cache.service.settings import ServiceSettings

    settings = ServiceSettings(
        model=str(TINY_MODEL),
        device="cpu",
        port=free_port(),
        allowed_roots=[str(root)],
        state_dir=str(state_dir),
        spec=resolve_options(None, size=56),
        max_batch_frames=1,
    )
    with server_in_process(settings, before_forward, on_exit) as (url, alive):
        assert wait_until_ready(url, READY_TIMEOUT_S, is_alive=alive)
        yield url


@contextlib.contextmanager
def server_in_process(
    settings: Any,
    before_forward: Callable[[torch.Tensor], None],
    on_exit: Callable[[], None] = lambda: None,
) -> Iterator[tuple[str, Callable[[], bool]]]:
    """uvicorn serving `settings` (a ServiceSettings, its port free) in this process, not waited for: its URL
    and whether its thread lives. `on_exit` runs before the server is stopped."""
    import threading

    import uvicorn

    from vggt_cache.service.api import create_app
    from vggt_cache.service.runtime import ServiceRuntime

    server = uvicorn.Server(
        uvicorn.Config(
            create_app(ServiceRuntime(settings, before_forward=before_forward)),
            host="127.0.0.1",
            port=settings.port,
            log_level="warning",
            lifespan="on",
        )
    )
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{settings.port}", thread.is_alive
    finally:
        on_exit()
        server.should_exit = True
        thread.join(60)
        assert not thread.is_alive(), "the in-process service did not stop"


@contextlib.asynccontextmanager
async def app_in_process(
    root: str | os.PathLike,
    state_dir: str | os.PathLike,
    *,
    preset: str | None = None,
    spec: dict[str, Any] | None = None,
    before_forward: Callable[[torch.Tensor], None] | None = None,
    ready: bool = True,
    **settings: Any,
) -> AsyncIterator[httpx.AsyncClient]:
    """The service's ASGI app in this process, its lifespan running, behind an `httpx.AsyncClient` over
    `httpx.ASGITransport`: no socket, no subprocess. For tests of what the API answers; the transport,
    signals and socket limits need a real server (`start_service`, `service_in_process`).

    `preset` and `spec` (FeatureSpec fields) as the spec flags give them, over `start_service`'s `--size 56`;
    `settings`: other `ServiceSettings` fields; `before_forward`: the engine's hook on the device;
    `ready=False` does not wait for the model (one that fails to load)."""
    from vggt_cache.client.spec import resolve_options
    from vggt_cache.service.api import create_app
    from vggt_cache.service.runtime import ServiceRuntime
    from vggt_cache.service.settings import ServiceSettings

    config = ServiceSettings(
        **{
            "model": str(TINY_MODEL),
            "device": "cpu",
            "allowed_roots": [os.fspath(root)],
            "state_dir": os.fspath(state_dir),
            "spec": resolve_options(preset, **{"size": 56, **(spec or {})}),
            **settings,
        }
    )
    app = create_app(ServiceRuntime(config, before_forward=before_forward))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", timeout=60) as http:
            deadline = time.monotonic() + READY_TIMEOUT_S
            while ready and (await http.get("/readyz")).status_code != 200:
                if time.monotonic() > deadline:
                    raise AssertionError(f"the in-process app was not ready after {READY_TIMEOUT_S}s")
                await asyncio.sleep(POLL_S)  # polling the model's load, with a deadline
            yield http


async def apoll(fn: Callable[[], Any], timeout: float, what: str) -> Any:
    """`poll` for a coroutine function: await `fn()` until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while not (value := await fn()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(POLL_S)  # polling with a deadline, not synchronising
    return value
