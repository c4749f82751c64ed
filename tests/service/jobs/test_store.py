import contextlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from vggt_cache.client.wire import EntryStatus
from vggt_cache.service.jobs.options import JobOptions
from vggt_cache.service.jobs.records import JobRecord
from vggt_cache.service.jobs.store import DB_NAME, JobStore
from vggt_cache.service.units import Unit

SPEC = '{"attention":"frame"}'
OPTIONS = JobOptions()
PLAN = {"entries": 0}


@pytest.fixture
def store(tmp_path):
    s = JobStore(str(tmp_path / "state"))
    yield s
    s.close()


def frame_units(n: int) -> list[Unit]:
    return [Unit.frame(f"/data/{i:06d}.jpg") for i in range(n)]


def test_a_created_job_round_trips_as_a_record(store, tmp_path):
    job = store.create(str(tmp_path / "root") + "/", "d1", SPEC, JobOptions(verify=True, data_files=["a.jsonl"]))
    assert isinstance(job, JobRecord)
    assert re.fullmatch(r"[0-9a-f]{32}", job.job_id), job.job_id
    assert job.data_root == str(tmp_path / "root")  # normalised: no trailing slash
    assert (job.state, job.planned, job.total, job.done) == ("queued", False, 0, 0)
    assert job.options == JobOptions(verify=True, data_files=("a.jsonl",))
    assert job.started_at is None and job.finished_at is None and not job.cancel_requested
    assert store.get(job.job_id) == job
    assert store.get("0" * 32) is None
    assert json.loads(job.spec_json) == {"attention": "frame"}
    assert os.path.exists(os.path.join(tmp_path, "state", DB_NAME))
    mode = sqlite3.connect(store.path).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_an_active_job_is_reused_until_it_ends(store):
    first = store.create("/data/a", "d1", SPEC, OPTIONS)
    assert store.create("/data/a", "d1", SPEC, JobOptions(verify=True)).job_id == first.job_id
    assert store.create("/data/a", "d2", SPEC, OPTIONS).job_id != first.job_id
    assert store.create("/data/b", "d1", SPEC, OPTIONS).job_id != first.job_id
    store.start(first.job_id)
    assert store.create("/data/a", "d1", SPEC, OPTIONS).job_id == first.job_id
    store.finish(first.job_id, "finished")
    again = store.create("/data/a", "d1", SPEC, OPTIONS)
    assert again.job_id != first.job_id and again.state == "queued"


def test_racing_creators_get_the_same_job(tmp_path):
    # Separate stores stand in for separate processes: the database must arbitrate.
    stores = [JobStore(str(tmp_path)) for _ in range(4)]
    barrier = threading.Barrier(16)

    def create(i: int) -> str:
        barrier.wait()
        return stores[i % 4].create("/data/race", "d", SPEC, JobOptions(max_history_images=1 + i % 4)).job_id

    with ThreadPoolExecutor(16) as pool:
        ids = set(pool.map(create, range(16)))
    assert len(ids) == 1
    assert len(stores[0].list_jobs()) == 1
    for s in stores:
        s.close()


def test_results_update_counters_failures_and_pending_units(store):
    job = store.create("/data", "d", SPEC, OPTIONS)
    units = [*frame_units(3), Unit.sequence(("/data/s0.jpg", "/data/s1.jpg"))]
    planned = store.record_plan(job.job_id, PLAN, units, problems=[("/data/s.jsonl:7", "malformed sample")])
    assert planned.planned and planned.total == 3 + 2 + 1 and planned.failed == 1 and planned.plan == PLAN
    assert store.pending_units(job.job_id) == list(enumerate(units))

    store.record_results(
        job.job_id, [(0, "computed", None, "/data/000000.jpg"), (1, "cached", None, "/data/000001.jpg")]
    )
    after = store.record_results(
        job.job_id,
        [
            (3, "computed", None, "/data/s0.jpg"),
            (3, "failed", "ImageError: truncated", "/data/s1.jpg"),
        ],
    )
    assert (after.computed, after.skipped, after.failed) == (2, 1, 2)
    assert store.pending_units(job.job_id) == [(2, units[2])]
    assert store.failures(job.job_id) == [
        ("/data/s.jsonl:7", "malformed sample"),
        ("/data/s1.jpg", "ImageError: truncated"),
    ]
    assert store.failures(job.job_id, limit=1) == [("/data/s.jsonl:7", "malformed sample")]

    # A replay after a crash (the same unit recorded again) counts nothing twice.
    replay = store.record_results(job.job_id, [(0, "computed", None, "/data/000000.jpg")])
    assert replay.done == after.done


def test_bad_results_are_refused_without_partial_writes(store):
    job = store.create("/data", "d", SPEC, OPTIONS)
    store.record_plan(job.job_id, PLAN, frame_units(2))
    with pytest.raises(ValueError, match="outcome"):
        store.record_results(job.job_id, [(0, "computed", None, "a"), (1, "exploded", None, "b")])
    with pytest.raises(KeyError):
        store.record_results(job.job_id, [(0, "computed", None, "a"), (9, "computed", None, "b")])
    assert store.get(job.job_id).done == 0
    assert len(store.pending_units(job.job_id)) == 2
    with pytest.raises(ValueError, match="already planned"):
        store.record_plan(job.job_id, PLAN, frame_units(1))
    with pytest.raises(KeyError):
        store.record_plan("f" * 32, PLAN, frame_units(1))
    with pytest.raises(ValueError, match="outcome"):  # a plan with a bad result leaves the job unplanned
        store.record_plan(
            store.create("/other", "d", SPEC, OPTIONS).job_id,
            PLAN,
            frame_units(1),
            results=[(0, "exploded", None, "a")],
        )
    assert not store.list_jobs(limit=1)[0].planned and store.list_jobs(limit=1)[0].plan is None


def test_a_plan_records_its_units_and_the_results_known_before_any_decode(store):
    job = store.create("/data", "d", SPEC, OPTIONS)
    units = frame_units(4)
    planned = store.record_plan(
        job.job_id,
        PLAN,
        units,
        results=[
            (0, EntryStatus.FAILED, "a sample of 99 frames", "/data/000000.jpg"),
            (2, EntryStatus.CACHED, None, "/data/000002.jpg"),
        ],
    )
    assert (planned.total, planned.skipped, planned.failed, planned.computed) == (4, 1, 1, 0)
    assert store.pending_units(job.job_id) == [(1, units[1]), (3, units[3])]
    assert store.failures(job.job_id) == [("/data/000000.jpg", "a sample of 99 frames")]


def test_a_plan_recorded_in_pieces_numbers_its_units_on_and_is_planned_with_its_last(store):
    job = store.create("/data", "d", SPEC, OPTIONS)
    clips = [Unit.sequence((f"/data/{i}.jpg", f"/data/{i + 1}.jpg")) for i in range(6)]
    rec, first = store.record_piece(
        job.job_id, {"entries": 6}, clips[:3], [("/data/a.jsonl:2", "malformed sample")], [], 3, False
    )
    assert first == 0 and not rec.planned and rec.planned_samples == 3
    assert (rec.total, rec.failed) == (3 * 2 + 1, 1)  # the piece's targets and its problem
    # The second piece's results are numbered within it; a frame it shares with the first is stored again.
    rec, first = store.record_piece(
        job.job_id,
        {"entries": 12},
        clips[3:],
        [],
        [(1, EntryStatus.CACHED, None, "/data/4.jpg"), (1, EntryStatus.CACHED, None, "/data/5.jpg")],
        6,
        False,
    )
    assert first == 3 and rec.planned_samples == 6 and rec.plan == {"entries": 12}
    assert (rec.total, rec.skipped) == (6 * 2 + 1, 2)
    assert [idx for idx, _ in store.pending_units(job.job_id)] == [0, 1, 2, 3, 5]
    assert store.pending_units(job.job_id, 3, 6) == [(3, clips[3]), (5, clips[5])]
    assert store.pending_units(job.job_id, 0, 3) == list(enumerate(clips[:3]))
    rec, first = store.record_piece(job.job_id, {"entries": 12}, [], [], [], 6, True)
    assert first == 6 and rec.planned and rec.total == 13
    with pytest.raises(ValueError, match="already planned"):
        store.record_piece(job.job_id, {}, clips[:1], [], [], 7, True)


def test_state_changes_stamp_times_and_terminal_states_are_final(store):
    job = store.create("/data", "d", SPEC, OPTIONS)
    running = store.start(job.job_id)
    assert running.started_at is not None and running.finished_at is None
    with pytest.raises(ValueError, match="a job ends"):
        store.finish(job.job_id, "running")
    failed = store.finish(job.job_id, "failed", error="CUDA out of memory")
    assert failed.error == "CUDA out of memory" and failed.finished_at >= running.started_at
    with pytest.raises(ValueError, match="already failed"):
        store.start(job.job_id)
    with pytest.raises(ValueError, match="already failed"):
        store.finish(job.job_id, "finished")
    with pytest.raises(ValueError, match="state must be"):
        store.finish(job.job_id, "paused")


def test_a_refused_plan_fails_the_job_and_keeps_the_plan(store):
    job = store.create("/data", "d", SPEC, OPTIONS)
    store.start(job.job_id)
    refused = store.refuse(job.job_id, {"entries": 9, "fits": False}, "not enough free space")
    assert (refused.state, refused.error, refused.plan, refused.planned) == (
        "failed",
        "not enough free space",
        {"entries": 9, "fits": False},
        False,
    )
    assert refused.finished_at is not None


def test_cancel_is_immediate_when_queued_and_a_flag_when_running(store):
    queued = store.create("/data/q", "d", SPEC, OPTIONS)
    cancelled = store.cancel(queued.job_id)
    assert cancelled.state == "cancelled" and cancelled.finished_at is not None

    running = store.create("/data/r", "d", SPEC, OPTIONS)
    store.start(running.job_id)
    assert not store.cancel_requested(running.job_id)
    flagged = store.cancel(running.job_id)
    assert flagged.state == "running" and store.cancel_requested(running.job_id)
    assert store.finish(running.job_id, "cancelled").state == "cancelled"

    done = store.create("/data/f", "d", SPEC, OPTIONS)
    store.finish(done.job_id, "finished")
    assert store.cancel(done.job_id).state == "finished"
    with pytest.raises(KeyError):
        store.cancel_requested("0" * 32)


def test_a_reopened_store_resumes_exactly_the_pending_units(tmp_path):
    first = JobStore(str(tmp_path))
    job = first.create("/data", "d", SPEC, OPTIONS)
    other = first.create("/data/done", "d", SPEC, OPTIONS)
    first.finish(other.job_id, "finished")
    first.start(job.job_id)
    units = frame_units(10)
    first.record_plan(job.job_id, PLAN, units)
    first.record_results(job.job_id, [(i, "computed", None, units[i].frames[0]) for i in (0, 1, 2, 5)])
    first.close()

    second = JobStore(str(tmp_path))
    assert [j.job_id for j in second.unfinished_jobs()] == [job.job_id]
    resumed = second.get(job.job_id)
    assert (resumed.state, resumed.computed, resumed.total) == ("running", 4, 10)
    assert [i for i, _ in second.pending_units(job.job_id)] == [3, 4, 6, 7, 8, 9]
    assert [j.job_id for j in second.list_jobs(limit=1)] == [other.job_id]  # newest first
    second.close()


def test_planning_a_hundred_thousand_units_is_fast(store):
    job = store.create("/data", "d", SPEC, OPTIONS)
    units = [Unit.causal(tuple(f"/data/ep/{j:06d}.jpg" for j in range(max(0, i - 7), i + 1))) for i in range(100_000)]
    start = time.perf_counter()
    store.record_plan(job.job_id, PLAN, units)
    pending = store.pending_units(job.job_id)
    elapsed = time.perf_counter() - start
    assert len(pending) == 100_000 and pending[-1] == (99_999, units[-1])
    assert elapsed < 10, f"plan + read back took {elapsed:.1f}s"


def causal_episode_units(episodes: int, steps: int) -> list[Unit]:
    """NewJanusVLN's units: each step's clip is the step and up to 8 steps before it."""
    folders = [f"/mnt/nfs/datasets/R2R-CE/train/episode_{e:06d}" for e in range(episodes)]
    frames = [[f"{folder}/step_{n}_MOVE_FORWARD.jpg" for n in range(steps)] for folder in folders]
    return [Unit.causal(tuple(names[max(0, n - 8) : n + 1])) for names in frames for n in range(steps)]


def test_each_path_is_stored_once_and_units_read_back_as_planned(tmp_path):
    store = JobStore(str(tmp_path))
    job = store.create("/mnt/nfs/datasets/R2R-CE/train", "d", SPEC, OPTIONS)
    units = causal_episode_units(episodes=100, steps=35)
    store.record_plan(job.job_id, PLAN, units)
    store.record_results(job.job_id, [(3, "computed", None, units[3].targets[0])])
    assert paths_stored(store) == 3500  # each frame once, not nine times
    assert store.pending_units(job.job_id) == [(i, u) for i, u in enumerate(units) if i != 3]
    store.start_units(job.job_id, [7, 40])
    assert store.fail_tried(job.job_id, 1, "poison") == [(7, units[7]), (40, units[40])]
    store.finish(job.job_id, "finished")
    store.close()  # the last connection: the WAL is written back into the file and removed

    # ~240 bytes of SQLite a unit (paths of 66 characters): was ~770, with every frame's path in every unit
    assert not os.path.exists(store.path + "-wal")
    assert os.path.getsize(store.path) < 400 * len(units), os.path.getsize(store.path)
    reopened = JobStore(str(tmp_path))
    assert reopened.prune(keep=0, max_age_s=0) == 1
    assert paths_stored(reopened) == 0
    reopened.close()


def paths_stored(store: JobStore) -> int:
    with contextlib.closing(sqlite3.connect(store.path)) as db:
        return db.execute("SELECT COUNT(*) FROM paths").fetchone()[0]


def test_paths_that_are_not_utf8_round_trip(store):
    job = store.create("/data", "d", SPEC, OPTIONS)
    names = [os.fsdecode(b"/data/ep/\xff\xfe.png"), "/data/ep/line\nbreak.png", "/data/ep/caf\u00e9.png"]
    units = [Unit.causal(tuple(names[: i + 1])) for i in range(3)]
    store.record_plan(job.job_id, PLAN, units)
    assert store.pending_units(job.job_id) == list(enumerate(units))


def test_units_an_older_release_stored_as_paths_are_still_resumed(store):
    job = store.create("/data", "d", SPEC, OPTIONS)
    store.record_plan(job.job_id, PLAN, [])
    frames = ["/data/ep/0.jpg", "/data/ep/1.jpg"]
    with sqlite3.connect(store.path) as db:  # a row as releases before interned paths wrote it
        db.execute(
            "INSERT INTO units (job_id, idx, frames_json, targets_json) VALUES (?, 0, ?, ?)",
            (job.job_id, json.dumps(frames), json.dumps(frames[-1:])),
        )
    assert store.pending_units(job.job_id) == [(0, Unit.causal(tuple(frames)))]


_RECORDER = r"""
import sys
from vggt_cache.service.jobs.options import JobOptions
from vggt_cache.service.jobs.store import JobStore
from vggt_cache.service.units import Unit

store = JobStore(sys.argv[1])
job = store.create("/data/kill", "d", "{}", JobOptions())
store.start(job.job_id)
if not store.get(job.job_id).planned:
    store.record_plan(job.job_id, {}, [Unit.sequence((f"/d/{i}a.jpg", f"/d/{i}b.jpg")) for i in range(100000)])
print(job.job_id, flush=True)
for idx, unit in store.pending_units(job.job_id):
    a, b = unit.targets
    store.record_results(job.job_id, [(idx, "computed", None, a),
                                      (idx, "failed" if idx % 3 == 0 else "cached", "bad", b)])
    if idx % 50 == 0:
        print(idx, flush=True)
"""


def test_sigkill_mid_write_leaves_counters_equal_to_rows(tmp_path):
    script = tmp_path / "recorder.py"
    script.write_text(_RECORDER)
    state = str(tmp_path / "state")
    job_id, previously_done = None, 0
    for kill_after in (3, 7):  # second round resumes the same job, then is killed again
        proc = subprocess.Popen([sys.executable, str(script), state], stdout=subprocess.PIPE, text=True)
        try:
            job_id = proc.stdout.readline().split()[0]
            for _ in range(kill_after):  # lines arrive while the recorder keeps writing
                assert proc.stdout.readline(), "recorder exited early"
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(timeout=30) == -signal.SIGKILL
        finally:
            proc.kill()
            proc.stdout.close()

        store = JobStore(state)
        job = store.get(job_id)
        db = sqlite3.connect(store.path)
        done, failed_units = db.execute(
            "SELECT SUM(state != 'pending'), SUM(state = 'failed') FROM units WHERE job_id = ?", (job_id,)
        ).fetchone()
        failure_rows = db.execute("SELECT COUNT(*) FROM failures WHERE job_id = ?", (job_id,)).fetchone()[0]
        db.close()
        assert done > max(previously_done, (kill_after - 1) * 50)  # idx 0, 50, 100, ... were printed
        previously_done = done
        assert job.computed == done
        assert job.computed + job.skipped + job.failed == 2 * done
        assert job.failed == failed_units == failure_rows
        assert len(store.pending_units(job_id)) == 100_000 - done
        assert [j.job_id for j in store.unfinished_jobs()] == [job_id]
        store.close()


def test_a_state_dir_from_before_job_plans_is_upgraded_in_place(tmp_path):
    from vggt_cache.service.jobs.schema import SCHEMA

    # the jobs and units tables without their newer columns
    first_release = SCHEMA.replace(",\n    plan_json TEXT", "").replace(
        "\n    attempts INTEGER NOT NULL DEFAULT 0,", ""
    )
    assert "plan_json" not in first_release and "attempts" not in first_release
    with sqlite3.connect(tmp_path / DB_NAME) as db:
        db.executescript(first_release)
        db.execute(
            "INSERT INTO jobs (job_id, data_root, spec_digest, spec_json, options_json, state, created_at) "
            "VALUES ('old', '/data', 'd', '{}', '{}', 'finished', 1.0)"
        )
    store = JobStore(str(tmp_path))
    old = store.get("old")
    assert old.plan is None and old.state == "finished" and old.options == JobOptions()  # '{}': the defaults
    assert JobStore(str(tmp_path)).get("old") == old  # opening it again changes nothing
    running = store.create("/other", "d", SPEC, OPTIONS)
    assert store.record_plan(running.job_id, {"entries": 1}, [Unit.frame("/other/a.png")]).plan == {"entries": 1}
    store.start_units(running.job_id, [0])
    assert store.fail_tried(running.job_id, 2, "poison") == []
    store.start_units(running.job_id, [0])
    assert store.fail_tried(running.job_id, 2, "poison") == [(0, Unit.frame("/other/a.png"))]
    assert store.pending_units(running.job_id) == []
    assert store.failures(running.job_id) == [("/other/a.png", "poison")] and store.get(running.job_id).failed == 1
