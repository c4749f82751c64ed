"""Long runs of the fault scenarios of test_faults.py: many kills, bigger data roots, many abandoned clients.

VGGT_SOAK=1 pytest tests/soak -q        # minutes; VGGT_FAULT_SEED=N replays a run's random points
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

if os.environ.get("VGGT_SOAK") != "1":
    pytest.skip("soak tests take minutes: set VGGT_SOAK=1 to run them", allow_module_level=True)

import httpx
from test_faults import SEED, abandon_request, assert_all_valid, engine_idle, kill_and_resume, two_services_with_readers

from vggt_cache.client.cachefile import Outcome

from helpers.service import service_spec, temp_files, write_images

IMAGES = 1000


def test_a_large_job_survives_ten_sigkills(service_server, tmp_path: Path) -> None:
    rng = random.Random(SEED)
    data_root = tmp_path / "data"
    images = write_images(data_root, [f"f{i:04d}/{i:05d}.png" for i in range(IMAGES)], seed=SEED % 1000)

    view, service = kill_and_resume(service_server, data_root, tmp_path / "state", 10, rng, "--max-batch-frames", "4")

    with httpx.Client(base_url=service.url, timeout=30) as http:
        spec = service_spec(http)
    assert (view["state"], view["total"], view["failed"]) == ("finished", IMAGES, 0), f"seed {SEED}"
    assert_all_valid(images, spec)
    assert temp_files(data_root) == []


def test_twenty_clients_killed_at_random_points(service_server, tmp_path: Path) -> None:
    rng = random.Random(SEED)
    server = service_server(tmp_path, "--max-batch-frames", "4")
    with httpx.Client(base_url=server.url, timeout=60) as http:
        spec = service_spec(http)
        for round_ in range(20):
            images = write_images(tmp_path / f"round{round_:02d}", [f"{i:03d}.png" for i in range(100)], seed=round_)
            abandon_request(server.url, http, images, kill_after=rng.randrange(0, 60))
            assert http.get("/healthz").json()["status"] == "ok" and engine_idle(http)
            assert_all_valid(images, spec)
    assert temp_files(tmp_path) == []


def test_two_services_and_readers_on_a_large_root(service_server, tmp_path: Path) -> None:
    run = two_services_with_readers(service_server, tmp_path / "shared", IMAGES, tmp_path / "stop", timeout=900)

    for view in run["views"]:
        assert (view["state"], view["failed"], view["computed"] + view["skipped"]) == ("finished", 0, IMAGES)
    for kind in ("mmap", "copy"):
        assert set(run["seen"][kind]) <= {Outcome.HIT, Outcome.MISSING}, run["seen"][kind]
    assert run["seen"]["fetch"]["bad"] == 0
    stats = run["process"]["stats"]
    assert stats["corrupt"] == stats["stale"] == stats["spec_mismatch"] == 0
    assert_all_valid(run["images"], run["spec"])
    assert temp_files(tmp_path / "shared") == []
