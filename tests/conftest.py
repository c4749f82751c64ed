"""Shared fixtures: a real vggt-cache service on 127.0.0.1 running the tiny model on the CPU."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Callable, Iterator

import httpx
import pytest

from client.http import wait_until_ready
from service.demo import free_port

REPO = Path(__file__).resolve().parent.parent
TINY_MODEL = REPO / "tests" / "fixtures" / "vggt_tiny"
READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0


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
        pattern = re.compile(r'^vggt_cache_http_requests_total\{(.*)\} ([0-9.e+]+)$', re.M)
        return int(sum(float(value) for labels, value in pattern.findall(text) if f'route="{route}"' in labels))


def start_service(root: str | os.PathLike, *extra_args: str, ready_timeout: float = READY_TIMEOUT_S) -> RunningService:
    """Start `vggt-cache serve` on a free port with `root` allowed, and wait for /readyz."""
    root = os.fspath(root)
    for _ in range(3):  # the free port can be taken between probing and binding
        port = free_port()
        state_dir = tempfile.mkdtemp(prefix="vggt-cache-state-")
        log_path = os.path.join(state_dir, "service.log")
        log = open(log_path, "w")
        cmd = [sys.executable, "-m", "service.cli", "serve", "--model", str(TINY_MODEL), "--device", "cpu",
               "--host", "127.0.0.1", "--port", str(port), "--allowed-root", root,
               "--state-dir", state_dir, "--size", "56", *extra_args]
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        service = RunningService(f"http://127.0.0.1:{port}", proc, root, state_dir, log_path, log)
        if wait_until_ready(service.url, ready_timeout, is_alive=lambda: service.proc.poll() is None):
            return service
        text = service.log()
        service.stop()
        if "address already in use" not in text.lower():
            raise RuntimeError(f"vggt-cache serve did not become ready:\n{text[-3000:]}")
    raise RuntimeError("vggt-cache serve could not bind a free port")


@pytest.fixture(scope="session")
def service_server() -> Iterator[Callable[..., RunningService]]:
    """Factory: `service_server(root, *extra_args)` starts a service; all are stopped at session end.

    extra_args are appended to the command, so they override the defaults
    (`--size 56`) or add roots (`--allowed-root` is repeatable).
    """
    started: list[RunningService] = []

    def start(root: str | os.PathLike, *extra_args: str) -> RunningService:
        service = start_service(root, *extra_args)
        started.append(service)
        return service

    yield start
    for service in started:
        service.stop()
