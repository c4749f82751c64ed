"""Fixtures shared by the tests: real vggt-cache services on 127.0.0.1 (helpers live in helpers/)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator

import httpx
import pytest

from vggt_cache.client.logs import LOGGER

from helpers.service import RunningService, start_service


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
    for service in started:  # all told at once, so they shut down side by side (one by one took ~35 s)
        if service.proc.poll() is None:
            service.proc.terminate()
    for service in started:
        service.stop()


@pytest.fixture(scope="module")
def http(server: RunningService) -> Iterator[httpx.Client]:
    """An httpx client of the test module's `server` fixture (each module starts its own service)."""
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    """The event loop of the async tests (`pytest.mark.anyio`): asyncio, the one uvicorn runs the app on."""
    return "asyncio"


@pytest.fixture(autouse=True)
def our_logger_as_found() -> Iterator[None]:
    """A test that runs the CLI in-process sets our logger up (a handler on that test's captured stderr, no
    propagation): put it back, or later tests' `caplog` sees nothing and logging writes to a closed stream."""
    log = logging.getLogger(LOGGER)
    handlers, propagate, level = log.handlers[:], log.propagate, log.level
    yield
    log.handlers[:] = handlers
    log.propagate, log.level = propagate, level
