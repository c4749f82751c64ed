"""A plan at the file-system floor: each file stat-ed once, each folder resolved once; and what it saw is
checked again when the units are computed (a root whose files change between plan and compute)."""

from __future__ import annotations

import os
import re
import threading
import time
from pathlib import Path

import pytest

from vggt_cache.client.cachefile import CACHE_SUFFIX, Outcome, read_entry
from vggt_cache.client.safeopen import OutsideRoots
from vggt_cache.client.spec import FeatureSpec, resolve_options
from vggt_cache.service.engine import Engine, Priority
from vggt_cache.service.frametable import FrameTable
from vggt_cache.service.jobs.options import JobOptions
from vggt_cache.service.jobs.plan import PLAN_THREADS, PlanBuilder, lanes_for
from vggt_cache.service.jobs.planning import plan_root, plan_work
from vggt_cache.service.model import load_aggregator
from vggt_cache.service.paths import AllowedRoots
from vggt_cache.service.samples import find_samples
from vggt_cache.service.verify import verify_data_root

from helpers.service import TINY_MODEL, write_images

EPISODES, STEPS = 4, 15
# Per sample: the current image's lstat and its header's open (read where it lies, no fstat); its entry is
# opened only if the walk listed one. Start-up (the folders, the roots, free space) comes on top, a few a folder.
CALLS_PER_SAMPLE = 2


def episode_root(folder: Path, episodes: int = EPISODES, steps: int = STEPS) -> Path:
    for e in range(episodes):
        write_images(folder / f"ep_{e}", [f"step_{n}_MOVE_FORWARD.png" for n in range(steps)], size=(32, 24), seed=e)
    return folder


@pytest.fixture(scope="module")
def loaded():
    return load_aggregator(str(TINY_MODEL))


def tiny_spec(loaded) -> FeatureSpec:
    return FeatureSpec(
        fingerprint=loaded.fingerprint,
        architecture=loaded.config.to_dict(),
        **{**resolve_options("newjanusvln"), "size": 56},
    )


class CallCounter:
    """Counts the stat/open/readlink calls made through `os` (what strace counts, from Python; an fstat
    that `io.FileIO` makes itself on a descriptor it wraps would not be seen), by every thread but those already
    running when it starts: a thread another test left behind is not this plan's, any thread the plan starts is."""

    NAMES = ("stat", "lstat", "fstat", "open", "readlink", "scandir", "statvfs")

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        self.foreign: list[tuple[str, str]] = []  # (thread, call) of the threads not counted
        self._earlier = set(threading.enumerate()) - {threading.current_thread()}
        for name in self.NAMES:
            real = getattr(os, name)
            monkeypatch.setattr(os, name, self._counting(name, real))

    def _counting(self, name: str, real):
        def call(*args, **kwargs):
            thread = threading.current_thread()
            if thread in self._earlier:
                self.foreign.append((thread.name, name))
            else:
                self.calls += 1
            return real(*args, **kwargs)

        return call


def test_a_dry_run_makes_at_most_two_calls_a_sample(tmp_path, loaded, monkeypatch):
    root = episode_root(tmp_path / "data")
    counter = CallCounter(monkeypatch)
    plan = plan_root(str(root), tiny_spec(loaded), AllowedRoots.of([str(root)]), JobOptions(max_history_images=8))
    samples = EPISODES * STEPS
    assert plan.entries == plan.to_compute == samples and plan.unreadable == 0
    # Per folder: list, resolve, open and check, st_dev; the root's real path found three times (its roots, the
    # walk, the table: a stat and an lstat a component), free space.
    start_up = 8 * EPISODES + 3 * len(root.parts) + 2
    assert counter.calls <= CALLS_PER_SAMPLE * samples + start_up, (counter.calls, counter.foreign)  # was ~90 a sample


def test_checks_run_as_many_at_once_as_their_waits_need():
    assert lanes_for(wall=1.0, cpu=1.0) == 1  # nothing waited on: a second thread would only take the GIL
    assert lanes_for(wall=1.4, cpu=1.0) == 1
    assert lanes_for(wall=6.0, cpu=1.0) == 6
    assert lanes_for(wall=100.0, cpu=1.0) == lanes_for(wall=1.0, cpu=0.0) == PLAN_THREADS


def test_a_plan_whose_reads_wait_overlaps_them_and_plans_the_same(tmp_path, loaded, monkeypatch):
    root = episode_root(tmp_path / "data", episodes=10, steps=12)
    spec, roots = tiny_spec(loaded), AllowedRoots.of([str(root)])
    units = plan_work(str(root), spec, roots, JobOptions(max_history_images=8)).units

    def planned(builder: PlanBuilder) -> tuple:
        valid = builder.check(units)
        plan = builder.plan(find_samples(str(root)), 0).to_dict()
        return valid, {k: v for k, v in plan.items() if k not in ("free_bytes", "fits")}  # others write meanwhile

    at_once = planned(PlanBuilder(spec, str(root), roots=roots.real))
    threads, real_pread = set(), os.pread

    def remote_pread(fd, n, offset):  # each header read waits as on a network file system
        threads.add(threading.get_ident())
        time.sleep(0.003)
        return real_pread(fd, n, offset)

    monkeypatch.setattr(os, "pread", remote_pread)
    builder = PlanBuilder(spec, str(root), roots=roots.real)
    assert planned(builder) == at_once
    assert builder.lanes > 2 and len(threads) > 2  # the waits overlapped


def test_verify_and_a_plan_of_a_computed_root_read_each_frame_once(tmp_path, loaded, monkeypatch):
    root = episode_root(tmp_path / "data", episodes=1)
    spec = tiny_spec(loaded)
    units = plan_work(str(root), spec, AllowedRoots.of([str(root)]), JobOptions(max_history_images=8)).units
    with Engine(loaded, spec, roots=[str(root)]) as engine:
        results = [f.result(120) for f in engine.submit(units, Priority.BULK)]
    assert {r.kind.value for r in results} == {"computed"}
    counter = CallCounter(monkeypatch)
    report = verify_data_root(str(root), spec, max_history_images=8)
    assert report["ok"] and report["counts"]["hit"] == STEPS
    # Start-up: the root's real path (a stat, an lstat a component: pytest's folder is deeper under xdist) and a
    # listing a folder. Per entry: its open and fstat, and one lstat of its image (each context frame is another's
    # image); it was 12 an entry (every context frame stat-ed).
    start_up = len(root.parts) + 2
    assert counter.calls <= 3 * STEPS + start_up, (counter.calls, counter.foreign)

    counter.calls = 0  # a plan of the computed root: the same, its entries' metadata read
    plan = plan_work(str(root), spec, AllowedRoots.of([str(root)]), JobOptions(max_history_images=8)).plan
    assert plan.valid == plan.entries == STEPS and plan.to_compute == 0
    # Start-up as a dry run's: the root's real path is found three times (its roots, the walk, the table).
    assert counter.calls <= 3 * STEPS + 3 * len(root.parts) + 6, (counter.calls, counter.foreign)


def test_the_table_contains_as_allowed_roots_do(tmp_path):
    root = episode_root(tmp_path / "data", episodes=1, steps=2)
    outside = write_images(tmp_path / "outside", ["secret.png"])[0]
    write_images(tmp_path, ["beside.png"])
    (root / "ep_0" / "step_2_STOP.png").symlink_to(outside)
    (root / "linked").symlink_to(tmp_path / "outside")
    (tmp_path / "alias").symlink_to(root / "ep_0")
    alias = str(tmp_path / "alias")
    roots = AllowedRoots.of([str(root), f"{alias}/step_1_MOVE_FORWARD.png"])  # a root named through a symlink
    ep = str(root / "ep_0")
    paths = [
        f"{ep}/step_0_MOVE_FORWARD.png",  # a plain file: its folder is then known inside
        f"{ep}/step_2_STOP.png",  # a symlink out of the roots, in a folder known inside
        f"{ep}/../ep_0/step_0_MOVE_FORWARD.png",
        f"{ep}/./step_1_MOVE_FORWARD.png",
        f"{ep}/..",
        f"{ep}/",
        f"{ep}/\udc80.png",  # no file name decodes to a lone surrogate
        f"{ep}/gone.png",
        f"{alias}/step_1_MOVE_FORWARD.png",  # inside: a root; its folder's name is not
        f"{alias}/step_0_MOVE_FORWARD.png",
        str(root),  # a root, whose folder is not inside
        str(tmp_path / "beside.png"),
        str(root / "linked" / "secret.png"),
        str(tmp_path / "outside" / "secret.png"),
    ]
    for order in (paths, paths[::-1]):  # whatever the table learnt before, it says what the roots say
        table = FrameTable(roots)
        assert_contains_as(roots, table, order)
    assert table.real_folder(str(root / "linked")) == os.path.realpath(root / "linked")
    # POSIX keeps two leading slashes, where three or more become one: `//` is no folder to know inside.
    everything = AllowedRoots.of(["/"])
    assert_contains_as(everything, FrameTable(everything), ["//tmp", "///tmp"])


def assert_contains_as(roots: AllowedRoots, table: FrameTable, paths: list[str]) -> None:
    for path in paths:
        try:
            expected = roots.contain(path)
        except (OutsideRoots, ValueError) as exc:
            with pytest.raises(type(exc), match=re.escape(str(exc).split(":")[0])):
                table.contain(path)
            with pytest.raises(type(exc)):  # a refusal is remembered, as it was said
                table.contain(path)
        else:
            assert table.contain(path) == expected, path


def test_files_changed_between_plan_and_compute_are_checked_when_opened(tmp_path, loaded):
    root = episode_root(tmp_path / "data", episodes=2, steps=6)
    outside = Path(write_images(tmp_path / "outside", ["secret.png"], size=(32, 24), seed=9)[0])
    spec = tiny_spec(loaded)
    roots = AllowedRoots.of([str(root)])
    work = plan_work(str(root), spec, roots, JobOptions(max_history_images=8))
    assert work.plan.to_compute == 12 and not work.refused  # every frame was inside when planned

    swapped = root / "ep_0" / "step_3_MOVE_FORWARD.png"  # the current image of step 3, history of steps 4-5
    swapped.unlink()
    swapped.symlink_to(outside)
    deleted = root / "ep_1" / "step_5_MOVE_FORWARD.png"
    deleted.unlink()

    with Engine(loaded, spec, roots=roots.real) as engine:
        results = {r.unit.targets[0]: r for r in (f.result(120) for f in engine.submit(work.units, Priority.BULK))}
    failed = {
        Path(t).name if Path(t).parent.name == "ep_1" else f"ep_0/{Path(t).name}"
        for t, r in results.items()
        if r.kind.value == "failed"
    }
    # ep_0's steps 3-5 name the swapped frame; ep_1's step 5 is gone. Everything else is computed.
    assert failed == {
        "ep_0/step_3_MOVE_FORWARD.png",
        "ep_0/step_4_MOVE_FORWARD.png",
        "ep_0/step_5_MOVE_FORWARD.png",
        "step_5_MOVE_FORWARD.png",
    }, failed
    swapped_error = results[str(swapped)].entries[0].error
    assert "outside the allowed roots" in swapped_error, swapped_error
    assert not list(outside.parent.glob(f"*{CACHE_SUFFIX}"))  # nothing written beside the outside image
    assert not os.path.exists(f"{swapped}{CACHE_SUFFIX}") and not os.path.exists(f"{deleted}{CACHE_SUFFIX}")
    kept = root / "ep_0" / "step_2_MOVE_FORWARD.png"
    assert (
        read_entry(
            kept,
            spec,
            context_frames=[str(root / "ep_0" / "step_0_MOVE_FORWARD.png")] * 6
            + [str(root / "ep_0" / f"step_{n}_MOVE_FORWARD.png") for n in range(3)],
        ).outcome
        is Outcome.HIT
    )
