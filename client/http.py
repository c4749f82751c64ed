"""Talking to one or more vggt-cache services: pooled connections, retries, fail-over, fork safety.

The retry plan (`Attempts`) is plain logic shared by the blocking `Transport`
and the asyncio `AsyncTransport`; they differ only in how they send and sleep.

A request visits every service URL in turn, starting at the one a stable hash
of its key picks (so one image goes to one service and finds its work there),
moving on at once after a connection error, a 429 or a 5xx. When a whole round
failed it waits (exponential backoff with jitter, or the longest `Retry-After`
it was given) and starts the next round, `retries` times. Other answers (401,
403, 413, 422, ...) are final and raise `ServiceError` with the service's
message; so does a read timeout, since retrying would queue the same work again.

Each process gets its own connection pool, built on first use: after a fork
(DataLoader workers) the child drops the parent's pool instead of sharing its
sockets, and a pickled transport (spawned workers) travels without one.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import email.utils
import hashlib
import os
import random
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import httpx

from vggt_cache.client.text import error_text

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
CONNECT_TIMEOUT_S = 5.0
DOWN_S = 30.0  # how long a URL that failed every try (unreachable or 5xx) is skipped
DEFAULT_TIMEOUT = object()  # a request's timeout: the transport's own

_after_fork_in_child: weakref.WeakSet = weakref.WeakSet()


def reset_after_fork(obj: Any) -> None:
    """Call `obj._after_fork()` in every child forked from now on (while obj lives)."""
    _after_fork_in_child.add(obj)


def _reset_all() -> None:
    for obj in list(_after_fork_in_child):
        obj._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_all)


class ServiceError(RuntimeError):
    """The service could not answer: unreachable after every retry, or a final error status."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 3  # rounds over all URLs after the first
    backoff_s: float = 0.25  # first wait; doubles each round
    max_backoff_s: float = 8.0
    max_retry_after_s: float = 60.0  # a Retry-After beyond this is cut to it

    def delay(self, round_index: int, retry_after: float | None) -> float:
        """Seconds to wait before round `round_index` (>= 1)."""
        if retry_after is not None:
            # At least what the service asked, spread a little so clients do not return in lockstep.
            return min(retry_after, self.max_retry_after_s) * random.uniform(1.0, 1.1)
        ceiling = min(self.max_backoff_s, self.backoff_s * 2 ** (round_index - 1))
        return random.uniform(ceiling / 2, ceiling)


def normalise_urls(service_url: str | Sequence[str] | None) -> tuple[str, ...]:
    if service_url is None:
        return ()
    urls = (service_url,) if isinstance(service_url, str) else tuple(service_url)
    for url in urls:
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"a service URL must start with http:// or https://, got {url!r}")
    return tuple(url.rstrip("/") for url in urls)


def ordered_urls(urls: Sequence[str], key: str | None) -> list[str]:
    """`urls` rotated to start at the one a stable hash of `key` picks (same in every process)."""
    urls = list(urls)
    if len(urls) < 2 or key is None:
        return urls
    start = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") % len(urls)
    return urls[start:] + urls[:start]


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a `Retry-After` header (delta-seconds or an HTTP date); None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    with contextlib.suppress(ValueError):
        return max(0.0, float(value))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def wait_until_ready(
    url: str, timeout: float, is_alive: Callable[[], bool] = lambda: True, interval: float = 0.1
) -> bool:
    """Poll `url`/readyz until it answers 200 (True), `timeout` passes or `is_alive()` turns False."""
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=5) as http:
        while time.monotonic() < deadline and is_alive():
            with contextlib.suppress(httpx.TransportError):
                if http.get(f"{url.rstrip('/')}/readyz").status_code == 200:
                    return True
            time.sleep(interval)  # polling a starting process, with a deadline
    return False


def error_detail(response: httpx.Response) -> str:
    """The service's message in words: FastAPI's `{"detail": ...}` (a 422's list of fields too) or the body's start."""
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    if isinstance(detail, list):
        return "; ".join(_field_error(item) for item in detail)
    return str(detail) if detail else response.text[:300]


def _field_error(item: Any) -> str:
    """`{"loc": ["body", "data_root"], "msg": "..."}` as `data_root: ...`; the request as a whole has no prefix."""
    if not isinstance(item, dict):
        return str(item)
    loc = [str(part) for part in item.get("loc") or () if part != "body"]
    return f"{'.'.join(loc)}: {item.get('msg')}" if loc else str(item.get("msg"))


@dataclass(frozen=True)
class Down:
    """A URL skipped until `until` (monotonic), for its last failure `reason`."""

    until: float
    reason: str


class Attempts:
    """The tries of one request, as `(url, seconds to wait first)`; report each outcome back.

    `answered` returns True for a 2xx, False for a retryable status, and raises
    ServiceError for a final one; `failed` takes a transport exception. When the
    iteration ends without an answer, raise `exhausted()`.
    """

    def __init__(
        self,
        urls: Sequence[str],
        key: str | None,
        policy: RetryPolicy,
        retries: int | None = None,
        down: dict[str, Down] | None = None,
        down_s: float = DOWN_S,
    ) -> None:
        if not urls:
            raise ServiceError("no service URL configured")
        # A URL that just failed every try is skipped for DOWN_S: a dataloader must not pay the
        # whole retry schedule (or a read timeout) again for every sample while a service is down.
        self._down = {} if down is None else down
        self._down_s = down_s
        now = time.monotonic()
        self._order = [u for u in ordered_urls(urls, key) if u not in self._down or self._down[u].until <= now]
        if not self._order:
            # The cause too: a caller may see this message first (its earlier call only marked the URLs down).
            causes = "; ".join(self._down[u].reason for u in ordered_urls(urls, key))
            raise ServiceError(
                f"every vggt-cache service failed within the last {down_s:g} s ({causes}); not retrying yet"
            )
        self._policy = policy
        self._rounds = 1 + (policy.retries if retries is None else retries)
        self._retry_after: float | None = None
        self._failures: list[str] = []
        self._last: dict[str, str] = {}  # URL -> its last failure, kept with it while it is skipped
        self._broken = False  # a transport error or 5xx (not just a full queue): worth skipping for a while

    def __iter__(self) -> Iterator[tuple[str, float]]:
        for round_index in range(self._rounds):
            wait = self._policy.delay(round_index, self._retry_after) if round_index else 0.0
            self._retry_after = None
            for url in self._order:
                yield url, wait
                wait = 0.0

    def answered(self, url: str, response: httpx.Response) -> bool:
        if response.is_success:
            self._down.pop(url, None)
            return True
        detail = error_detail(response)
        if response.status_code not in RETRY_STATUSES:
            raise ServiceError(f"{url} answered {response.status_code}: {detail}", response.status_code)
        self._broken = self._broken or response.status_code >= 500
        retry_after = parse_retry_after(response.headers.get("retry-after"))
        if retry_after is not None:
            self._retry_after = max(self._retry_after or 0.0, retry_after)
        self._failures.append(f"{url}: {response.status_code} {detail}")
        self._last[url] = self._failures[-1]
        return False

    def failed(self, url: str, exc: httpx.TransportError) -> None:
        if isinstance(exc, httpx.ReadTimeout):
            self._down[url] = Down(time.monotonic() + self._down_s, f"{url}: did not answer in time ({exc})")
            raise ServiceError(
                f"{url} did not answer in time ({exc}); raise the client timeout or ask for fewer features per call"
            ) from exc
        self._broken = True
        self._failures.append(f"{url}: {error_text(exc)}")
        self._last[url] = self._failures[-1]

    def exhausted(self) -> ServiceError:
        if self._broken:
            until = time.monotonic() + self._down_s
            self._down.update((url, Down(until, self._last.get(url, f"{url}: failed"))) for url in self._order)
        tries = len(self._failures)
        recent = "; ".join(self._failures[-len(self._order) :])
        return ServiceError(
            f"no vggt-cache service answered after {tries} {'try' if tries == 1 else 'tries'} ({recent})"
        )


class _BaseTransport(abc.ABC):
    """Settings and the per-process pool; subclasses send."""

    def __init__(
        self,
        service_url: str | Sequence[str] | None,
        api_token: str | None = None,
        timeout: float = 120.0,
        retries: int = 3,
        down_s: float = DOWN_S,
    ) -> None:
        """`down_s`: how long a URL that failed every try is skipped (0: never, for a tool following one job)."""
        self.urls = normalise_urls(service_url)
        self.down_s = down_s
        self.policy = RetryPolicy(retries=retries)
        self.timeout = httpx.Timeout(timeout, connect=min(timeout, CONNECT_TIMEOUT_S))
        self._headers = {"Authorization": f"Bearer {api_token}"} if api_token else {}
        self._pool: Any = None
        self._pool_pid: int | None = None
        self._down: dict[str, Down] = {}  # URL -> until when it is skipped, and why
        reset_after_fork(self)

    def _after_fork(self) -> None:
        # Drop, never close: closing would shut down sockets the parent still uses.
        self._pool, self._pool_pid = None, None

    @property
    def pool_pid(self) -> int | None:
        """The process whose pool this transport holds (None before first use)."""
        return self._pool_pid

    def _current_pool(self) -> Any:
        if self._pool is None or self._pool_pid != os.getpid():
            self._pool, self._pool_pid = self._new_pool(), os.getpid()
        return self._pool

    @abc.abstractmethod
    def _new_pool(self) -> Any:
        """A new httpx client (sync or async) for this process."""

    @staticmethod
    def _timeout(seconds: float | object | None) -> dict:
        if seconds is DEFAULT_TIMEOUT:
            return {}
        if seconds is None:  # wait as long as it takes (a dry run over a large root)
            return {"timeout": httpx.Timeout(None, connect=CONNECT_TIMEOUT_S)}
        seconds = cast(float, seconds)  # neither marker above
        return {"timeout": httpx.Timeout(seconds, connect=min(seconds, CONNECT_TIMEOUT_S))}

    def _attempts(self, key: str | None, retries: int | None) -> Attempts:
        return Attempts(self.urls, key, self.policy, retries, self._down, self.down_s)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pool": None, "_pool_pid": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        reset_after_fork(self)


class Transport(_BaseTransport):
    """Blocking requests over one `httpx.Client` per process."""

    def _new_pool(self) -> httpx.Client:
        return httpx.Client(timeout=self.timeout, headers=self._headers)

    def request(
        self,
        method: str,
        path: str,
        key: str | None = None,
        json: Any = None,
        retries: int | None = None,
        timeout: float | object | None = DEFAULT_TIMEOUT,
    ) -> httpx.Response:
        """Send to the URL `key` picks, failing over and retrying; returns the first 2xx response.

        `timeout` replaces the transport's for this request (None: no limit, for a long dry run)."""
        attempts = self._attempts(key, retries)
        for url, wait in attempts:
            if wait:
                time.sleep(wait)
            try:
                response = self._current_pool().request(method, url + path, json=json, **self._timeout(timeout))
            except httpx.TransportError as exc:
                attempts.failed(url, exc)
                continue
            if attempts.answered(url, response):
                return response
        raise attempts.exhausted()

    def close(self) -> None:
        if self._pool is not None and self._pool_pid == os.getpid():
            self._pool.close()
        self._pool, self._pool_pid = None, None


class AsyncTransport(_BaseTransport):
    """The same requests over one `httpx.AsyncClient` per process (use it from one event loop)."""

    def _new_pool(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(timeout=self.timeout, headers=self._headers)

    async def request(
        self,
        method: str,
        path: str,
        key: str | None = None,
        json: Any = None,
        retries: int | None = None,
        timeout: float | object | None = DEFAULT_TIMEOUT,
    ) -> httpx.Response:
        attempts = self._attempts(key, retries)
        for url, wait in attempts:
            if wait:
                await asyncio.sleep(wait)
            try:
                response = await self._current_pool().request(method, url + path, json=json, **self._timeout(timeout))
            except httpx.TransportError as exc:
                attempts.failed(url, exc)
                continue
            if attempts.answered(url, response):
                return response
        raise attempts.exhausted()

    async def aclose(self) -> None:
        if self._pool is not None and self._pool_pid == os.getpid():
            await self._pool.aclose()
        self._pool, self._pool_pid = None, None
