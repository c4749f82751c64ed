"""Faults against real services: killed processes, a full disk, a vanishing data root, racing writers.

The scenarios are functions so that tests/soak/ runs the same ones longer.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import torch

from vggt_cache.client import FeatureCache
from vggt_cache.client.cachefile import Outcome, read_entry
from vggt_cache.client.spec import FeatureSpec
from vggt_cache.client.wire import decode_features
from vggt_cache.service.engine import Engine
from vggt_cache.service.model import load_aggregator
from vggt_cache.service.units import Unit

from helpers.service import (
    REPO,
    TERMINAL,
    TINY_MODEL,
    RunningService,
    cache_files,
    done,
    poll,
    service_spec,
    temp_files,
    tmpfs,
    wait_job,
    write_images,
)

ENTRY_SHAPE = (16, 128)  # 56x56 images at --size 56: a 4x4 patch grid, 2 x 64 channels
SEED = int(os.environ.get("VGGT_FAULT_SEED", "20261201"))  # fixed: a failure reruns the same; vary it to explore


def assert_all_valid(images: list[str], spec: FeatureSpec) -> None:
    for image in images:
        entry = read_entry(image, spec, mmap=False)
        assert entry.outcome is Outcome.HIT, (image, entry.reason)
        assert tuple(entry.features.shape) == ENTRY_SHAPE


def engine_idle(http: httpx.Client) -> bool:
    engine = http.get("/status").json()["engine"]
    return not (sum(engine["queued"].values()) or engine["in_flight"] or engine["writing"])


# -- SIGKILL of the service ------------------------------------------------------------------------


def plant_temp_file(folder: Path, name: str, age_s: float) -> Path:
    """A leftover of an entry write (the writer's naming), `age_s` old (negative: from the future)."""
    path = folder / f".{name}.vggt_cache.pt.99999.deadbeef.tmp"
    path.write_bytes(b"half an entry")
    when = time.time() - age_s
    os.utime(path, (when, when))
    return path


KILL_SPACING = 8  # units done between two kills (a few batches)


def kill_and_resume(
    service_server: Callable[..., RunningService],
    data_root: Path,
    state_dir: Path,
    kills: int,
    rng: random.Random,
    *args: str,
) -> tuple[dict, RunningService]:
    """Run a bulk job over `data_root`, SIGKILL the service `kills` times at random progress points,
    restarting it after each; returns the job's final view and the last service."""
    service = service_server(data_root, "--state-dir", str(state_dir), *args)
    with httpx.Client(base_url=service.url, timeout=30) as http:
        job_id = http.post("/precompute", json={"data_root": str(data_root)}).json()["job_id"]
        total = wait_job(http, job_id, until=lambda v: v["total"] > 0)["total"]
    # Increasing points, all before 80%: the job is still running when its kill comes.
    points = sorted(rng.sample(range(1, int(total * 0.8)), kills))
    floor = 0
    for n, drawn in enumerate(points):
        # Past the previous kill by a few batches: a unit on the device at two kills is failed as poison by
        # design, and the restarted job runs the unit the last kill interrupted first.
        point = max(drawn, floor)
        with httpx.Client(base_url=service.url, timeout=30) as http:
            # B023 is wrong here: wait_job calls the lambda before the loop moves on.
            at_kill = wait_job(http, job_id, until=lambda v: done(v) >= point or v["state"] in TERMINAL)  # noqa: B023
        if at_kill["state"] != "running":
            # Progress is recorded in steps: a fast restart can finish between two polls. The later
            # kills are then moot, but at least one must have hit the running job.
            assert n > 0, f"the job ended before its first kill point {point} (seed {SEED})"
            break
        service.proc.send_signal(signal.SIGKILL)
        service.proc.wait(30)
        floor = done(at_kill) + KILL_SPACING
        service = service_server(data_root, "--state-dir", str(state_dir), *args)
    with httpx.Client(base_url=service.url, timeout=30) as http:
        return wait_job(http, job_id, timeout=300), service


def test_a_bulk_job_survives_repeated_sigkills(service_server, tmp_path: Path) -> None:
    rng = random.Random(SEED)
    data_root, state_dir = tmp_path / "data", tmp_path / "state"
    images = write_images(data_root / "frames", [f"f{i:03d}.png" for i in range(120)], seed=SEED % 1000)
    old = plant_temp_file(data_root / "frames", "f000.png", age_s=3600)  # a write killed an hour ago
    young = plant_temp_file(data_root / "frames", "f001.png", age_s=-3600)  # another writer's, in flight
    started = time.time()

    view, service = kill_and_resume(service_server, data_root, state_dir, 3, rng, "--max-batch-frames", "2")

    with httpx.Client(base_url=service.url, timeout=30) as http:
        spec = service_spec(http)
    assert (view["state"], view["total"], view["failed"]) == ("finished", 120, 0), f"seed {SEED}"
    assert view["computed"] + view["skipped"] == 120
    assert service.log().count("Resuming job") == 1  # each restart's own log
    assert_all_valid(images, spec)
    assert not old.exists()
    assert temp_files(data_root) == [young]  # nothing older than the job is left
    assert all(p.stat().st_mtime >= started for p in temp_files(data_root))


# -- one service for the faults below ----------------------------------------------------------------


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def server(service_server, root: Path) -> RunningService:
    return service_server(root, "--max-batch-frames", "4")


@pytest.fixture(scope="module")
def http(server: RunningService):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


CLIENT = """
import json, sys, httpx
httpx.post(sys.argv[1] + "/features", json={"images": json.loads(sys.argv[2])}, timeout=600)
print("answered", flush=True)
"""


def units_computed(http: httpx.Client) -> int:
    return http.get("/status").json()["engine"]["units"]["computed"]


def abandon_request(url: str, http: httpx.Client, images: list[str], kill_after: int = 0) -> None:
    """A client process asks for `images` and is SIGKILLed while the service works on them,
    once `kill_after` more units are computed; returns when the service has finished the work."""
    start = units_computed(http)
    client = subprocess.Popen(
        [sys.executable, "-c", CLIENT, url, json.dumps(images)], stdout=subprocess.PIPE, text=True
    )
    try:
        poll(
            lambda: not engine_idle(http) and units_computed(http) >= start + kill_after,
            60,
            "the service to work on the client's request",
        )
        assert client.poll() is None, "the request was answered before the kill"
    finally:
        client.kill()
        client.wait(10)
    assert "answered" not in client.stdout.read()
    poll(lambda: engine_idle(http), 60, "the abandoned work to drain")


def test_a_client_killed_mid_request_leaves_the_service_healthy(
    http: httpx.Client, server: RunningService, root: Path
) -> None:
    images = write_images(root / "abandoned", [f"a{i:03d}.png" for i in range(240)], seed=11)
    before = http.get("/status").json()["engine"]["units"]

    abandon_request(server.url, http, images)

    assert http.get("/healthz").json()["status"] == "ok"
    after = http.get("/status").json()["engine"]["units"]
    assert after["computed"] - before["computed"] == 240 and after["failed"] == before["failed"]
    r = http.post("/features", json={"images": images[:8] + write_images(root / "later", ["new.png"], seed=12)})
    assert r.status_code == 200
    items, _ = decode_features(r.content)
    assert [i["status"] for i in items] == ["cached"] * 8 + ["computed"]
    assert_all_valid(images, service_spec(http))
    assert temp_files(root / "abandoned") == []


# -- a full disk -------------------------------------------------------------------------------------


def fill_disk(folder: Path, leave_bytes: int) -> Path:
    """A file that leaves about `leave_bytes` free on the file system of `folder`."""
    st = os.statvfs(folder)
    filler = folder / "filler.bin"
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - leave_bytes))
    return filler


def test_a_full_disk_fails_entries_cleanly_and_the_job_resumes_when_space_returns(
    http: httpx.Client, server: RunningService, root: Path
) -> None:
    with tmpfs(root / "disk", "2m") as disk:
        data = disk / "data"
        images = write_images(data, [f"d{i:02d}.png" for i in range(40)], seed=13)
        filler = fill_disk(disk, leave_bytes=48 * 1024)  # room for a few entries (~6.5 kB each)
        spec = service_spec(http)

        # Forced: the plan knows the entries cannot all fit; this is about the disk filling up mid-job.
        first = wait_job(http, http.post("/precompute", json={"data_root": str(data), "force": True}).json()["job_id"])
        items_on_full = http.post("/features", json={"images": images})

        assert first["state"] == "finished" and first["computed"] > 0 and first["failed"] > 0
        assert first["computed"] + first["failed"] == 40
        assert {f["reason"] for f in first["failures"]} == {"[Errno 28] No space left on device"}
        assert len(cache_files(data)) == first["computed"]
        assert_all_valid([str(p)[: -len(".vggt_cache.pt")] for p in cache_files(data)], spec)
        assert temp_files(disk) == []
        items, _ = decode_features(items_on_full.content)
        failed = [i for i in items if i["status"] == "failed"]
        assert failed and all("No space left on device" in i["error"] for i in failed)
        assert http.get("/healthz").json()["status"] == "ok"

        filler.unlink()
        again = wait_job(
            http, http.post("/precompute", json={"data_root": str(data), "skip_existing": True}).json()["job_id"]
        )

        assert (again["state"], again["failed"]) == ("finished", 0)
        assert again["skipped"] == 40 - len(failed) and again["computed"] == len(failed)
        assert_all_valid(images, spec)
        assert temp_files(disk) == []
        assert json.loads((data / "vggt_cache_manifest.json").read_text())["job_id"] == again["job_id"]


# -- a data root that disappears -----------------------------------------------------------------------


def test_a_data_root_renamed_away_mid_job_ends_the_job_and_not_the_service(http: httpx.Client, root: Path) -> None:
    data = root / "vanishing"
    write_images(data, [f"v{i:03d}.png" for i in range(200)], seed=14)
    job_id = http.post("/precompute", json={"data_root": str(data)}).json()["job_id"]
    wait_job(http, job_id, until=lambda v: v["computed"] >= 8)
    moved = root / "moved-away"
    os.rename(data, moved)

    view = wait_job(http, job_id)

    assert view["state"] == "finished" and view["failed"] > 0, view
    assert view["computed"] + view["failed"] == 200
    assert all(
        "No such file or directory" in f["reason"] and f["image"].startswith(str(data)) for f in view["failures"]
    )
    spec = service_spec(http)
    assert_all_valid([str(p)[: -len(".vggt_cache.pt")] for p in cache_files(moved)], spec)
    assert len(cache_files(moved)) == view["computed"]  # what the job counts is what it wrote
    # The job runner is still there: the next job runs.
    other = write_images(root / "next", ["n.png"], seed=15)
    nxt = wait_job(http, http.post("/precompute", json={"data_root": str(root / "next")}).json()["job_id"])
    assert (nxt["state"], nxt["computed"]) == ("finished", 1)
    assert_all_valid(other, spec)


# -- an image rewritten while its features are computed ----------------------------------------------


def test_an_image_rewritten_during_its_forward_gets_a_stale_entry(tmp_path: Path) -> None:
    loaded = load_aggregator(str(TINY_MODEL))
    spec = FeatureSpec(fingerprint=loaded.fingerprint, architecture=loaded.config.to_dict(), size=56)
    target, twin = write_images(tmp_path, ["target.png", "twin.png"], seed=16)
    write_images(tmp_path / "new", ["content.png"], seed=17)
    rewritten = threading.Event()

    def rewrite_during_forward(batch: torch.Tensor) -> None:
        if not rewritten.is_set():  # the decoded pixels are the old ones; the file now is not
            stat = os.stat(target)
            shutil.copyfile(tmp_path / "new" / "content.png", target)
            os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
            shutil.copyfile(target, twin)
            rewritten.set()

    with Engine(loaded, spec, before_forward=rewrite_during_forward) as engine:
        old = engine.submit([Unit.frame(target)])[0].result(60).entries[0]
        assert rewritten.is_set() and old.status == "computed"
        stale = read_entry(target, spec)
        assert stale.outcome is Outcome.STALE and "image changed" in stale.reason

        new = [r.entries[0] for r in (f.result(60) for f in engine.submit([Unit.frame(target), Unit.frame(twin)]))]

    assert [e.status for e in new] == ["computed", "computed"]  # the stale entry was not served
    current = read_entry(target, spec)
    assert current.outcome is Outcome.HIT
    torch.testing.assert_close(current.features, read_entry(twin, spec).features)
    assert not torch.equal(current.features, old.features)


# -- two services and training readers on one data root ----------------------------------------------


READER = """
import json, os, sys
from vggt_cache.client import FeatureCache
images, spec, stop = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
cache = FeatureCache(spec=spec, fallback="online", mmap=False)
shapes, rounds = set(), 0
print("ready", flush=True)
while not os.path.exists(stop):
    shapes |= {tuple(t.shape) for t in cache.get_many(images) if t is not None}
    rounds += 1
print(json.dumps({"stats": cache.stats, "shapes": sorted(shapes), "rounds": rounds}))
"""


def read_while(images: list[str], spec: FeatureSpec, stop: threading.Event, mmap: bool, seen: Counter) -> None:
    while not stop.is_set():
        for image in images:
            entry = read_entry(image, spec, mmap=mmap)
            seen[entry.outcome] += 1
            if entry.outcome is Outcome.HIT and tuple(entry.features.shape) != ENTRY_SHAPE:
                seen["bad shape"] += 1


def fetch_while(cache: FeatureCache, images: list[str], stop: threading.Event, seen: Counter) -> None:
    while not stop.is_set():
        for start in range(0, len(images), 16):
            for tensor in cache.get_many(images[start : start + 16]):
                seen["fetched" if tensor is not None and tuple(tensor.shape) == ENTRY_SHAPE else "bad"] += 1


def two_services_with_readers(
    service_server: Callable[..., RunningService], data_root: Path, n_images: int, stop_file: Path, timeout: float = 120
) -> dict:
    """Two services (own state dirs) precompute `data_root` at once while threads and a process read it."""
    images = write_images(data_root, [f"c{i:04d}.png" for i in range(n_images)], seed=18)
    services = [service_server(data_root, "--max-batch-frames", "8") for _ in range(2)]
    with contextlib.ExitStack() as stack:
        https = [stack.enter_context(httpx.Client(base_url=s.url, timeout=30)) for s in services]
        spec = service_spec(https[0])
        stop = threading.Event()
        seen = {"mmap": Counter(), "copy": Counter(), "fetch": Counter()}
        fetcher = FeatureCache([s.url for s in services], spec=spec)
        threads = [
            threading.Thread(target=read_while, args=(images, spec, stop, True, seen["mmap"])),
            threading.Thread(target=read_while, args=(images[::-1], spec, stop, False, seen["copy"])),
            threading.Thread(target=fetch_while, args=(fetcher, images[::7], stop, seen["fetch"])),
        ]
        reader = subprocess.Popen(
            [sys.executable, "-c", READER, json.dumps(images), json.dumps(spec.to_dict()), str(stop_file)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )
        for t in threads:
            t.start()
        try:
            assert reader.stdout.readline() == "ready\n"  # torch imported: it reads while the jobs run
            job_ids = [h.post("/precompute", json={"data_root": str(data_root)}).json()["job_id"] for h in https]
            views = [wait_job(h, j, timeout=timeout) for h, j in zip(https, job_ids, strict=True)]
        finally:
            stop.set()
            stop_file.touch()
            for t in threads:
                t.join(60)
            out, _ = reader.communicate(timeout=60)
            fetcher.close()
    return {"images": images, "spec": spec, "views": views, "seen": seen, "process": json.loads(out)}


def test_two_services_precompute_one_root_while_training_clients_read(service_server, tmp_path: Path) -> None:
    run = two_services_with_readers(service_server, tmp_path / "shared", 80, tmp_path / "stop")

    for view in run["views"]:
        assert (view["state"], view["failed"]) == ("finished", 0)
        assert view["computed"] + view["skipped"] == 80
    # Every entry is written by a job, or by a service for the fetcher's on-demand requests (images[::7],
    # which a job then finds valid and skips): none is skipped by both jobs without being written.
    assert sum(v["computed"] for v in run["views"]) >= 80 - len(run["images"][::7])
    for kind in ("mmap", "copy"):
        seen = run["seen"][kind]
        assert set(seen) <= {Outcome.HIT, Outcome.MISSING}, (kind, seen)  # never corrupt, never half a file
        assert seen[Outcome.HIT] > 0
    assert run["seen"]["fetch"]["fetched"] > 0 and run["seen"]["fetch"]["bad"] == 0
    stats = run["process"]["stats"]
    assert run["process"]["rounds"] > 0 and stats["hits"] > 0
    assert stats["corrupt"] == stats["stale"] == stats["spec_mismatch"] == 0
    assert run["process"]["shapes"] in ([], [list(ENTRY_SHAPE)])
    assert_all_valid(run["images"], run["spec"])
    assert temp_files(tmp_path / "shared") == []
