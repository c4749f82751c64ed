"""The HTTP API: features, auth, limits, errors, metrics. The app runs in-process (`app_in_process`); the
body limits, read off the socket, against a real `vggt-cache serve` on 127.0.0.1."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import torch

from vggt_cache.client.cachefile import Outcome, read_entry
from vggt_cache.client.wire import decode_features
from vggt_cache.service.model import load_aggregator

from helpers.service import TINY_MODEL, apoll, app_in_process, poll, reference_features, spec_of_status, write_images

TOKEN = "s3cret-token"
pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("api-root")


@pytest.fixture(scope="module")
def server(service_server, root: Path):
    server = service_server(root)
    yield server
    server.stop()


@pytest.fixture(scope="module")
async def app(root: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[httpx.AsyncClient]:
    """The module's app in-process, frame attention, no token."""
    async with app_in_process(root, tmp_path_factory.mktemp("api-state")) as http:
        yield http


async def service_spec(http: httpx.AsyncClient):
    return spec_of_status((await http.get("/status")).raise_for_status().json())


@pytest.fixture(scope="module")
def model():
    return load_aggregator(TINY_MODEL).model


def features_of(response: httpx.Response) -> dict[str, tuple[dict, torch.Tensor | None]]:
    """Image -> (item, tensor) from a `/features` response."""
    assert response.status_code == 200, response.text
    items, tensors = decode_features(response.content)
    return {i["image"]: (i, tensors.get(i["tensor"])) for i in items}


def assert_same_entry(served: torch.Tensor, direct: torch.Tensor) -> None:
    assert served.shape == direct.shape and served.dtype == direct.dtype == torch.bfloat16
    # Both are float32 results rounded to bfloat16: at most one storage ulp apart.
    torch.testing.assert_close(served.float(), direct.float(), rtol=2**-7, atol=1e-5)


# -- features equal the model's own output, in every attention mode ------------------------------


async def test_frame_features_equal_the_models_output(app: httpx.AsyncClient, root: Path, model) -> None:
    http = app
    images = write_images(root / "parity-frame", ["a.png", "b.png"], size=(28, 42), seed=10)
    spec = await service_spec(http)
    served = features_of(await http.post("/features", json={"images": images}))

    for image in images:
        item, tensor = served[image]
        assert item["status"] == "computed" and item["grid"] == [4, 4]
        assert_same_entry(tensor, reference_features(model, [image], spec)[0])
        entry = read_entry(image, spec)
        assert entry.outcome is Outcome.HIT and torch.equal(entry.features, tensor)

    again = features_of(await http.post("/features", json={"images": images}))
    assert [item["status"] for item, _ in again.values()] == ["cached", "cached"]
    assert all(torch.equal(again[i][1], served[i][1]) for i in images)
    # In frame mode a clip asks for its current (last) frame alone.
    as_clip = features_of(await http.post("/features", json={"clips": [images]}))
    assert list(as_clip) == [images[-1]] and torch.equal(as_clip[images[-1]][1], served[images[-1]][1])


@pytest.mark.parametrize("attention", ["sequence", "causal"])
async def test_clip_features_equal_the_models_output(tmp_path_factory, model, attention: str) -> None:
    root = tmp_path_factory.mktemp(f"parity-{attention}")
    clip = write_images(root, ["t0.png", "t1.png", "t2.png"], seed=11)
    async with app_in_process(root, tmp_path_factory.mktemp("state"), spec={"attention": attention}) as http:
        spec = await service_spec(http)
        served = features_of(await http.post("/features", json={"clips": [clip]}))
    direct = reference_features(model, clip, spec)  # [3, P, C]

    targets = clip if attention == "sequence" else clip[-1:]
    assert sorted(served) == sorted(targets)
    for image in targets:
        item, tensor = served[image]
        assert item["status"] == "computed"
        assert_same_entry(tensor, direct[clip.index(image)])
        entry = read_entry(image, spec, context_frames=clip)
        assert entry.outcome is Outcome.HIT and torch.equal(entry.features, tensor)
        assert [f["path"] for f in entry.meta["context"]["frames"]] == ["t0.png", "t1.png", "t2.png"]
    if attention == "causal":
        assert not Path(clip[0] + ".vggt_cache.pt").exists()  # context frames get no entry of their own
    # The first frame's causal features do not depend on later frames; its bidirectional ones do.
    first_alone = reference_features(model, clip[:1], spec)[0]
    close = torch.allclose(direct[0].float(), first_alone.float(), rtol=2**-7, atol=1e-5)
    assert close == (attention == "causal")


async def test_prefetch_without_waiting_queues_the_work(app: httpx.AsyncClient, root: Path) -> None:
    images = write_images(root / "prefetch", ["p.png", "q.png"], seed=13)
    r = await app.post("/features", json={"images": images, "wait": False})
    assert r.status_code == 202 and r.json() == {"queued": 2}
    spec = await service_spec(app)
    poll(lambda: all(read_entry(p, spec).hit for p in images), 30, "the prefetched entries")


# -- concurrency ---------------------------------------------------------------------------------


async def test_concurrent_clients_get_consistent_features(app: httpx.AsyncClient, root: Path) -> None:
    images = write_images(root / "concurrent", [f"c{i}.png" for i in range(6)], seed=12)
    spec = await service_spec(app)

    async def client(i: int) -> dict:
        wanted = [images[(i + k) % len(images)] for k in range(3)]
        return features_of(await app.post("/features", json={"images": wanted}))

    results = await asyncio.gather(*(client(i) for i in range(8)))  # 8 requests in flight at once

    by_image: dict[str, list[torch.Tensor]] = {}
    for served in results:
        assert len(served) == 3
        for image, (item, tensor) in served.items():
            assert item["status"] in ("computed", "cached") and item["error"] is None
            by_image.setdefault(image, []).append(tensor)
    assert sorted(by_image) == sorted(images)
    for image, tensors in by_image.items():
        entry = read_entry(image, spec)
        assert entry.outcome is Outcome.HIT, entry.reason
        assert all(torch.equal(t, entry.features) for t in tensors)


# -- auth ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def secured(root: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[httpx.AsyncClient]:
    """The app with `TOKEN` required; requests carry no token unless a test gives one."""
    async with app_in_process(root, tmp_path_factory.mktemp("secured-state"), api_token=TOKEN) as http:
        yield http


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}], ids=["none", "wrong", "no-scheme"]
)
async def test_routes_need_the_token(secured: httpx.AsyncClient, root: Path, headers: dict) -> None:
    image = write_images(root / "auth", ["a.png"])[0]
    responses = [
        await secured.get("/status", headers=headers),
        await secured.post("/features", json={"images": [image]}, headers=headers),
        await secured.post("/precompute", json={"data_root": str(root / "auth")}, headers=headers),
        await secured.get("/jobs/0123", headers=headers),
        await secured.delete("/jobs/0123", headers=headers),
        await secured.get("/metrics", headers=headers),
    ]
    assert [r.status_code for r in responses] == [401] * len(responses)
    assert all(r.headers["www-authenticate"] == "Bearer" and r.json()["detail"] for r in responses)
    assert (await secured.get("/healthz", headers=headers)).status_code == 200
    assert (await secured.get("/readyz", headers=headers)).status_code == 200
    assert not Path(image + ".vggt_cache.pt").exists()


async def test_the_right_token_is_let_through(secured: httpx.AsyncClient, root: Path) -> None:
    image = write_images(root / "auth-ok", ["a.png"])[0]
    token = {"Authorization": f"Bearer {TOKEN}"}
    status = await secured.get("/status", headers=token)
    assert status.json()["service"]["auth"] is True and TOKEN not in status.text  # the settings shown, not it
    served = features_of(await secured.post("/features", json={"images": [image]}, headers=token))
    assert served[image][0]["status"] == "computed"
    assert (await secured.get("/jobs/0123", headers=token)).status_code == 404
    assert (await secured.get("/metrics", headers=token)).status_code == 200


# -- malformed and refused requests -------------------------------------------------------------


@pytest.mark.parametrize(
    "route, body",
    [
        ("/features", b"{not json"),
        ("/features", b'{"images": "/a.png"}'),
        ("/features", b'{"images": [1, 2]}'),
        ("/features", b'{"clips": ["/a.png"]}'),
        ("/features", b'{"images": ["/a.png"], "skip_existing": "maybe"}'),
        ("/features", b"{}"),
        ("/features", b'{"images": [], "clips": []}'),
        ("/features", b'{"clips": [[]]}'),
        ("/features", b'{"images": ["relative/a.png"]}'),
        ("/features", b"[]"),
        ("/precompute", b"{}"),
        ("/precompute", b'{"data_root": 5}'),
        ("/precompute", b'{"data_root": "relative/dir"}'),
        ("/precompute", b'{"data_root": ""}'),
    ],
    ids=lambda v: v if isinstance(v, str) else v.decode()[:30],
)
async def test_malformed_requests_are_422_with_a_message(app: httpx.AsyncClient, route: str, body: bytes) -> None:
    r = await app.post(route, content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]  # the documented shape, whichever check refused it
    assert isinstance(detail, list) and detail, r.text
    assert all(set(e) == {"loc", "msg", "type"} and e["msg"] and isinstance(e["loc"], list) for e in detail), r.text


async def test_paths_escaping_the_root_are_403(app: httpx.AsyncClient, root: Path, tmp_path_factory) -> None:
    outside = write_images(tmp_path_factory.mktemp("api-outside"), ["x.png"])[0]
    inside = write_images(root / "escape", ["a.png"])[0]
    (root / "escape" / "link.png").symlink_to(outside)
    dotdot = f"{root}/escape/../../{Path(outside).parent.name}/x.png"
    for body in (
        {"images": [dotdot]},
        {"images": [str(root / "escape" / "link.png")]},
        {"images": [inside], "clips": [[inside, outside]]},
        {"images": [outside]},
    ):
        r = await app.post("/features", json=body)
        assert r.status_code == 403, (body, r.text)
        assert "outside the allowed roots" in r.json()["detail"]
    r = await app.post("/precompute", json={"data_root": f"{root}/.."})
    assert r.status_code == 403 and r.json()["detail"]
    assert not Path(outside + ".vggt_cache.pt").exists() and not Path(inside + ".vggt_cache.pt").exists()


def test_a_body_over_the_limit_is_413(http: httpx.Client, root: Path) -> None:
    big = {"images": [f"{root}/{'x' * 200}_{i}.png" for i in range(25_000)]}  # ~5 MB of JSON
    r = http.post("/features", json=big)
    assert r.status_code == 413 and "larger than" in r.json()["detail"]


def test_a_chunked_body_is_read_up_to_the_limit(http: httpx.Client, root: Path) -> None:
    def chunks():
        yield b'{"images": ['
        for i in range(5_000):
            yield (f'"{root}/{"y" * 1000}_{i}.png", ').encode()
        yield b'"/z.png"]}'

    r = http.post("/features", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.request.headers.get("transfer-encoding") == "chunked" and "content-length" not in r.request.headers
    assert r.status_code == 413 and "larger than" in r.json()["detail"]

    image = write_images(root / "chunked", ["a.png"])[0]
    small = iter([b'{"images": [', f'"{image}"'.encode(), b"]}"])
    r = http.post("/features", content=small, headers={"Content-Type": "application/json"})
    assert features_of(r)[image][0]["status"] == "computed"


async def test_too_many_items_is_413(app: httpx.AsyncClient, root: Path) -> None:
    r = await app.post("/features", json={"images": [f"{root}/i{i}.png" for i in range(513)]})
    assert r.status_code == 413 and "limit is 512" in r.json()["detail"]
    r = await app.post("/features", json={"clips": [[f"{root}/i{i}.png" for i in range(300)]] * 2})
    assert r.status_code == 413


async def test_unknown_jobs_and_missing_data_roots_are_404(app: httpx.AsyncClient, root: Path) -> None:
    assert (await app.get("/jobs/no-such-job")).status_code == 404
    assert (await app.delete("/jobs/no-such-job")).status_code == 404
    (root / "a-file.txt").write_text("not a folder")
    for data_root in (root / "no-such-folder", root / "a-file.txt"):
        r = await app.post("/precompute", json={"data_root": str(data_root)})
        assert r.status_code == 404 and "not a folder" in r.json()["detail"]


async def test_a_missing_image_fails_alone(app: httpx.AsyncClient, root: Path) -> None:
    good = write_images(root / "missing", ["good.png"])[0]
    gone = str(root / "missing" / "gone.png")
    served = features_of(await app.post("/features", json={"images": [gone, good]}))
    assert served[good][0]["status"] == "computed" and served[good][1] is not None
    item, tensor = served[gone]
    assert item["status"] == "failed" and tensor is None and "gone.png" in item["error"]


# -- probes and metrics --------------------------------------------------------------------------


async def test_probes_status_and_metrics(app: httpx.AsyncClient) -> None:
    assert (await app.get("/healthz")).json()["status"] == "ok"
    assert (await app.get("/readyz")).json()["ready"] is True
    status = (await app.get("/status")).json()
    assert status["service"]["state"] == "ready" and status["spec"]["attention"] == "frame"
    assert status["spec"]["digest"] == (await service_spec(app)).digest
    r = await app.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert 'vggt_cache_http_requests_total{route="/status",status="200"}' in r.text
    assert "\nvggt_cache_ready 1.0\n" in r.text


async def test_a_full_on_demand_queue_is_429_with_retry_after(tmp_path_factory) -> None:
    root = tmp_path_factory.mktemp("queue")
    backlog = write_images(root, [f"b{i:03d}.png" for i in range(12)])
    extra = write_images(root, ["x.png", "y.png"], seed=1)
    device = threading.Event()  # held: the backlog stays queued until the test lets it run
    async with app_in_process(
        root,
        tmp_path_factory.mktemp("state"),
        max_pending_units=4,
        max_batch_frames=1,
        before_forward=lambda batch: device.wait(60),
    ) as http:
        settings = (await http.get("/status")).json()["service"]["settings"]  # the flags, as the service took them
        assert (settings["max_pending_units"], settings["max_batch_frames"]) == (4, 1)
        try:
            # An empty queue admits any request, however large: it fills the queue far past the limit.
            first = asyncio.create_task(http.post("/features", json={"images": backlog}))
            await apoll(lambda: queued(http), 60, "a backlog")
            refused = await http.post("/features", json={"images": extra})
        finally:
            device.set()
        assert (await first).status_code == 200
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "1" and "queue is full" in refused.json()["detail"]
        assert (await http.post("/features", json={"images": extra})).status_code == 200  # queue drained


async def test_a_job_asked_with_other_options_than_the_active_one_is_409(tmp_path_factory) -> None:
    root = tmp_path_factory.mktemp("active")
    write_images(root, ["a.png", "b.png"])
    device = threading.Event()  # held: the job stays running while it is asked for again
    state = tmp_path_factory.mktemp("state")
    async with app_in_process(root, state, before_forward=lambda batch: device.wait(60)) as http:
        try:
            first = (await http.post("/precompute", json={"data_root": str(root)})).json()
            same = await http.post("/precompute", json={"data_root": str(root), "skip_existing": True})
            other = await http.post("/precompute", json={"data_root": str(root), "overwrite": True, "verify": True})
        finally:
            device.set()
        assert same.status_code == 202 and same.json()["job_id"] == first["job_id"]  # asking again is idempotent
        assert other.status_code == 409, other.text
        detail = other.json()["detail"]
        assert f"job {first['job_id']}" in detail and "overwrite=False (asked True)" in detail
        assert "verify=False (asked True)" in detail and f"DELETE /jobs/{first['job_id']}" in detail


async def queued(http: httpx.AsyncClient) -> bool:
    return (await http.get("/status")).json()["engine"]["queued"]["on_demand"] > 4


async def test_a_model_that_cannot_load_fails_the_probes_with_the_reason(tmp_path) -> None:
    async with app_in_process(tmp_path, tmp_path / "state", model=str(tmp_path / "no-such-model"), ready=False) as http:

        async def failed_probe() -> httpx.Response | None:
            r = await http.get("/healthz")
            return r if r.status_code == 503 else None

        health = await apoll(failed_probe, 60, "/healthz to report the failed load")
        assert health.json()["status"] == "failed" and "no-such-model" in health.json()["error"]
        ready = await http.get("/readyz")
        assert ready.status_code == 503 and "no-such-model" in ready.json()["error"]
        refused = await http.post("/features", json={"images": [str(tmp_path / "x.png")]})
        assert refused.status_code == 503 and "failed to load" in refused.json()["detail"]
