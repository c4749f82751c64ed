"""A job plans its root a piece at a time and computes each piece while the next is planned (issue 20 item 2):
its first entries do not wait for the whole plan, `total` grows as the plan does, the view says it is still
planning (`planned` false), and a job resumed while planning computes what was recorded, then plans on from
the last piece recorded (no unit twice, none lost)."""

from __future__ import annotations

import dataclasses
import os
import sqlite3
import threading
import time
from pathlib import Path

import httpx
import pytest

from vggt_cache.client.spec import FeatureSpec, resolve_options
from vggt_cache.service.jobs import planner
from vggt_cache.service.jobs.options import JobOptions
from vggt_cache.service.jobs.plan import PlanBuilder
from vggt_cache.service.jobs.planning import plan_pieces, plan_root, plan_work
from vggt_cache.service.jobs.records import JobRecord
from vggt_cache.service.jobs.store import DB_NAME, JobStore
from vggt_cache.service.jobs.view import JobState, Rate, job_view
from vggt_cache.service.model import load_aggregator
from vggt_cache.service.paths import AllowedRoots
from vggt_cache.service.samples import SampleStream
from vggt_cache.service.units import Unit

from helpers.cli import cli
from helpers.service import TINY_MODEL, cache_files, poll, service_in_process, service_spec, wait_job, write_images

PIECE = 5
IMAGES = 20


class PlanGate:
    """Holds the plan before it checks its `held`-th piece (counted from 1) until `release`: the test decides
    how far the plan has got while the job runs."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, held: int) -> None:
        self.held, self.checks = held, 0
        self.waiting, self.released = threading.Event(), threading.Event()
        check = PlanBuilder.check

        def gated(builder: PlanBuilder, units: list) -> frozenset[str]:
            self.checks += 1
            if self.checks >= self.held:
                self.waiting.set()
                assert self.released.wait(120), "the plan was never released"
            return check(builder, units)

        monkeypatch.setattr(PlanBuilder, "check", gated)

    def release(self) -> None:
        self.released.set()


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(planner, "PIECE_SAMPLES", PIECE)
    root = tmp_path / "root"
    write_images(root, [f"img_{i:02d}.png" for i in range(IMAGES)])
    return root


def killed_while_planning(root: Path, state: Path) -> tuple[str, int]:
    """What a service killed while planning leaves in `state`: the job running, its first piece recorded, the
    rest not. Returns the job's id and the piece's unit count."""
    with service_in_process(root, state, lambda batch: None) as url, httpx.Client(base_url=url) as http:
        spec = service_spec(http)
    store = JobStore(str(state))
    options = JobOptions()
    rec = store.create(str(root), spec.digest, spec.canonical_json(), options)
    store.start(rec.job_id)
    first = next(plan_pieces(str(root), spec, AllowedRoots.of([str(root)]), options, piece_samples=PIECE))
    store.record_piece(rec.job_id, first.plan.to_dict(), first.units, first.problems, [], first.samples, False)
    store.close()
    assert first.samples == PIECE
    return rec.job_id, len(first.units)


def unit_rows(state_dir: Path) -> int:
    with sqlite3.connect(state_dir / DB_NAME) as db:
        return db.execute("SELECT COUNT(*) FROM units").fetchone()[0]


def test_a_job_computes_its_first_piece_while_the_rest_is_planned(
    tmp_path: Path, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = PlanGate(monkeypatch, held=2)
    with (
        service_in_process(root, tmp_path / "state", lambda batch: None, gate.release) as url,
        httpx.Client(base_url=url, timeout=60) as http,
    ):
        job_id = http.post("/precompute", json={"data_root": str(root)}).raise_for_status().json()["job_id"]
        view = poll(
            lambda: (v := http.get(f"/jobs/{job_id}").json())["computed"] == PIECE and v,
            60,
            "the first piece computed while the plan is held at the second",
        )
        assert gate.waiting.is_set() and gate.checks == 2
        assert view["state"] == "running" and not view["planned"]
        assert view["total"] == PIECE and view["plan"]["entries"] == PIECE  # what is planned so far
        # A quarter of the root read: progress counts against the whole root, not the piece, so it does not fall.
        assert view["plan"]["read_fraction"] == PIECE / IMAGES and view["progress"] == PIECE / IMAGES
        assert len(cache_files(root)) == PIECE
        row = next(j for j in http.get("/status").json()["jobs"] if j["job_id"] == job_id)
        assert row["planned"] is False and row["total"] == PIECE
        shown = cli("status", "--server", url)
        assert shown.returncode == 0 and f"(planning: {PIECE} entries so far)" in shown.stdout, shown.stdout
        gate.release()
        final = wait_job(http, job_id)
    assert final["state"] == "finished" and final["planned"]
    assert final["total"] == final["computed"] == IMAGES and final["failed"] == 0
    assert final["plan"]["entries"] == final["plan"]["units"] == IMAGES
    assert final["plan"]["source"]["samples"] == IMAGES
    assert len(cache_files(root)) == IMAGES
    assert unit_rows(tmp_path / "state") == IMAGES


def test_a_job_resumed_while_planning_computes_what_was_recorded_then_plans_on(
    tmp_path: Path, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "state"
    job_id, recorded = killed_while_planning(root, state)
    assert recorded == PIECE

    gate = PlanGate(monkeypatch, held=1)  # the resumed plan's first check (its second piece) is held
    with (
        service_in_process(root, state, lambda batch: None, gate.release) as url,
        httpx.Client(base_url=url, timeout=60) as http,
    ):
        view = poll(
            lambda: (v := http.get(f"/jobs/{job_id}").json())["computed"] == PIECE and v,
            60,
            "the recorded piece computed before the plan goes on",
        )
        assert gate.waiting.is_set() and not view["planned"] and view["total"] == PIECE
        gate.release()
        final = wait_job(http, job_id)
    assert final["state"] == "finished" and final["planned"]
    assert final["total"] == final["computed"] == IMAGES and final["failed"] == 0  # no unit twice, none lost
    assert final["plan"]["units"] == final["plan"]["entries"] == IMAGES  # the pieces before the restart added
    assert len(cache_files(root)) == IMAGES
    assert unit_rows(state) == IMAGES


def test_a_root_changed_before_the_resume_cursor_loses_nothing(tmp_path: Path, root: Path) -> None:
    """A killed job's recorded samples are counted; the root then gains an image among them and loses two of
    them (so every later sample moves up): the resumed plan still gives every image it has now, once."""
    state = tmp_path / "state"
    job_id, _ = killed_while_planning(root, state)  # img_00 .. img_04 recorded
    write_images(root, ["img_01b.png"], seed=99)
    (root / "img_02.png").unlink()
    (root / "img_03.png").unlink()
    with service_in_process(root, state, lambda batch: None) as url, httpx.Client(base_url=url, timeout=60) as http:
        final = wait_job(http, job_id)
    images = IMAGES + 1 - 2
    assert final["state"] == "finished" and final["planned"]
    assert (final["total"], final["computed"], final["failed"]) == (PIECE + images - 3, images, 2)
    assert sorted(f["image"].rsplit("/", 1)[1] for f in final["failures"]) == ["img_02.png", "img_03.png"]
    assert len(cache_files(root)) == images  # every image the root has now
    assert unit_rows(state) == PIECE + images - 3


def episode_root(folder: Path) -> Path:
    for e in range(4):
        write_images(folder / f"ep_{e}", [f"step_{n}_MOVE_FORWARD.png" for n in range(15)], size=(32, 24), seed=e)
    return folder


@pytest.fixture(scope="module")
def spec() -> FeatureSpec:
    loaded = load_aggregator(str(TINY_MODEL))
    return FeatureSpec(
        fingerprint=loaded.fingerprint,
        architecture=loaded.config.to_dict(),
        **{**resolve_options("newjanusvln"), "size": 56},
    )


def test_a_plan_in_pieces_is_the_plan_of_the_whole_root(tmp_path: Path, spec: FeatureSpec) -> None:
    root = episode_root(tmp_path / "root")
    # A jsonl of clips over the episodes: the last five repeat earlier clips (units of an earlier piece), one
    # names a missing frame and one is not JSON (problems met by a piece).
    lines = [f'{{"images": ["ep_0/step_{n}_MOVE_FORWARD.png", "ep_1/step_{n}_MOVE_FORWARD.png"]}}' for n in range(15)]
    lines += ['{"images": ["ep_0/step_0_MOVE_FORWARD.png", "ep_9/missing.png"]}', "not json"]
    lines += [f'{{"images": ["ep_0/step_{n}_MOVE_FORWARD.png", "ep_1/step_{n}_MOVE_FORWARD.png"]}}' for n in range(5)]
    (root / "clips.jsonl").write_text("\n".join(lines) + "\n")
    allowed = AllowedRoots.of([str(root)])
    for files in (None, ["clips.jsonl"]):  # sample files win over the episodes: name them to use each
        options = JobOptions(max_history_images=3, data_files=files)
        whole = plan_work(str(root), spec, allowed, options)
        # A dry run plans it the same, in pieces let go as they are summed.
        free_space = ("free_bytes", "fits", "tightest")  # others write meanwhile
        dry = {k: v for k, v in plan_root(str(root), spec, allowed, options).to_dict().items() if k not in free_space}
        assert dry == {k: v for k, v in whole.plan.to_dict().items() if k not in free_space}
        for size in (1, 7, 1000):
            pieces = list(plan_pieces(str(root), spec, allowed, options, piece_samples=size))
            assert [p.last for p in pieces] == [False] * (len(pieces) - 1) + [True]
            assert [u for p in pieces for u in p.units] == whole.units  # each unit once, in the plan's order
            assert sorted(w for p in pieces for w in p.problems) == sorted(whole.scan.problems)
            counts = ("units", "entries", "valid", "to_compute", "problems", "bytes_to_write", "refused", "source")
            assert {k: pieces[-1].plan.to_dict()[k] for k in counts} == {k: whole.plan.to_dict()[k] for k in counts}
            assert [p.samples for p in pieces] == sorted(p.samples for p in pieces)  # the resume cursor only grows
            read = [p.plan.read_fraction for p in pieces]
            assert read == sorted(read) and read[-1] == 1.0 and (len(pieces) == 1 or 0 < read[0] < 1)
            # Resumed with the first (up to) two pieces recorded: the units of the pieces after them.
            recorded = pieces[: min(2, len(pieces) - 1)]
            skip = recorded[-1].samples if recorded else 0
            after = [u for p in pieces[len(recorded) :] for u in p.units]
            done = {u.key for p in recorded for u in p.units}
            resumed = list(
                plan_pieces(str(root), spec, allowed, options, skip_samples=skip, piece_samples=size, recorded=done)
            )
            assert [u for p in resumed for u in p.units] == after
            assert resumed[-1].plan.units == len(after)


def test_problems_after_the_last_piece_are_in_the_last_one_and_a_resume_records_them(
    tmp_path: Path, spec: FeatureSpec
) -> None:
    root = episode_root(tmp_path / "root")
    good = [f'{{"images": ["ep_0/step_{n}_MOVE_FORWARD.png"]}}' for n in range(6)]
    (root / "clips.jsonl").write_text("\n".join([*good, "not json", '{"images": ["ep_9/gone.png"]}']) + "\n")
    allowed, options = AllowedRoots.of([str(root)]), JobOptions(max_history_images=3)
    pieces = list(plan_pieces(str(root), spec, allowed, options, piece_samples=3))
    # 6 samples: pieces at 3 and 6, and the last holds what came after the sixth (no units, two problems).
    assert [(p.samples, len(p.units), len(p.problems), p.last) for p in pieces] == [
        (3, 3, 0, False),
        (6, 3, 0, False),
        (6, 0, 2, True),
    ]
    # Resumed with the first two recorded (the process died before the last): the last is not skipped.
    done = {u.key for p in pieces[:2] for u in p.units}
    [last] = plan_pieces(str(root), spec, allowed, options, skip_samples=6, piece_samples=3, recorded=done)
    assert last.last and len(last.problems) == 2 and not last.units
    # A root of problems only: one last piece, which holds them.
    (root / "clips.jsonl").write_text("not json\n[1, 2]\n")
    [only] = plan_pieces(str(root), spec, allowed, options, piece_samples=3)
    assert only.last and only.samples == 0 and len(only.problems) == 2


def test_a_plan_counts_the_free_space_it_first_saw(tmp_path: Path, spec: FeatureSpec) -> None:
    """A streamed job writes entries while it plans: the free space they use must not count against it twice."""
    root = episode_root(tmp_path / "root")
    units = [Unit.frame(str(p)) for p in sorted((root / "ep_0").iterdir())]
    builder = PlanBuilder(spec, str(root))
    builder.check(units[:5])
    before = builder.plan(SampleStream(str(root)).sample_set(), 0)
    (tmp_path / "root" / "written").write_bytes(os.urandom(8 << 20))  # what the first entries take
    builder.check(units[5:])
    after = builder.plan(SampleStream(str(root)).sample_set(), 0)
    assert after.free_bytes == before.free_bytes and after.entries == len(units)
    assert after.bytes_to_write > before.bytes_to_write > 0


def test_a_planning_jobs_progress_and_eta_count_against_the_whole_root() -> None:
    plan = {"to_compute": 100, "read_fraction": 0.25}
    rec = JobRecord(
        "j", "/r", "d", "{}", JobOptions(), JobState.RUNNING, False, 100, 50, 0, 0, False, 0.0, 0.0, None, None, plan
    )
    started = Rate(time.monotonic() - 10, 0)  # 50 computed in 10 s: 5 a second
    view = job_view(rec, started)
    assert view.progress == 0.125  # 50 of the ~400 the whole root holds, not 50 of the 100 planned so far
    assert view.eta_s is not None and 65 < view.eta_s <= 70  # ~350 left at 5 a second
    done = job_view(dataclasses.replace(rec, planned=True, plan={**plan, "read_fraction": 1.0}), started)
    assert done.progress == 0.5 and done.eta_s is not None and done.eta_s <= 10
    older = job_view(dataclasses.replace(rec, plan={"to_compute": 100}))  # a plan from before the field
    assert older.progress == 0.5
