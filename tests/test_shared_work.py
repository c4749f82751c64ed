"""Work one input can make unbounded, and identical work done once, against real services on 127.0.0.1 (issue 18).

Items 3 and 4: a sample's clip length is bounded in jobs, a unit that killed the service twice is
failed as poison, a cancel stops a job's work within a batch, SIGTERM exits within its grace;
identical units in flight run once and every waiter gets the result (single-flight).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from client.wire import decode_features
from service_helpers import RunningService, write_images

CLIENTS = 50


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("shared-work")


@pytest.fixture(scope="module")
def server(service_server, root: Path) -> RunningService:
    return service_server(root)


def engine_counts(http: httpx.Client) -> tuple[int, int]:
    """(frames run through the model, units computed) from /status."""
    engine = http.get("/status").raise_for_status().json()["engine"]
    return engine["frames"], engine["units"]["computed"]


# -- 4. identical work is coalesced -------------------------------------------------------------------


def test_fifty_clients_asking_for_one_uncached_image_cost_one_forward(server: RunningService, http: httpx.Client,
                                                                     root: Path) -> None:
    [image] = write_images(root / "fifty", ["0.png"], seed=40)
    frames0, computed0 = engine_counts(http)
    start = threading.Barrier(CLIENTS)

    def ask(_: int) -> list[dict]:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            start.wait(60)
            r = client.post("/features", json={"images": [image]})
            assert r.status_code == 200, r.text
            return decode_features(r.content)[0]

    with ThreadPoolExecutor(CLIENTS) as pool:
        answers = list(pool.map(ask, range(CLIENTS)))

    assert all(items[0]["status"] in ("computed", "cached") for items in answers)
    frames, computed = engine_counts(http)
    assert (frames - frames0, computed - computed0) == (1, 1)  # one forward, one entry written


def test_one_request_naming_an_image_512_times_costs_one_forward(http: httpx.Client, root: Path) -> None:
    [image] = write_images(root / "repeated", ["0.png"], seed=41)
    frames0, computed0 = engine_counts(http)

    r = http.post("/features", json={"images": [image] * 512})

    assert r.status_code == 200, r.text
    items, tensors = decode_features(r.content)
    assert [i["status"] for i in items] == ["computed"] * 512
    assert [i["request"] for i in items] == list(range(512))
    first = tensors[items[0]["tensor"]]
    assert all(tensors[i["tensor"]].equal(first) for i in items)
    frames, computed = engine_counts(http)
    assert (frames - frames0, computed - computed0) == (1, 1)
