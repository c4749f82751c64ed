"""Shared storage, many users (issue 18, items 8-11), against real services on 127.0.0.1.

A lab's data root on NFS is read by every user's dataloader and written by a service running
under its own umask; anyone may plant a file in a parent folder; one dataloader asks for other
clips than a bulk job computed; a service may die in the middle of a write. Readers as another
user are real: a forked process that drops root for `nobody` before reading.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from vggt_cache.client.cache import FeatureCache
from vggt_cache.client.cachefile import Outcome, cache_path, read_entry
from vggt_cache.client.manifest import MANIFEST_NAME, manifest_path, nearest_manifest, read_manifest
from vggt_cache.client.spec import FeatureSpec
from vggt_cache.service.settings import ServiceSettings
from vggt_cache.service.verify import verify_data_root

from helpers.service import REPO, TINY_MODEL, RunningService, service_spec, wait_job, write_images

HANG_S = 30.0  # what "at once" must beat: a reader blocked on a FIFO would wait forever
START_S = 120.0  # a Python process that imports torch on a loaded 2-core CI machine, plus HANG_S
OTHER_USER = "nobody"


@pytest.fixture(scope="module")
def shared() -> Iterator[Path]:
    """A folder every user can reach (pytest's own base folder is 0700), like a lab's NFS tree."""
    path = Path(tempfile.mkdtemp(prefix="vggt-shared-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def server(service_server, shared: Path) -> RunningService:
    """A frame-mode service started under umask 077, as service accounts often are."""
    previous = os.umask(0o077)
    try:
        return service_server(shared)
    finally:
        os.umask(previous)


def as_other_user(fn: Callable[[], Any]) -> Any:
    """`fn()` run in a forked process that has dropped root for an unprivileged user; its result."""
    if os.geteuid() != 0:
        pytest.skip("reading as another user needs root to drop to it")
    user = pwd.getpwnam(OTHER_USER)
    ctx = multiprocessing.get_context("fork")
    receiver, sender = ctx.Pipe(duplex=False)

    def run() -> None:
        os.setgroups([])
        os.setgid(user.pw_gid)
        os.setuid(user.pw_uid)
        try:
            sender.send(("ok", fn()))
        except BaseException as exc:  # sent back for the assertion message
            sender.send(("error", repr(exc)))

    proc = ctx.Process(target=run)
    proc.start()
    try:
        assert receiver.poll(HANG_S), f"the reader as {OTHER_USER} did not answer within {HANG_S}s"
        status, value = receiver.recv()
    finally:
        proc.join(HANG_S)
        if proc.is_alive():
            proc.kill()
    assert status == "ok", value
    return value


def entry_digests(images: list[str]) -> list[str]:
    """What each image's entry file holds (a digest: the files are kilobytes)."""
    return [hashlib.sha256(Path(cache_path(p)).read_bytes()).hexdigest() for p in images]


def job_over(http: httpx.Client, root: Path, **options: Any) -> dict:
    r = http.post("/precompute", json={"data_root": str(root), **options})
    assert r.status_code == 202, r.text
    return wait_job(http, r.json()["job_id"], timeout=120)


# -- item 8: entries follow the service's umask -----------------------------------------------------


def test_entries_and_manifests_written_under_umask_077_are_readable_by_other_users(http, shared: Path) -> None:
    root = shared / "umask"
    images = write_images(root, ["a.png", "b.png", "c.png"])
    view = job_over(http, root)
    assert (view["state"], view["computed"]) == ("finished", 3)
    [extra] = write_images(root / "more", ["d.png"], seed=1)
    assert http.post("/features", json={"images": [extra]}).status_code == 200
    images.append(extra)
    written = [cache_path(p) for p in images] + [manifest_path(str(root))]
    assert {oct(os.stat(p).st_mode & 0o777) for p in written} == {"0o644"}
    spec = service_spec(http)

    def read() -> tuple[list[str], str]:
        return [read_entry(p, spec, mmap=False).outcome.value for p in images], read_manifest(str(root))["spec_digest"]

    outcomes, digest = as_other_user(read)
    assert outcomes == ["hit"] * 4 and digest == spec.digest


def test_an_entry_another_user_cannot_read_is_unreadable_not_corrupt(http, shared: Path) -> None:
    root = shared / "private"
    [image] = write_images(root, ["p.png"], seed=2)
    assert http.post("/features", json={"images": [image]}).status_code == 200
    os.chmod(cache_path(image), 0o600)  # what a service before the fix left under umask 077
    spec = service_spec(http)

    def read() -> dict:
        messages: list[str] = []
        handler = logging.Handler()
        handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
        logging.getLogger("vggt_cache").addHandler(handler)
        result = read_entry(image, spec)
        cache = FeatureCache(spec=spec, fallback="online")
        return {
            "outcome": result.outcome.value,
            "reason": result.reason,
            "got": cache.get(image) is not None,
            "stats": cache.stats,
            "verify": verify_data_root(str(root), spec)["counts"],
            "log": messages,
        }

    seen = as_other_user(read)
    assert (seen["outcome"], seen["reason"]) == (Outcome.UNREADABLE.value, "unreadable: permission denied")
    assert not seen["got"] and seen["stats"]["unreadable"] == 1 and seen["stats"]["corrupt"] == 0
    assert seen["verify"]["unreadable"] == 1 and seen["verify"]["corrupt"] == 0
    assert any(cache_path(image) in m and "unreadable: permission denied" in m for m in seen["log"])
    assert http.get("/status").json()["engine"]["on_demand_lookups"]["unreadable"] == 0  # a counter of its own
    with pytest.raises(ValueError, match="--file-mode"):
        ServiceSettings(file_mode=0o755).check()  # group-only is 0640; executable or owner-less modes are refused


def test_a_group_only_file_mode_holds_whatever_the_umask(tmp_path: Path) -> None:
    root = tmp_path / "group"
    images = write_images(root, ["a.png", "b.png"], seed=3)
    flags = ["--vggt_model_path", str(TINY_MODEL), "--size", "56", "--device", "cpu", "--file-mode", "0640"]
    flags += ["--state-dir", str(tmp_path / "state")]
    run = subprocess.run(
        [sys.executable, "-m", "vggt_cache.service.cli", "precompute", "--data_root", str(root), *flags],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=lambda: os.umask(0o077),
    )
    assert run.returncode == 0, run.stdout + run.stderr
    written = [cache_path(p) for p in images] + [manifest_path(str(root))]
    assert {oct(os.stat(p).st_mode & 0o777) for p in written} == {"0o640"}


# -- item 9: a FIFO manifest hangs readers; the search walks up to / ---------------------------------

READERS = """
import json, sys
from vggt_cache.client.cache import FeatureCache, read_cached
image, root = sys.argv[1:3]
bounded = FeatureCache(data_root=root)
got = bounded.get(image)
print(json.dumps({"bounded": got is not None, "stats": bounded.stats,
                  "read_cached": read_cached(image, data_root=root) is not None,
                  "unbounded": FeatureCache().get(image) is not None}))
"""


def test_a_fifo_manifest_hangs_no_reader_and_one_above_the_data_root_is_not_used(http, shared: Path) -> None:
    parent = shared / "planted"
    root = parent / "data"
    [image] = write_images(root / "episode", ["x.png"], seed=3)
    assert http.post("/features", json={"images": [image]}).status_code == 200
    spec = service_spec(http)
    foreign = FeatureSpec(**{**spec.to_dict(), "layers": (0,)})  # its entries would all be spec mismatches
    (parent / MANIFEST_NAME).write_text(json.dumps({"manifest_version": 1, "spec": foreign.to_dict()}))
    os.mkfifo(root / MANIFEST_NAME)

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    readers = subprocess.run(
        [sys.executable, "-c", READERS, image, str(root)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=START_S,
    )
    assert readers.returncode == 0, readers.stderr
    seen = json.loads(readers.stdout)
    assert seen["bounded"] and seen["read_cached"] and seen["unbounded"]
    assert seen["stats"]["hits"] == 1 and seen["stats"]["spec_mismatch"] == 0
    assert "FIFO" in readers.stderr  # the FIFO is said once, and ignored

    verify = subprocess.run(
        [sys.executable, "-m", "vggt_cache.service.cli", "verify", str(root)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=START_S,
    )
    assert verify.returncode != 0 and "unreadable manifest" in verify.stderr and "FIFO" in verify.stderr

    os.unlink(root / MANIFEST_NAME)
    assert nearest_manifest(image, root) is None  # the parent's is above the data root
    assert nearest_manifest(image, parent)[1]["spec"] == foreign.to_dict()  # a bound that includes it


# -- item 10: on-demand requests overwrite precomputed work -----------------------------------------


def test_an_on_demand_request_keeps_a_bulk_jobs_entry_and_only_overwrite_replaces_it(
    service_server, shared: Path
) -> None:
    root = shared / "causal"
    steps = write_images(root / "ep_0001", [f"step_{n}_MOVE_FORWARD.png" for n in range(3)], seed=4)
    service = service_server(shared, "--attention", "causal")
    with httpx.Client(base_url=service.url, timeout=60) as http:
        first = job_over(http, root)
        assert (first["state"], first["computed"]) == ("finished", 3)
        spec = service_spec(http)
        nine = tuple([steps[0]] * 8 + steps[:1])  # step 0's sample: 9 frames, padded with step 0
        before = entry_digests(steps)

        with FeatureCache(service.url) as cache:  # what a dataloader calling get(image) asks: a 1-frame clip
            got = cache.get(steps[0])
        assert got is not None and tuple(got.shape) == tuple(read_entry(steps[0], spec).features.shape)
        assert entry_digests(steps) == before
        assert read_entry(steps[0], spec, context_frames=nine).outcome is Outcome.HIT
        assert http.get("/status").json()["engine"]["other_context"]["kept"] == 1

        kept = job_over(http, root, max_history_images=2)  # 3-frame clips: another context for every step
        assert (kept["state"], kept["skipped"], kept["kept"], kept["computed"], kept["replaced"]) == (
            "finished",
            3,
            3,
            0,
            0,
        )
        assert entry_digests(steps) == before

        replaced = job_over(http, root, max_history_images=2, overwrite=True)
        assert (replaced["state"], replaced["computed"], replaced["replaced"]) == ("finished", 3, 3)
    manifest = read_manifest(str(root))
    assert (manifest["job_id"], manifest["replaced"], manifest["kept"]) == (replaced["job_id"], 3, 0)
    assert read_entry(steps[0], spec, context_frames=(steps[0],) * 3).outcome is Outcome.HIT
    service.stop()


# -- item 11: a killed manifest write leaves its temporary file forever -----------------------------


def test_a_manifest_write_killed_midway_leaves_no_temporary_file(http, server: RunningService, shared: Path) -> None:
    root = shared / "killed"
    write_images(root, ["k.png"], seed=5)
    orphan = root / f".{MANIFEST_NAME}.4242.0badf00d.tmp"  # the writer's naming, its process SIGKILLed
    orphan.write_text('{"job_id": ')
    in_flight = root / f".{MANIFEST_NAME}.4243.0badf00e.tmp"  # another service's write, younger than this one
    in_flight.write_text('{"job_id": ')
    hour_ago, in_an_hour = time.time() - 3600, time.time() + 3600
    os.utime(orphan, (hour_ago, hour_ago))
    os.utime(in_flight, (in_an_hour, in_an_hour))

    view = job_over(http, root)
    assert view["state"] == "finished" and read_manifest(str(root))["job_id"] == view["job_id"]
    assert not orphan.exists() and in_flight.exists()
    assert "removed 1 temporary file(s)" in server.log()
