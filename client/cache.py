"""`FeatureCache`: VGGT features for a training dataloader, from sibling files or from the service.

    cache = FeatureCache("http://gpu-node:8600")
    feats = cache.get_many(paths)          # list of [P, C] (or [L, P, C]) tensors
    feats = cache.get_sample(clip)         # the clip's entry, in the spec's attention mode
    cache.prefetch(next_clips)             # hint: compute these at bulk priority, do not wait

A hit costs one stat of the image (and of each context frame) and one read of
`<image>.vggt_cache.pt`. Every miss of one call (missing, stale, corrupt, unreadable or
made with another spec) goes to the service in one `POST /features`, and the tensors
come back in the response, so nothing waits for NFS to show the new files.

**Attention mode** (the expected spec's): `frame`: the last frame's own entry;
`causal`: the last frame's entry computed with the clip as its context;
`sequence`: the last frame's entry computed with the whole clip. `get(path)`
is `get_sample([path])`: the image as a clip of one.

How the expected spec is found, what the fallback does and what the counters
count: `client/lookup.py`, which holds the logic both caches drive.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import os
import queue
import threading
from collections.abc import Callable, Sequence

import torch

from vggt_cache.client.cachefile import read_entry
from vggt_cache.client.http import ServiceError, reset_after_fork
from vggt_cache.client.lookup import (
    FALLBACKS,
    NO_SERVICE,
    Answer,
    CacheCore,
    CacheUnavailable,
    Call,
    Lookup,
    SpecLike,
    as_clip,
    as_paths,
    nearest_manifest_spec,
    step,
    warn_unusable,
)
from vggt_cache.client.service import AsyncServiceClient, ServiceClient, as_spec
from vggt_cache.client.spec import FeatureSpec

log = logging.getLogger("vggt_cache")

ENABLED_MESSAGE = "VGGT feature cache enabled (loading from image directories)"
PathLike = str | os.PathLike

__all__ = ["ENABLED_MESSAGE", "FALLBACKS", "AsyncFeatureCache", "CacheUnavailable", "FeatureCache", "read_cached"]


def read_cached(
    image_path: PathLike, spec: SpecLike = None, mmap: bool = False, data_root: PathLike | None = None
) -> torch.Tensor | None:
    """The seed's `_load_cached_vggt_features`, validated: the entry's features or None. No service.

    The expected spec is `spec`, else the nearest manifest's (at or above the image's folder, up
    to `data_root`; without it, the image's folder alone); with neither, any
    valid entry is returned. Context frames recorded in a `causal`/`sequence`
    entry are re-checked on disk.
    """
    expected = as_spec(spec) or nearest_manifest_spec(image_path, data_root)
    result = read_entry(image_path, expected, mmap=mmap)
    warn_unusable(result)
    return result.features


# -- the public caches ---------------------------------------------------------------------------


class _BaseFeatureCache(abc.ABC):
    """Arguments, counters and prefetch bookkeeping common to both caches.

    service_url: one URL, several (a stable hash of the first image picks one,
        the others take over on connection errors and 5xx), or None (read-only).
    spec: the expected FeatureSpec (or its dict); None: from the service or the manifest.
    fallback: "service" | "online" | "error" (see the module docstring).
    api_token: bearer token; default from $VGGT_CACHE_API_TOKEN.
    timeout: seconds to wait for an answer (a connect gives up after 5 s).
    retries: rounds over all URLs after the first, with jittered exponential
        backoff, honouring Retry-After on 429 and 503.
    mmap: map cache files instead of reading them. Off by default: a mapped file that another
        NFS client replaces can fault (SIGBUS) long after the read; one read is as fast (benchmarks/loader.py).
    max_request_frames: split larger calls into several requests (at most the service's limit; 64 entries
        of VGGT-1B are ~300 MB of response).
    data_root: the highest folder searched for a manifest when no spec is given or served (None: the
        image's own folder only); a manifest above it is never read.
    no_service_reason: why there is no service_url, named with each miss (e.g. the services given
        compute another spec and were left out).
    """

    def __init__(
        self,
        service_url: str | Sequence[str] | None = None,
        spec: SpecLike = None,
        fallback: str = "service",
        api_token: str | None = None,
        timeout: float = 120.0,
        retries: int = 3,
        mmap: bool = False,
        max_request_frames: int = 64,
        data_root: PathLike | None = None,
        no_service_reason: str = NO_SERVICE,
    ) -> None:
        self._client = self._client_class(service_url, api_token, timeout, retries)
        self._core = CacheCore(
            bool(self._client.urls), spec, fallback, mmap, max_request_frames, data_root, no_service_reason
        )
        self._start()
        log.info(ENABLED_MESSAGE)

    _client_class: type = ServiceClient

    @abc.abstractmethod
    def _start(self) -> None:
        """Per-class set-up after the transport and core exist (e.g. the prefetch worker)."""

    @property
    def stats(self) -> dict[str, int]:
        """A copy of this process's counters (see the module docstring)."""
        return dict(self._core.stats)

    @property
    def spec(self) -> FeatureSpec | None:
        """The spec given, else the service's once known (manifests may still supply one per image)."""
        return self._core.spec or self._core.service_spec

    @property
    def service_urls(self) -> tuple[str, ...]:
        return self._client.urls

    def _prefetch_sent(self, payload: dict) -> None:
        self._core.stats["prefetched"] += len(payload.get("images", ())) + len(payload.get("clips", ()))

    def _prefetch_failed(self, exc: BaseException) -> None:
        self._core.stats["prefetch_errors"] += 1
        log.debug("Prefetch failed: %s", exc)

    @staticmethod
    def _prefetch_call(payload: dict) -> Call:
        first = (payload.get("images") or [c[-1] for c in payload.get("clips", [])])[0]
        return Call("POST", "/features", key=first, json=payload, retries=0)


class FeatureCache(_BaseFeatureCache):
    """Blocking cache for DataLoader workers; safe across fork (each process builds its own pool).

    Arguments as in `_BaseFeatureCache`; picklable for spawned workers.
    """

    def _start(self) -> None:
        self._prefetcher = _Prefetcher(self._send_prefetch)

    def get(self, image_path: PathLike) -> torch.Tensor | None:
        return self.get_samples([(image_path,)])[0]

    def get_many(self, paths: Sequence[PathLike]) -> list[torch.Tensor | None]:
        return self._run(self._core.lookup(as_paths(paths)))

    def get_sample(self, paths: Sequence[PathLike]) -> torch.Tensor | None:
        """Features of the clip's last frame (the current one), in the spec's attention mode."""
        return self.get_samples([paths])[0]

    def get_samples(self, clips: Sequence[Sequence[PathLike]]) -> list[torch.Tensor | None]:
        """`get_sample` for several clips, their misses in one request."""
        return self._run(self._core.lookup([as_clip(c) for c in clips]))

    def prefetch(self, paths_or_clips: Sequence[PathLike | Sequence[PathLike]]) -> None:
        """Ask the service to compute these soon, at bulk priority; returns at once, never raises."""
        if not self._client.urls:
            return
        try:
            for payload in self._core.prefetch_payloads(paths_or_clips):
                self._prefetcher.put(payload)
        except Exception as exc:  # a hint must never break the training loop
            self._prefetch_failed(exc)

    def close(self) -> None:
        self._prefetcher.close()
        self._client.close()

    def __enter__(self) -> FeatureCache:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _run(self, work: Lookup) -> list:
        done, value = step(work)
        while not done:
            done, value = step(work, self._send(value))
        return value

    def _send(self, call: Call) -> Answer:
        try:
            return self._client.request(call.method, call.path, key=call.key, json=call.json, retries=call.retries)
        except ServiceError as exc:
            return exc

    def _send_prefetch(self, payload: dict) -> None:
        outcome = self._send(self._prefetch_call(payload))
        if isinstance(outcome, ServiceError):
            self._prefetch_failed(outcome)
        else:
            self._prefetch_sent(payload)


class AsyncFeatureCache(_BaseFeatureCache):
    """`FeatureCache` for asyncio code: the same arguments, awaitable lookups.

    Local file reads run in a worker thread so they never block the event loop.
    """

    _client_class = AsyncServiceClient

    def _start(self) -> None:
        self._tasks: set[asyncio.Task] = set()

    async def get(self, image_path: PathLike) -> torch.Tensor | None:
        return (await self.get_samples([(image_path,)]))[0]

    async def get_many(self, paths: Sequence[PathLike]) -> list[torch.Tensor | None]:
        return await self._run(self._core.lookup(as_paths(paths)))

    async def get_sample(self, paths: Sequence[PathLike]) -> torch.Tensor | None:
        return (await self.get_samples([paths]))[0]

    async def get_samples(self, clips: Sequence[Sequence[PathLike]]) -> list[torch.Tensor | None]:
        return await self._run(self._core.lookup([as_clip(c) for c in clips]))

    def prefetch(self, paths_or_clips: Sequence[PathLike | Sequence[PathLike]]) -> None:
        """Schedule bulk-priority requests on the running loop; returns at once, never raises."""
        if not self._client.urls:
            return
        try:
            loop = asyncio.get_running_loop()
            for payload in self._core.prefetch_payloads(paths_or_clips):
                task = loop.create_task(self._send_prefetch(payload))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        except Exception as exc:  # no running loop, bad paths: a hint must never raise
            self._prefetch_failed(exc)

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await self._client.aclose()

    async def __aenter__(self) -> AsyncFeatureCache:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def _run(self, work: Lookup) -> list:
        done, value = await asyncio.to_thread(step, work)
        while not done:
            done, value = await asyncio.to_thread(step, work, await self._send(value))
        return value

    async def _send(self, call: Call) -> Answer:
        try:
            return await self._client.request(
                call.method, call.path, key=call.key, json=call.json, retries=call.retries
            )
        except ServiceError as exc:
            return exc

    async def _send_prefetch(self, payload: dict) -> None:
        outcome = await self._send(self._prefetch_call(payload))
        if isinstance(outcome, ServiceError):
            self._prefetch_failed(outcome)
        else:
            self._prefetch_sent(payload)


class _Prefetcher:
    """A small background thread that posts prefetch payloads; a full queue drops hints.

    Built lazily per process: a forked child starts its own thread and queue.
    """

    def __init__(self, send: Callable[[dict], None], max_pending: int = 64) -> None:
        self._send = send
        self._max_pending = max_pending
        self._after_fork()
        reset_after_fork(self)

    def _after_fork(self) -> None:
        # A lock or queue inherited mid-use from the parent may never be released: start afresh.
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._pid: int | None = None
        self._lock = threading.Lock()

    def put(self, payload: dict) -> None:
        with self._lock:
            if self._pid != os.getpid() or self._thread is None or self._queue is None:
                self._queue = queue.Queue(self._max_pending)
                self._thread = threading.Thread(
                    target=self._loop, args=(self._queue,), name="vggt-cache-prefetch", daemon=True
                )
                self._thread.start()
                self._pid = os.getpid()
            q = self._queue
        try:
            q.put_nowait(payload)
        except queue.Full:
            raise ServiceError("prefetch queue is full; hint dropped") from None

    def _loop(self, q: queue.Queue) -> None:
        while (payload := q.get()) is not None:
            try:
                self._send(payload)
            except Exception as exc:  # the thread must survive anything one hint does
                log.debug("Prefetch failed: %s", exc)

    def close(self) -> None:
        with self._lock:
            if self._thread is not None and self._queue is not None and self._pid == os.getpid():
                with contextlib.suppress(queue.Full):  # a daemon thread; it ends with the process
                    self._queue.put_nowait(None)
            self._queue, self._thread, self._pid = None, None, None

    def __getstate__(self) -> dict:
        return {"_send": self._send, "_max_pending": self._max_pending}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._after_fork()
        reset_after_fork(self)
