"""FeatureCache / AsyncFeatureCache against real files, a real vggt-cache service and real HTTP servers."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pickle
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from vggt_cache.client.cache import ENABLED_MESSAGE, AsyncFeatureCache, CacheUnavailable, FeatureCache, read_cached
from vggt_cache.client.cachefile import Outcome, cache_path, read_entry, source_record, write_entry
from vggt_cache.client.http import RetryPolicy, ordered_urls, parse_retry_after
from vggt_cache.client.manifest import MANIFEST_NAME
from vggt_cache.client.spec import FeatureSpec
from vggt_cache.client.wire import encode_features

from helpers.service import free_port, poll

GRID = (3, 4)  # 60x80 images at --size 56


def local_spec(**overrides) -> FeatureSpec:
    fields = dict(
        fingerprint="sha256:" + "ab" * 32,
        architecture={"depth": 2, "embed_dim": 8, "patch_size": 14},
        layers=(-1,),
        size=56,
        dtype="float32",
    )
    return FeatureSpec(**{**fields, **overrides})


def make_images(folder, n: int, seed: int = 0) -> list[str]:
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = os.path.join(folder, f"img_{i:04d}.png")
        Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def rewrite_image(path: str, seed: int) -> None:
    before = os.stat(path).st_mtime_ns
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(path)
    os.utime(path, ns=(before + 10**9, before + 10**9))  # coarse file-system clocks: make the change visible


def write_local(image: str, spec: FeatureSpec, seed: int = 0) -> torch.Tensor:
    features = torch.randn(GRID[0] * GRID[1], 16, generator=torch.Generator().manual_seed(seed))
    write_entry(image, features, spec, GRID, source_record(image))
    return features


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


def warnings_about(caplog, path: str) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.levelno == logging.WARNING and r.getMessage().startswith(f"Failed to load cache {path}")
    ]


# -- without a service ---------------------------------------------------------------------------


def test_hits_are_read_from_sibling_files_without_a_service(tmp_path):
    spec = local_spec()
    images = make_images(tmp_path / "scene", 3)
    expected = [write_local(p, spec, seed=i) for i, p in enumerate(images)]
    cache = FeatureCache(spec=spec)
    got = cache.get_many(images)
    assert all(torch.equal(g, e) for g, e in zip(got, expected, strict=True))
    assert torch.equal(cache.get(images[1]), expected[1])
    assert torch.equal(cache.get_sample(images), expected[2])  # frame mode: the last frame's own entry
    assert cache.stats["hits"] == 5 and cache.stats["misses"] == 0 and cache.stats["fetched"] == 0


def test_enabled_log_line_uses_the_seed_text(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="vggt_cache")
    FeatureCache(spec=local_spec())
    records = [r for r in caplog.records if r.name == "vggt_cache" and r.levelno == logging.INFO]
    assert [r.getMessage() for r in records] == [ENABLED_MESSAGE]
    line = logging.Formatter("[%(levelname)s] %(message)s").format(records[0])
    assert line == "[INFO] VGGT feature cache enabled (loading from image directories)"


def test_spec_comes_from_the_nearest_manifest_and_foreign_entries_are_refused(tmp_path, caplog):
    spec, other = local_spec(), local_spec(layers=(0,))
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({"manifest_version": 1, "spec": spec.to_dict()}))
    good, foreign = make_images(tmp_path / "a" / "b", 2)
    expected = write_local(good, spec)
    write_local(foreign, other)
    cache = FeatureCache(data_root=tmp_path)  # no spec, no service: the manifest two folders up decides
    assert torch.equal(cache.get(good), expected)
    assert cache.get(foreign) is None and cache.get(foreign) is None
    assert cache.stats["spec_mismatch"] == 2 and cache.stats["fallbacks"] == 2
    assert len(warnings_about(caplog, cache_path(foreign))) == 1  # once per path


def test_corrupt_file_is_a_miss_with_the_seed_warning_once(tmp_path, caplog):
    image = make_images(tmp_path, 1)[0]
    with open(cache_path(image), "wb") as f:
        f.write(b"not a torch file")
    cache = FeatureCache(spec=local_spec(), fallback="online")
    assert cache.get(image) is None and cache.get(image) is None
    assert cache.stats["corrupt"] == 2
    assert len(warnings_about(caplog, cache_path(image))) == 1


def test_without_any_spec_the_first_entry_read_pins_it(tmp_path):
    first, second = make_images(tmp_path, 2)
    expected = write_local(first, local_spec())
    write_local(second, local_spec(layers=(0,)))
    cache = FeatureCache()
    assert torch.equal(cache.get(first), expected)
    assert cache.get(second) is None  # never mixes specs
    assert cache.stats["spec_mismatch"] == 1


def test_no_service_default_returns_none_with_one_warning(tmp_path, caplog):
    images = make_images(tmp_path, 2)
    cache = FeatureCache(spec=local_spec())
    assert cache.get_many(images) == [None, None]
    assert cache.get(images[0]) is None
    assert cache.stats["fallbacks"] == 3 and cache.stats["errors"] == 0
    assert len([r for r in caplog.records if "no service_url was given" in r.getMessage()]) == 1


def test_fallback_error_without_service_says_how_to_start_it(tmp_path):
    image = make_images(tmp_path, 1)[0]
    with pytest.raises(CacheUnavailable, match=r"vggt-cache serve --model .* --allowed-root") as info:
        FeatureCache(spec=local_spec(), fallback="error").get(image)
    assert image in str(info.value)


def test_read_cached_serves_the_seed_usage(tmp_path):
    image = make_images(tmp_path, 1)[0]
    expected = write_local(image, local_spec())
    assert torch.equal(read_cached(image), expected)
    # The seed's exact call (torch >= 2.6 makes it weights_only=True).
    seed_read = torch.load(cache_path(image), map_location="cpu")  # seed compatibility; weights_only default
    assert torch.equal(seed_read["features"], expected)
    assert read_cached(image, spec=local_spec(layers=(0,))) is None
    rewrite_image(image, seed=9)
    assert read_cached(image) is None  # stale


def test_cache_pickles_for_spawned_workers(tmp_path):
    spec = local_spec()
    image = make_images(tmp_path, 1)[0]
    expected = write_local(image, spec)
    cache = FeatureCache(service_url=dead_url(), spec=spec)
    assert torch.equal(cache.get(image), expected)
    copy = pickle.loads(pickle.dumps(cache))
    assert torch.equal(copy.get(image), expected)
    assert copy.service_urls == cache.service_urls


def test_service_choice_is_stable_and_spreads():
    urls = ["http://a", "http://b", "http://c"]
    firsts = {ordered_urls(urls, f"/data/img_{i}.jpg")[0] for i in range(60)}
    assert firsts == set(urls)
    order = ordered_urls(urls, "/data/img_7.jpg")
    assert order == ordered_urls(list(urls), "/data/img_7.jpg") and sorted(order) == urls


def test_retry_after_parsing():
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 < parse_retry_after(date) <= 31


def test_retry_delays_double_up_to_a_cap_and_honour_retry_after(monkeypatch):
    policy = RetryPolicy(backoff_s=0.25, max_backoff_s=8.0, max_retry_after_s=60.0)
    for bound, pick in (("low", lambda a, b: a), ("high", lambda a, b: b)):
        monkeypatch.setattr("vggt_cache.client.http.random.uniform", pick)  # the jitter's two ends
        backoff = [policy.delay(round_index, None) for round_index in range(1, 8)]
        retry_after = [policy.delay(1, 0.0), policy.delay(3, 2.0), policy.delay(1, 3600.0)]
        if bound == "low":  # half the ceiling; Retry-After as asked, cut to max_retry_after_s
            assert backoff == [0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 4.0] and retry_after == [0.0, 2.0, 60.0]
        else:  # the ceiling; Retry-After at most 10 % later
            assert backoff == [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 8.0]
            assert retry_after == pytest.approx([0.0, 2.2, 66.0])


# -- retries against a small real HTTP server ------------------------------------------------------


class ScriptedService:
    """Answers POST /features with scripted error statuses, then with real wire bodies."""

    def __init__(self, spec: FeatureSpec, script: list[tuple[int, str | None]]) -> None:
        self.spec, self.script, self.posts = spec, list(script), []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                owner.posts.append((time.monotonic(), body))
                status, retry_after = owner.script.pop(0) if owner.script else (200, None)
                if status != 200:
                    payload = json.dumps({"detail": f"scripted {status}"}).encode()
                    self.send_response(status)
                    if retry_after is not None:
                        self.send_header("Retry-After", retry_after)
                    self.send_header("Content-Type", "application/json")
                else:
                    payload = owner.answer(body["images"])
                    self.send_response(200)
                    self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args) -> None:
                """Quiet: the tests read the recorded requests, not a log."""

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def answer(self, images: list[str]) -> bytes:
        items = [
            {"image": p, "status": "computed", "tensor": str(i), "error": None, "grid": list(GRID)}
            for i, p in enumerate(images)
        ]
        tensors = {str(i): self.features(p) for i, p in enumerate(images)}
        return encode_features(items, tensors, self.spec.digest, list(range(len(images))))

    @staticmethod
    def features(path: str) -> torch.Tensor:
        return torch.full((GRID[0] * GRID[1], 16), float(len(path)))

    def __enter__(self) -> ScriptedService:
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_retries_429_and_503_honouring_retry_after(tmp_path):
    spec = local_spec()
    image = make_images(tmp_path, 1)[0]
    with ScriptedService(spec, [(429, "0"), (503, "1")]) as service:
        cache = FeatureCache(service.url, spec=spec, retries=3)
        got = cache.get(image)
        assert torch.equal(got, ScriptedService.features(image))
        times = [t for t, _ in service.posts]
    assert len(times) == 3
    assert times[2] - times[1] >= 1.0  # waited as long as Retry-After asked
    assert cache.stats["fetched"] == 1 and cache.stats["errors"] == 0


def test_exhausted_retries_raise_or_fall_back(tmp_path):
    spec = local_spec()
    image = make_images(tmp_path, 1)[0]
    with ScriptedService(spec, [(503, "0")] * 6) as service:
        with pytest.raises(CacheUnavailable, match="scripted 503"):
            FeatureCache(service.url, spec=spec, retries=2).get(image)
        assert len(service.posts) == 3
        online = FeatureCache(service.url, spec=spec, retries=2, fallback="online")
        assert online.get(image) is None
        assert len(service.posts) == 6
    assert online.stats["fallbacks"] == 1 and online.stats["errors"] == 1


# -- against the real service (frame attention) ----------------------------------------------------


@pytest.fixture(scope="module")
def frame_service(service_server, tmp_path_factory):
    service = service_server(tmp_path_factory.mktemp("frame-root"), "--dtype", "float32")
    yield service
    service.stop()


@pytest.fixture
def folder(frame_service, request):
    return os.path.join(frame_service.root, request.node.name)


def test_misses_go_in_one_request_and_hits_need_none(frame_service, folder):
    images = make_images(folder, 6)
    cache = FeatureCache(frame_service.url)
    before = frame_service.requests("/features")
    got = cache.get_many(images)
    assert frame_service.requests("/features") == before + 1
    for image, tensor in zip(images, got, strict=True):
        entry = read_entry(image, cache.spec)
        assert entry.outcome is Outcome.HIT and torch.equal(entry.features, tensor)
    assert cache.stats["misses"] == 6 and cache.stats["fetched"] == 6
    again = cache.get_many(images)
    assert frame_service.requests("/features") == before + 1
    assert all(torch.equal(a, b) for a, b in zip(again, got, strict=True)) and cache.stats["hits"] == 6


def test_spec_comes_from_the_service_status(frame_service, folder):
    image = make_images(folder, 1)[0]
    cache = FeatureCache(frame_service.url)
    assert cache.get(image).dtype == torch.float32
    status = httpx.get(f"{frame_service.url}/status").raise_for_status().json()
    assert cache.spec.digest == status["spec"]["digest"]


def test_stale_entry_is_recomputed_after_the_image_changes(frame_service, folder):
    image = make_images(folder, 1)[0]
    cache = FeatureCache(frame_service.url)
    old = cache.get(image)
    rewrite_image(image, seed=7)
    new = cache.get(image)
    assert cache.stats["stale"] == 1 and cache.stats["fetched"] == 2
    assert not torch.equal(old, new)
    assert torch.equal(read_entry(image, cache.spec).features, new)


def test_foreign_spec_file_is_replaced_by_the_service(frame_service, folder, caplog):
    image = make_images(folder, 1)[0]
    write_local(image, local_spec())
    cache = FeatureCache(frame_service.url)
    got = cache.get(image)
    assert cache.stats["spec_mismatch"] == 1 and cache.stats["fetched"] == 1
    entry = read_entry(image, cache.spec)
    assert entry.outcome is Outcome.HIT and torch.equal(entry.features, got)
    assert len(warnings_about(caplog, cache_path(image))) == 1


def test_fails_over_from_a_dead_service(frame_service, folder):
    image = make_images(folder, 1)[0]
    dead = dead_url()
    urls = [dead, frame_service.url]
    if ordered_urls(urls, image)[0] != dead:
        urls.reverse()  # make the hash pick the dead one first
    cache = FeatureCache(urls, retries=0)
    assert ordered_urls(cache.service_urls, image)[0] == dead
    assert cache.get(image) is not None
    assert cache.stats["fetched"] == 1 and cache.stats["errors"] == 0


def test_service_down_per_fallback(frame_service, folder):
    image = make_images(folder, 1)[0]
    spec = httpx.get(f"{frame_service.url}/status").raise_for_status().json()["spec"]
    url = dead_url()
    online = FeatureCache(url, spec=spec, fallback="online", retries=1)
    assert online.get(image) is None
    assert online.stats["fallbacks"] == 1 and online.stats["errors"] == 1
    with pytest.raises(CacheUnavailable, match="no vggt-cache service answered"):
        FeatureCache(url, spec=spec, retries=0).get(image)
    with pytest.raises(CacheUnavailable, match=r"vggt-cache serve --model"):
        FeatureCache(url, spec=spec, fallback="error", retries=0).get(image)


def test_refusal_is_final_and_not_retried(frame_service, tmp_path):
    outside = make_images(tmp_path, 1)[0]  # not under the service's allowed root
    cache = FeatureCache(frame_service.url, retries=3)
    before = frame_service.requests("/features")
    with pytest.raises(CacheUnavailable, match=r"403.*outside the allowed roots"):
        cache.get(outside)
    assert frame_service.requests("/features") == before + 1


def test_prefetch_computes_in_the_background(frame_service, folder):
    images = make_images(folder, 4)
    cache = FeatureCache(frame_service.url)
    cache.prefetch([*images[:2], images[2:]])  # two images and a clip (its last frame in frame mode)
    wanted = images[:2] + images[3:]
    poll(lambda: all(os.path.exists(cache_path(p)) for p in wanted), 30, "prefetched entries")
    poll(lambda: cache.stats["prefetched"] == 3, 30, "both prefetch requests to be accepted")
    assert all(t is not None for t in cache.get_many(wanted)) and cache.stats["hits"] == 3
    broken = FeatureCache(dead_url(), retries=0)
    broken.prefetch(images)  # must not raise
    poll(lambda: broken.stats["prefetch_errors"] == 1, 30, "the failed prefetch to be counted")


def test_large_calls_are_split_at_the_request_limit(frame_service, folder):
    images = make_images(folder, 5)
    cache = FeatureCache(frame_service.url, max_request_frames=2)
    before = frame_service.requests("/features")
    assert all(t is not None for t in cache.get_many(images))
    assert frame_service.requests("/features") == before + 3


def test_api_token(service_server, tmp_path, monkeypatch):
    service = service_server(tmp_path, "--api-token", "s3cret")
    image = make_images(tmp_path / "scene", 1)[0]
    with pytest.raises(CacheUnavailable, match=r"401.*bearer token"):
        FeatureCache(service.url, spec=local_spec(), api_token="wrong").get(image)
    monkeypatch.setenv("VGGT_CACHE_API_TOKEN", "s3cret")
    cache = FeatureCache(service.url)
    assert cache.get(image) is not None and cache.stats["fetched"] == 1
    service.stop()


class CachedFrames(torch.utils.data.Dataset):
    def __init__(self, cache: FeatureCache, images: list[str]) -> None:
        self.cache, self.images = cache, images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        features = self.cache.get(self.images[i])
        return i, features, os.getpid(), self.cache._client._transport.pool_pid


def test_dataloader_workers_each_get_their_own_pool(frame_service, folder):
    images = make_images(folder, 8)
    cache = FeatureCache(frame_service.url)
    assert cache.get(images[0]) is not None  # the parent's pool now holds a connection
    loader = torch.utils.data.DataLoader(
        CachedFrames(cache, images), batch_size=None, num_workers=2, multiprocessing_context="fork"
    )
    rows = list(loader)
    assert sorted(i for i, *_ in rows) == list(range(8))
    worker_pids = {pid for _, _, pid, _ in rows}
    assert len(worker_pids) == 2 and os.getpid() not in worker_pids
    # Every miss went through a pool built in its own worker (image 0, a hit, needs none).
    assert all(pool_pid == pid for i, _, pid, pool_pid in rows if i > 0)
    for i, features, *_ in rows:
        assert torch.equal(features, read_entry(images[i], cache.spec).features)
    assert cache.get(images[-1]) is not None and cache._client._transport.pool_pid == os.getpid()


def test_async_cache_batches_misses_and_reads_hits(frame_service, folder):
    images = make_images(folder, 3)

    async def main():
        async with AsyncFeatureCache(frame_service.url) as cache:
            before = frame_service.requests("/features")
            fetched = await cache.get_many(images)
            after = frame_service.requests("/features")
            hit = await cache.get(images[0])
            sample = await cache.get_sample(images)
            return cache.stats, fetched, hit, sample, after - before

    stats, fetched, hit, sample, requests = asyncio.run(main())
    assert requests == 1
    assert stats["fetched"] == 3 and stats["hits"] == 2
    assert torch.equal(hit, fetched[0]) and torch.equal(sample, fetched[2])


# -- clips: causal and sequence attention -----------------------------------------------------------


@pytest.fixture(scope="module", params=["causal", "sequence"])
def clip_service(request, service_server, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"{request.param}-root")
    service = service_server(root, "--attention", request.param, "--dtype", "float32")
    yield request.param, service
    service.stop()


def test_get_sample_uses_the_clip_as_context(clip_service):
    attention, service = clip_service
    frames = make_images(os.path.join(service.root, "clip"), 6)
    first, second = frames[:3], frames[3:]
    cache = FeatureCache(service.url)
    before = service.requests("/features")
    got = cache.get_samples([first, second])
    assert service.requests("/features") == before + 1  # both clips in one request
    assert cache.spec.attention == attention
    for clip, tensor in zip((first, second), got, strict=True):
        entry = read_entry(clip[-1], cache.spec, context_frames=clip)
        assert entry.outcome is Outcome.HIT and torch.equal(entry.features, tensor)
        assert len(entry.meta["context"]["frames"]) == 3
    assert torch.equal(cache.get_sample(second), got[1]) and cache.stats["hits"] == 1
    # The same last frame with another history is another feature: its entry is stale for it.
    shorter = cache.get_sample(frames[4:])
    assert cache.stats["stale"] == 1 and not torch.equal(shorter, got[1])
    assert service.requests("/features") == before + 2
    # Computed and returned, never written over the valid entry of the other clip (issue 18).
    assert read_entry(frames[-1], cache.spec, context_frames=second).outcome is Outcome.HIT


def test_a_failing_service_is_skipped_for_a_while_instead_of_retried_per_sample(tmp_path):
    spec = local_spec()
    first, second = make_images(tmp_path, 2)
    with ScriptedService(spec, [(503, "0")] * 6) as service:
        cache = FeatureCache(service.url, spec=spec, retries=2, fallback="online")
        assert cache.get(first) is None
        assert len(service.posts) == 3
        assert cache.get(second) is None  # settled by the fallback at once: no request at all
        assert len(service.posts) == 3
    assert cache.stats["fallbacks"] == 2
