"""Work one input can make unbounded, and identical work done once, against real services on 127.0.0.1 (issue 18).

Items 3 and 4: a sample's clip length is bounded in jobs, a unit that killed the service twice is
failed as poison, a cancel stops a job's work within a batch, SIGTERM exits within its grace;
identical units in flight run once and every waiter gets the result (single-flight).
"""

from __future__ import annotations

import contextlib
import json
import signal
import sqlite3
import subprocess
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from vggt_cache.client.wire import decode_features
from vggt_cache.service.engine.scheduler import Scheduler
from vggt_cache.service.engine.work import Flight, Priority
from vggt_cache.service.jobs.store import DB_NAME
from vggt_cache.service.runtime import DRILL_HOLD_ENV
from vggt_cache.service.units import Unit

from helpers.service import RunningService, poll, wait_job, write_images

CLIENTS = 50
HELD = 12  # frames of the sample whose forward never ends (the drill hook) in the tests below
GRACE_S = 2.0


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("shared-work")


@pytest.fixture(scope="module")
def server(service_server, root: Path) -> RunningService:
    return service_server(root, "--attention", "causal", "--max-frames-per-sample", "8")


def engine_counts(http: httpx.Client) -> tuple[int, int]:
    """(frames run through the model, units computed) from /status."""
    engine = http.get("/status").raise_for_status().json()["engine"]
    return engine["frames"], engine["units"]["computed"]


# -- 3. work one sample can make unbounded -----------------------------------------------------------


def write_samples(data: Path, lengths: list[int]) -> list[str]:
    """A jsonl of one causal sample per length (frames drawn from 4 images, repeats included); returns
    each sample's target (its current image)."""
    write_images(data / "imgs", [f"{i}.png" for i in range(4)], seed=18)
    write_images(data / "cur", [f"{n}.png" for n in range(len(lengths))], seed=19)
    lines, targets = [], []
    for n, length in enumerate(lengths):
        history = [f"imgs/{i % 4}.png" for i in range(length - 1)]
        lines.append(json.dumps({"history_images": history, "current_image": f"cur/{n}.png"}) + "\n")
        targets.append(str((data / "cur" / f"{n}.png").resolve()))
    (data / "train.jsonl").write_text("".join(lines))
    return targets


def start_job(service: RunningService, data: Path) -> str:
    r = httpx.post(f"{service.url}/precompute", json={"data_root": str(data)}, timeout=60)
    assert r.status_code == 202, r.text
    return r.json()["job_id"]


def held(service: RunningService) -> bool:
    return "Drill: holding a forward" in service.log()


def test_a_sample_over_the_frame_limit_fails_alone_with_the_reason(
    server: RunningService, http: httpx.Client, root: Path
) -> None:
    data = root / "long"
    targets = write_samples(data, [3, 20, 3, 2])
    frames0, _ = engine_counts(http)

    view = wait_job(http, start_job(server, data))

    frames, _ = engine_counts(http)
    assert (view["state"], view["total"], view["computed"], view["failed"]) == ("finished", 4, 3, 1)
    [failure] = view["failures"]
    assert failure["image"] == targets[1]
    assert "20 frames" in failure["reason"] and "limit is 8" in failure["reason"]
    assert frames - frames0 == 3 + 3 + 2  # the long sample never reached the model


def test_a_unit_running_at_two_deaths_of_the_service_is_failed_as_poison(
    service_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(DRILL_HOLD_ENV, str(HELD))
    data, state = tmp_path / "data", tmp_path / "state"
    targets = write_samples(data, [3, HELD, 2])
    args = ("--attention", "causal", "--state-dir", str(state))
    service = service_server(data, *args)
    job_id = start_job(service, data)
    for death in range(2):
        # B023 is wrong here: poll calls the lambda before the loop moves on.
        poll(lambda: held(service), 60, f"the {HELD}-frame forward to hold the device (run {death + 1})")  # noqa: B023
        service.proc.send_signal(signal.SIGKILL)
        service.proc.wait(30)
        service = service_server(data, *args)  # resumes the job

    with httpx.Client(base_url=service.url, timeout=60) as http:
        view = wait_job(http, job_id)
    # A sample finished just before a SIGKILL may have its entry on disk but not its row in the store:
    # the resumed job then finds the entry fresh and counts it skipped, not computed.
    assert (view["state"], view["computed"] + view["skipped"], view["failed"]) == ("finished", 2, 1)
    [failure] = view["failures"]
    assert failure["image"] == targets[1] and failure["reason"].startswith("poison: the service died 2 times")
    assert not held(service)  # the third start never ran it


def test_sigterm_exits_within_the_grace_while_a_forward_never_ends(
    service_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(DRILL_HOLD_ENV, str(HELD))
    data = tmp_path / "data"
    write_samples(data, [HELD])
    service = service_server(data, "--attention", "causal", "--shutdown-grace", str(GRACE_S))
    start_job(service, data)
    poll(lambda: held(service), 60, f"the {HELD}-frame forward to hold the device")

    t0 = time.monotonic()
    service.proc.send_signal(signal.SIGTERM)
    try:
        code = service.proc.wait(GRACE_S + 20)  # the grace, and a loaded CI machine's start of the exit
    except subprocess.TimeoutExpired:
        pytest.fail(f"serve still running {GRACE_S + 20}s after SIGTERM with a {GRACE_S}s grace")
    elapsed = time.monotonic() - t0

    assert code == 0 and elapsed >= GRACE_S * 0.9, (code, elapsed)
    log = service.log()
    assert "did not end within the 2s grace" in log and log.rstrip().endswith("[INFO] Stopped")
    # A clean shutdown is no death: the abandoned unit's attempt is taken back, so it cannot become poison.
    with contextlib.closing(sqlite3.connect(Path(service.state_dir) / DB_NAME)) as db:
        assert db.execute("SELECT state, attempts FROM units").fetchall() == [("pending", 0)]


def test_a_unit_withdrawn_while_it_decodes_is_not_run() -> None:
    scheduler = Scheduler(max_batch_frames=4, max_wait_s=0.0, bulk_limit=100)
    job = Flight(
        Unit.frame("/data/a.png"), Priority.BULK, Future(), skip_existing=False, verify=False, return_features=False
    )
    assert scheduler.admit([job], Priority.BULK) == []
    decoding = scheduler.next_to_decode()
    assert scheduler.withdraw({job.future}) == []  # being decoded: not in any queue
    decoding.withdrawn = True  # what Engine.withdraw flags, for its decode to end there
    decoding.images = torch.zeros(1, 3, 14, 14)

    assert not scheduler.decoded(decoding, runnable=True)
    assert scheduler.waiting(Priority.BULK) == 0 and scheduler.counts()["queued"]["bulk"] == 0


# -- 4. identical work is coalesced -------------------------------------------------------------------


def test_fifty_clients_asking_for_one_uncached_image_cost_one_forward(
    server: RunningService, http: httpx.Client, root: Path
) -> None:
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
