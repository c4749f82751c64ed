"""The lookup behind `FeatureCache`: spec resolution, local reads, batching, answers and fallback, without I/O.

`CacheCore.lookup(clips)` is a generator: it yields each request it needs sent (`Call`) and
takes back the answer (an httpx.Response or a ServiceError); the blocking and the asyncio
cache drive it with their own client, so both behave alike by construction.

**Expected spec**: the `spec` argument; else the service's `/status` (fetched
once, retried at most every `STATUS_RETRY_S` while it fails); else the nearest
`vggt_cache_manifest.json` in the image's folder or above it up to `data_root` (without
one, the image's folder alone: a manifest planted in `/tmp` or a parent is never used); else, as a last
resort, the spec of the first valid entry read (with a warning). Whichever is
found first is kept for the rest of the process, so one run never mixes two
specs. An entry made with another spec is never returned.

**Fallback** for features that are neither cached nor obtained from the service:

    fallback    service answers   service fails          no service_url
    "service"   its features      raise CacheUnavailable None (+ one warning)
    "online"    its features      None                   None
    "error"     its features      raise CacheUnavailable raise CacheUnavailable

None tells the model to compute VGGT itself. "service", the default, treats a
cache without service as read-only (the seed's behaviour); "error" is for runs
that must never compute online (e.g. after a full precompute). A service fails
when it cannot be reached after every retry and fail-over, refuses the request
(401, 403, 413, ...), fails an item (undecodable image), or computes with a
different spec.

**Counters** (`stats`, per process: DataLoader workers count their own): each
distinct sample read is one of hits, misses (no file), stale, corrupt,
spec_mismatch or unreadable (a file this user may not read: permission denied);
fetched counts entries the service returned, fallbacks the Nones returned for
lack of a service answer, errors the samples a configured service failed;
prefetched / prefetch_errors count prefetch hints accepted / lost.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import torch

from vggt_cache.client.cachefile import Outcome, ReadResult, read_entry
from vggt_cache.client.http import ServiceError
from vggt_cache.client.manifest import MANIFEST_NAME, nearest_manifest
from vggt_cache.client.service import as_spec, features_payload, spec_of_status
from vggt_cache.client.spec import Attention, FeatureSpec
from vggt_cache.client.wire import decode_features

log = logging.getLogger("vggt_cache")

PathLike = str | os.PathLike
Clip = tuple[str, ...]
SpecLike = FeatureSpec | dict | None

FALLBACKS = ("service", "online", "error")
NO_SERVICE = "no service_url was given"
STATUS_RETRY_S = 10.0
# Read outcomes are counted in `Outcome`'s vocabulary (the service's /status uses its values as they are); the
# stats contract has always said "hits" and "misses" for HIT and MISSING: that renaming is made here alone.
_OUTCOME_STAT = {o: {Outcome.HIT: "hits", Outcome.MISSING: "misses"}.get(o, o.value) for o in Outcome}
STAT_KEYS = (*_OUTCOME_STAT.values(), "fetched", "fallbacks", "errors", "prefetched", "prefetch_errors")
START_HINT = (
    "Start the feature service on a GPU node: `vggt-cache serve --model facebook/VGGT-1B --device cuda "
    "--allowed-root <data root>` and pass FeatureCache(service_url='http://<host>:8600'); or precompute "
    "the data root with `vggt-cache precompute --data_root <data root> --skip_existing`; or pass "
    "fallback='online' to let the model compute missing features itself."
)


class CacheUnavailable(RuntimeError):
    """Features that are not cached and that the service could not (or was not there to) provide."""


# -- reading ------------------------------------------------------------------------------------

_warned: set[str] = set()


def _warn_once(key: str, message: str, *args: Any) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message, *args)


def nearest_manifest_spec(image_path: PathLike, data_root: PathLike | None) -> FeatureSpec | None:
    """The spec in the nearest `vggt_cache_manifest.json` at or above the image's folder, up to `data_root`."""
    try:
        found = nearest_manifest(image_path, data_root)
        return None if found is None else as_spec(found[1]["spec"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        _warn_once(f"manifest:{exc}", "Ignoring a manifest above %s: %s", image_path, exc)
        return None


def _read_clip(clip: Clip, spec: FeatureSpec | None, mmap: bool) -> ReadResult:
    context = None if spec is None else spec.context_of(clip)
    return read_entry(clip[-1], spec, context_frames=context, mmap=mmap)


def warn_unusable(result: ReadResult) -> None:
    if result.outcome in (Outcome.CORRUPT, Outcome.SPEC_MISMATCH, Outcome.UNREADABLE):
        _warn_once(result.path, "Failed to load cache %s: %s", result.path, result.reason)


def as_clip(item: PathLike | Sequence[PathLike]) -> Clip:
    if isinstance(item, (str, os.PathLike)):
        return (os.path.abspath(item),)
    if isinstance(item, bytes) or not isinstance(item, Sequence) or not item:
        raise ValueError(f"a clip is a non-empty sequence of image paths, got {item!r}")
    return tuple(os.path.abspath(p) for p in item)


def as_paths(paths: Sequence[PathLike]) -> list[Clip]:
    if isinstance(paths, (str, bytes, os.PathLike)):
        raise TypeError("get_many takes a list of paths; use get() for one path")
    return [(os.path.abspath(p),) for p in paths]


# -- the logic shared by the blocking and the asyncio cache -------------------------------------


@dataclass(frozen=True)
class Call:
    """A request the lookup needs sent; the driver sends back an httpx.Response or a ServiceError."""

    method: str
    path: str
    key: str | None = None
    json: Any = None
    retries: int | None = None


Answer = httpx.Response | ServiceError
Lookup = Generator[Call, Answer, list]


def step(work: Lookup, outcome: Answer | None = None) -> tuple[bool, Any]:
    """Advance a lookup: (False, next Call) or (True, its result)."""
    try:
        return False, next(work) if outcome is None else work.send(outcome)
    except StopIteration as done:
        return True, done.value


class CacheCore:
    """Everything but the sending: spec resolution, local reads, batching, answers, fallback."""

    def __init__(
        self,
        has_service: bool,
        spec: SpecLike,
        fallback: str,
        mmap: bool,
        max_request_frames: int,
        data_root: PathLike | None = None,
        no_service_reason: str = NO_SERVICE,
    ) -> None:
        if fallback not in FALLBACKS:
            raise ValueError(f"fallback must be one of {', '.join(FALLBACKS)}, got {fallback!r}")
        if max_request_frames < 1:
            raise ValueError(f"max_request_frames must be at least 1, got {max_request_frames}")
        self.has_service = has_service
        self.no_service_reason = no_service_reason
        self.spec = as_spec(spec)
        self.fallback = fallback
        self.mmap = mmap
        self.max_request_frames = max_request_frames
        self.data_root = data_root
        self.service_spec: FeatureSpec | None = None
        self.pinned: FeatureSpec | None = None
        self.stats = dict.fromkeys(STAT_KEYS, 0)
        self._status_error = "not asked yet"
        self._status_retry_at = 0.0
        self._warned: set[str] = set()  # one-time warnings of this cache

    def _warn_once(self, key: str, message: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message, *args)

    def expected_spec(self, image: str) -> FeatureSpec | None:
        if self.spec is None:
            # The first spec found is kept for the rest of the process: one run never mixes two specs.
            self.spec = self.service_spec or nearest_manifest_spec(image, self.data_root) or self.pinned
        return self.spec

    # The lookup of one call, as a generator of the requests it needs.
    def lookup(self, clips: list[Clip]) -> Lookup:
        if self.spec is None:
            yield from self._refresh_status()
        found: dict[Clip, torch.Tensor] = {}
        missing: list[Clip] = []
        for clip in dict.fromkeys(clips):
            features = self._read(clip)
            if features is None:
                missing.append(clip)
            else:
                found[clip] = features
        if missing:
            failures = yield from self._fetch(missing, found)
            self._settle(failures)
        return [found.get(clip) for clip in clips]

    def _refresh_status(self) -> Generator[Call, Answer, None]:
        if self.service_spec is not None or not self.has_service or time.monotonic() < self._status_retry_at:
            return
        outcome = yield Call("GET", "/status", retries=0)
        try:
            if isinstance(outcome, ServiceError):
                raise outcome
            self.service_spec = spec_of_status(outcome.json())
        except (ServiceError, ValueError, TypeError, AttributeError) as exc:
            self._status_error = f"cannot read the service's spec: {exc}"
            self._status_retry_at = time.monotonic() + STATUS_RETRY_S
            log.debug("%s", self._status_error)

    def _read(self, clip: Clip) -> torch.Tensor | None:
        spec = self.expected_spec(clip[-1])
        result = _read_clip(clip, spec, self.mmap)
        if spec is None and result.hit and result.meta is not None:
            self.pinned = pinned = as_spec(result.meta["spec"])
            self._warn_once(
                "pinned",
                "No expected VGGT feature spec (pass spec=, service_url= or keep %s in "
                "the data root): accepting entries made like the first one read, spec %s (%s attention)",
                MANIFEST_NAME,
                pinned.digest,
                pinned.attention,
            )
            return self._read(clip)
        self.stats[_OUTCOME_STAT[result.outcome]] += 1
        warn_unusable(result)
        return result.features

    def _fetch(self, missing: list[Clip], found: dict) -> Generator[Call, Answer, dict[Clip, str]]:
        """Ask the service for `missing`; fills `found`, returns the reasons of those it could not get."""
        if not self.has_service:
            return dict.fromkeys(missing, self.no_service_reason)
        groups: dict[FeatureSpec | None, list[Clip]] = {}
        for clip in missing:
            groups.setdefault(self.expected_spec(clip[-1]), []).append(clip)
        if None in groups:
            yield from self._refresh_status()
            for clip in groups.pop(None):
                groups.setdefault(self.service_spec, []).append(clip)
        failures = {clip: self._status_error for clip in groups.pop(None, [])}
        for spec, clips in groups.items():
            assert spec is not None  # popped above
            as_images = spec.attention == Attention.FRAME
            for chunk in self._chunks(clips, as_images):
                outcome = yield Call(
                    "POST", "/features", key=chunk[0][-1], json=features_payload(chunk, as_images, wait=True)
                )
                if isinstance(outcome, ServiceError):
                    failures.update(dict.fromkeys(chunk, str(outcome)))
                else:
                    failures.update(self._take(chunk, spec, outcome.content, found))
        return failures

    def _chunks(self, clips: list[Clip], as_images: bool) -> list[list[Clip]]:
        """Requests within the service's per-request frame limit (one request unless a call is huge)."""
        chunks: list[list[Clip]] = []
        frames = 0
        for clip in clips:
            n = 1 if as_images else len(clip)
            if not chunks or frames + n > self.max_request_frames:
                chunks.append([])
                frames = 0
            chunks[-1].append(clip)
            frames += n
        return chunks

    def _take(self, chunk: list[Clip], spec: FeatureSpec, body: bytes, found: dict) -> dict[Clip, str]:
        """Put the response's entries into `found`; returns the reasons for the clips it lacks."""
        try:
            items, tensors = decode_features(body, expected_digest=spec.digest)
        except ValueError as exc:
            # Perhaps the service restarted with another spec: ask its /status again next time.
            self.service_spec, self._status_retry_at = None, 0.0
            return dict.fromkeys(chunk, f"unusable response: {exc}")
        # Each item names the request entry it answers; a clip's own entry is that of its last frame.
        answers = {(item["request"], item["image"]): item for item in items}
        failures = {}
        for position, clip in enumerate(chunk):
            item = answers.get((position, os.path.normpath(clip[-1])))
            if item is None:
                failures[clip] = "the response has no entry for it"
            elif item["status"] == "failed":
                failures[clip] = item["error"]
            else:
                found[clip] = tensors[item["tensor"]]
                self.stats["fetched"] += 1
        return failures

    def _settle(self, failures: dict[Clip, str]) -> None:
        """Nones for `failures` where the fallback allows them; else CacheUnavailable."""
        if not failures:
            return
        n = len(failures)
        first_clip, first = next(iter(failures.items()))
        summary = f"{first_clip[-1]}: {first}" + (f" (and {n - 1} more)" if n > 1 else "")
        if self.has_service:
            self.stats["errors"] += n
        if self.fallback == "online" or (self.fallback == "service" and not self.has_service):
            self.stats["fallbacks"] += n
            if self.has_service:
                self._warn_once("failed", "The VGGT feature service failed; computing online instead: %s", summary)
            else:
                self._warn_once(
                    "no-service",
                    "VGGT features missing from the cache and %s: returning None so the "
                    "model computes them online (%s)",
                    self.no_service_reason,
                    summary,
                )
            return
        raise CacheUnavailable(
            f"{n} VGGT feature(s) are neither cached nor available from the service: {summary}\n{START_HINT}"
        )

    def prefetch_payloads(self, items: Sequence[PathLike | Sequence[PathLike]]) -> list[dict]:
        """The bulk-priority requests for a prefetch hint: single images as images, longer clips as clips."""
        if isinstance(items, (str, bytes, os.PathLike)):
            items = [items]
        clips = [as_clip(item) for item in items]
        singles: list[Clip] = [c for c in clips if len(c) == 1]
        longer = [c for c in clips if len(c) > 1]
        return [features_payload(chunk, True, wait=False) for chunk in self._chunks(singles, True)] + [
            features_payload(chunk, False, wait=False) for chunk in self._chunks(longer, False)
        ]
