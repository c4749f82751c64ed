"""The engine with the tiny fixture model, real images and real cache files in tmp_path."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from vggt_cache.client.cachefile import Outcome, cache_path, read_entry
from vggt_cache.service.engine import Engine, EngineStopped, Priority, UnitResult, Withdrawn
from vggt_cache.service.engine.stats import History
from vggt_cache.service.model import load_aggregator
from vggt_cache.service.model.features import entry_features
from vggt_cache.service.preprocess import preprocess
from vggt_cache.service.settings import ServiceSettings
from vggt_cache.service.units import Unit

from helpers.engine import SIZE, images, make_spec, write_image
from helpers.service import TINY_MODEL, poll, reference_features

FIXTURE = TINY_MODEL
LONG_WAIT_MS = 60_000  # batches then run when full or when nothing more is decoding: deterministic sizes


@pytest.fixture(scope="module")
def loaded():
    return load_aggregator(str(FIXTURE))


def results(futures) -> list[UnitResult]:
    return [f.result(timeout=60) for f in futures]


def statuses(done: list[UnitResult]) -> list[str]:
    return [e.status for r in done for e in r.entries]


class Gate:
    """A before_forward hook that holds the device until released, recording batch sizes."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.sizes: list[int] = []

    def __call__(self, batch: torch.Tensor) -> None:
        self.sizes.append(batch.shape[0])
        self.entered.set()
        if not self.release.wait(60):
            raise TimeoutError("the test never released the gate")


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert actual.dtype == dtype
    # Storage-dtype precision: at most about one rounding step of the stored dtype apart.
    rtol = max(torch.finfo(dtype).eps, 1e-5)
    torch.testing.assert_close(
        actual.float(), expected.to(dtype).float(), rtol=rtol, atol=1e-5 * expected.abs().max().item()
    )


@pytest.mark.parametrize(
    "attention, overrides",
    [
        ("frame", {"dtype": "bfloat16"}),
        ("sequence", {"dtype": "float32", "layers": (0, 1), "tokens": "all"}),
        ("causal", {"dtype": "float16", "layers": (-1,)}),
    ],
)
def test_entries_equal_the_models_direct_output(loaded, tmp_path, attention, overrides):
    spec = make_spec(loaded, attention=attention, **overrides)
    if attention == "frame":
        clips = [[p] for p in images(tmp_path, 4)]
    else:  # two clips of three frames: one forward for both
        clips = [images(tmp_path / "a", 3, 0), images(tmp_path / "b", 3, 10)]
    units = [Unit.for_clip(attention, clip) for clip in clips]
    with Engine(loaded, spec, max_batch_frames=8, max_wait_ms=LONG_WAIT_MS) as engine:
        done = results(engine.submit(units, Priority.ON_DEMAND, verify=True))
        assert engine.stats()["batches"] == 1
    for clip, unit, result in zip(clips, units, done, strict=True):
        expected = reference_features(loaded.model, clip, spec, "float32")
        assert [e.image for e in result.entries] == list(unit.targets)
        for entry in result.entries:
            assert entry.status == "computed", entry.error
            assert entry.grid == (3, 4)
            read = read_entry(entry.image, spec, context_frames=None if attention == "frame" else clip)
            assert read.outcome is Outcome.HIT, read.reason
            assert torch.equal(read.features, entry.features)
            assert_matches(read.features, expected[clip.index(entry.image)], spec.torch_dtype)
            assert (read.meta["context"] is None) == (attention == "frame")
    if attention == "sequence":
        assert done[0].entries[0].features.shape == (2, 5 + 12, 128)  # [L, camera + registers + patches, 2C]
    else:
        assert done[0].entries[0].features.shape == (12, 128)  # [P, 2C]


def test_overlapping_causal_clips_follow_a_rewritten_frame(loaded, tmp_path):
    spec = make_spec(loaded, attention="causal", dtype="float32")
    frames = images(tmp_path, 4)
    clips = [frames[0:3], frames[1:4]]  # sliding windows share frames 1 and 2
    units = [Unit.causal(c) for c in clips]
    with Engine(loaded, spec, max_batch_frames=8, max_wait_ms=LONG_WAIT_MS) as engine:
        results(engine.submit(units))
        write_image(Path(frames[1]), seed=55)  # a shared context frame changes
        stat = os.stat(frames[1])
        os.utime(frames[1], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
        done = results(engine.submit(units))
    assert statuses(done) == ["computed", "computed"]  # both contexts are stale now
    for clip, result in zip(clips, done, strict=True):
        expected = reference_features(loaded.model, clip, spec, "float32")[-1]
        assert_matches(result.entries[0].features, expected, spec.torch_dtype)


def test_units_submitted_together_share_forwards(loaded, tmp_path):
    paths = images(tmp_path, 6)
    with Engine(loaded, make_spec(loaded), max_batch_frames=4, max_wait_ms=LONG_WAIT_MS) as engine:
        done = results(engine.submit([Unit.frame(p) for p in paths], Priority.ON_DEMAND))
        stats = engine.stats()
    assert statuses(done) == ["computed"] * 6
    assert stats["batches"] == 2 and stats["frames"] == 6  # 4 + 2, not 6 forwards
    assert stats["units"] == {"computed": 6, "cached": 0, "failed": 0}
    assert stats["queued"] == {"on_demand": 0, "bulk": 0}
    assert stats["images_per_s"] > 0
    assert 0 < stats["busy_fraction"] <= 1
    assert stats["devices"][0]["memory"]["rss_bytes"] > 0


def test_on_demand_goes_ahead_of_a_bulk_backlog(loaded, tmp_path):
    bulk = [Unit.frame(p) for p in images(tmp_path, 8)]
    urgent = Unit.frame(write_image(tmp_path / "urgent.png", 99))
    gate = Gate()
    order: list[str] = []
    engine = Engine(
        loaded,
        make_spec(loaded),
        max_batch_frames=2,
        decode_workers=1,
        write_workers=1,
        bulk_queue_batches=2,
        before_forward=gate,
    )
    engine.start()
    try:
        # The first batch's callbacks are set before it can finish (set later, a finished future's fires at
        # once and would land after the on-demand unit's).
        bulk_futures = engine.submit(bulk[:2], Priority.BULK)  # room for them: returns at once
        for unit, future in zip(bulk[:2], bulk_futures, strict=True):
            future.add_done_callback(lambda f, name=unit.targets[0]: order.append(name))
        submitter = threading.Thread(target=lambda: bulk_futures.extend(engine.submit(bulk[2:], Priority.BULK)))
        submitter.start()
        assert gate.entered.wait(30)  # the first bulk batch holds the device
        # The bounded bulk queue makes the submitter wait: 2 batches of 2 frames, no more.
        poll(lambda: engine.pending(Priority.BULK) == 4, 30, "four bulk units waiting")
        assert submitter.is_alive()
        [urgent_future] = engine.submit([urgent], Priority.ON_DEMAND)
        urgent_future.add_done_callback(lambda f: order.append("urgent"))
        poll(lambda: engine.stats()["decoding"]["on_demand"] == 0, 30, "the on-demand unit decoded")
        gate.release.set()
        submitter.join(30)
        for unit, future in zip(bulk[2:], bulk_futures[2:], strict=True):  # queued behind the on-demand unit
            future.add_done_callback(lambda f, name=unit.targets[0]: order.append(name))
        results([*bulk_futures, urgent_future])
    finally:
        gate.release.set()
        engine.stop()
    first_batch = gate.sizes[0]
    assert gate.sizes[1] == 1  # the very next forward is the on-demand unit alone
    assert order.index("urgent") == first_batch  # only the batch already on the device finished before it
    assert len(order) == 9


def test_skip_existing_reads_valid_entries_and_recomputes_stale_ones(loaded, tmp_path):
    paths = images(tmp_path, 3)
    units = [Unit.frame(p) for p in paths]
    with Engine(loaded, make_spec(loaded), max_batch_frames=8, max_wait_ms=LONG_WAIT_MS) as engine:
        first = results(engine.submit(units))
        assert statuses(first) == ["computed"] * 3

        again = results(engine.submit(units))
        assert statuses(again) == ["cached"] * 3
        assert engine.stats()["batches"] == 1  # no compute for cached units
        for a, b in zip(first, again, strict=True):
            assert torch.equal(a.entries[0].features, b.entries[0].features)
            assert b.entries[0].grid == (3, 4)

        write_image(Path(paths[0]), seed=123)  # rewritten image: its entry is stale
        stat = os.stat(paths[0])
        os.utime(paths[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
        entry = Path(cache_path(paths[1]))
        entry.write_bytes(entry.read_bytes()[:200])  # a damaged entry (a foreign file would not be replaced)
        third = results(engine.submit(units, return_features=False))
        assert statuses(third) == ["computed", "computed", "cached"]
        assert all(e.features is None for r in third for e in r.entries)
        assert engine.stats()["batches"] == 2

        forced = results(engine.submit(units, skip_existing=False))
        assert statuses(forced) == ["computed"] * 3
        # What each on-demand unit found, as the status page shows it.
        assert engine.stats()["on_demand_lookups"] == {
            "hit": 4,
            "missing": 3,
            "stale": 1,
            "corrupt": 1,
            "spec_mismatch": 0,
            "unreadable": 0,
            "recomputed": 3,
            "failed": 0,
        }
    for p in paths:
        assert read_entry(p, make_spec(loaded)).outcome is Outcome.HIT


def test_a_corrupt_image_fails_alone(loaded, tmp_path):
    good = images(tmp_path, 3)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 definitely not a jpeg")
    missing = str(tmp_path / "missing.png")
    units = [Unit.frame(p) for p in (good[0], str(bad), good[1], missing, good[2])]
    with Engine(loaded, make_spec(loaded), max_batch_frames=8, max_wait_ms=LONG_WAIT_MS) as engine:
        done = results(engine.submit(units))
        assert engine.stats()["batches"] == 1  # the good ones still share one forward
    assert statuses(done) == ["computed", "failed", "computed", "failed", "computed"]
    assert "bad.jpg" in done[1].entries[0].error
    assert "missing.png" in done[3].entries[0].error
    assert not os.path.exists(cache_path(str(bad)))


def test_a_mismatched_clip_fails_with_a_message(loaded, tmp_path):
    frames = [write_image(tmp_path / "wide.png", 1, (80, 60)), write_image(tmp_path / "tall.png", 2, (60, 80))]
    with Engine(loaded, make_spec(loaded, attention="sequence")) as engine:
        [done] = results(engine.submit([Unit.sequence(frames)]))
    assert statuses([done]) == ["failed", "failed"]
    assert "one size" in done.entries[0].error


def test_out_of_memory_splits_the_batch_until_it_fits(loaded, tmp_path):
    def small_batches_only(batch: torch.Tensor) -> None:
        if batch.shape[0] > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")

    spec = make_spec(loaded)
    paths = images(tmp_path, 5)
    with Engine(
        loaded, spec, max_batch_frames=8, max_wait_ms=LONG_WAIT_MS, before_forward=small_batches_only
    ) as engine:
        done = results(engine.submit([Unit.frame(p) for p in paths]))
        stats = engine.stats()
    assert statuses(done) == ["computed"] * 5
    assert stats["oom_splits"] == 4  # 5 -> 2 + 3, 2 -> 1 + 1, 3 -> 1 + 2, 2 -> 1 + 1
    assert stats["batches"] == 5
    for p, r in zip(paths, done, strict=True):
        expected = reference_features(loaded.model, [p], spec, "float32")[0]
        assert_matches(r.entries[0].features, expected, spec.torch_dtype)


def test_a_unit_that_never_fits_fails_and_the_rest_go_on(loaded, tmp_path):
    def black_frames_never_fit(batch: torch.Tensor) -> None:
        if (batch.amax(dim=(1, 2, 3, 4)) == 0).any():
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")

    paths = images(tmp_path, 3)
    black = write_image(tmp_path / "black.png", 0, black=True)
    units = [Unit.frame(p) for p in (paths[0], black, paths[1], paths[2])]
    with Engine(
        loaded, make_spec(loaded), max_batch_frames=8, max_wait_ms=LONG_WAIT_MS, before_forward=black_frames_never_fit
    ) as engine:
        done = results(engine.submit(units))
    assert statuses(done) == ["computed", "failed", "computed", "computed"]
    assert "out of memory" in done[1].entries[0].error
    assert not os.path.exists(cache_path(black))


def test_an_image_rewritten_during_compute_leaves_a_stale_entry_that_verify_reports(loaded, tmp_path):
    [path] = images(tmp_path, 1)

    def rewrite_once(batch: torch.Tensor) -> None:
        if not rewritten:
            rewritten.append(True)
            write_image(Path(path), seed=7, size=(84, 63))

    rewritten: list[bool] = []
    spec = make_spec(loaded)
    with Engine(loaded, spec, before_forward=rewrite_once) as engine:
        [done] = results(engine.submit([Unit.frame(path)], verify=True))
        assert done.entries[0].status == "failed"
        assert "verify failed" in done.entries[0].error
        assert read_entry(path, spec).outcome is Outcome.STALE  # stat-ed before decoding
        [again] = results(engine.submit([Unit.frame(path)], verify=True))
    assert again.entries[0].status == "computed"
    assert read_entry(path, spec).outcome is Outcome.HIT


def test_submit_is_thread_safe(loaded, tmp_path):
    paths = images(tmp_path, 12)
    futures: list = []
    lock = threading.Lock()

    def client(chunk: list[str]) -> None:
        got = engine.submit([Unit.frame(p) for p in chunk], Priority.ON_DEMAND)
        with lock:
            futures.extend(got)

    with Engine(loaded, make_spec(loaded), max_batch_frames=4) as engine:
        threads = [threading.Thread(target=client, args=(paths[i::4],)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        done = results(futures)
        assert engine.stats()["units"]["computed"] == 12
    assert sorted(r.entries[0].image for r in done) == sorted(paths)
    assert statuses(done) == ["computed"] * 12


def test_stop_finishes_the_batch_in_flight_and_fails_queued_units(loaded, tmp_path):
    paths = images(tmp_path, 3)
    gate = Gate()
    engine = Engine(loaded, make_spec(loaded), max_batch_frames=1, before_forward=gate)
    engine.start()
    assert engine.ready
    [running] = engine.submit([Unit.frame(paths[0])])
    assert gate.entered.wait(30)
    queued = engine.submit([Unit.frame(p) for p in paths[1:]])
    stopper = threading.Thread(target=engine.stop)
    stopper.start()
    for future in queued:
        with pytest.raises(EngineStopped, match="service shutting down"):
            future.result(timeout=30)
    gate.release.set()
    stopper.join(30)
    assert not stopper.is_alive() and engine.stopped and not engine.ready
    assert running.result(timeout=30).entries[0].status == "computed"
    assert read_entry(paths[0], make_spec(loaded)).outcome is Outcome.HIT
    with pytest.raises(EngineStopped):
        engine.submit([Unit.frame(paths[1])])


def test_withdrawn_units_leave_the_queue_and_only_the_batch_on_the_device_finishes(loaded, tmp_path):
    paths = images(tmp_path, 6)
    gate = Gate()
    with Engine(loaded, make_spec(loaded), max_batch_frames=1, before_forward=gate) as engine:
        [running] = engine.submit([Unit.frame(paths[0])], Priority.BULK)
        assert gate.entered.wait(30)
        queued = engine.submit([Unit.frame(p) for p in paths[1:]], Priority.BULK, block=False)
        poll(lambda: engine.stats()["decoding"]["bulk"] == 0, 30, "the queued units decoded")
        assert engine.withdraw([running, *queued]) == 5  # the one on the device is past recall
        for future in queued:
            with pytest.raises(Withdrawn, match="its job was cancelled"):
                future.result(timeout=30)
        assert engine.pending(Priority.BULK) == 0
        gate.release.set()
        assert running.result(timeout=30).entries[0].status == "computed"
        assert engine.withdraw(queued) == 0
        assert engine.stats()["batches"] == 1
    assert [read_entry(p, make_spec(loaded)).outcome for p in paths] == [Outcome.HIT] + [Outcome.MISSING] * 5


def test_history_gives_complete_intervals_per_second():
    history = History(interval_s=5.0, intervals=3)
    history.add(0.5, 3)
    history.add(4.9, 2)
    history.add(7.0, 5)
    history.add(11.0, 9)  # the interval in progress is not shown
    assert history.per_second(12.0) == [0.0, 1.0, 1.0]
    assert history.per_second(30.0) == [0.0, 0.0, 0.0]


def episode_clips(folder: Path, steps: int) -> list[tuple[str, ...]]:
    """Nine-frame histories of an episode, as JanusVLN builds them (step 0 pads, then linspace)."""
    frames = images(folder, steps)
    return [
        tuple([frames[0]] * (8 - j) + frames[: j + 1])
        if j <= 8
        else tuple(frames[i] for i in np.linspace(0, j, 9, dtype=int))
        for j in range(steps)
    ]


def test_overlapping_padded_histories_decode_each_frame_once(tmp_path, loaded):
    # Nine-frame histories of a 12-step episode (steps repeat, step 0 pads): 108 frames, 12 distinct.
    clips = episode_clips(tmp_path / "ep", 12)
    spec = make_spec(loaded, attention="causal", reference_frame="last")
    with Engine(loaded, spec, max_batch_frames=18, decode_workers=4) as engine:
        done = results(engine.submit([Unit.causal(c) for c in clips], return_features=False))
        stats = engine.stats()
    assert statuses(done) == ["computed"] * 12
    assert (stats["frames_decoded"], stats["frames_reused"]) == (12, 108 - 12)


@pytest.mark.parametrize("budget_frames", [None, 0])
def test_a_frame_is_embedded_once_for_every_clip_that_shares_it(tmp_path, loaded, budget_frames):
    # One clip a batch, so reuse crosses batches; with no budget only a clip's own repeats are shared.
    clips = episode_clips(tmp_path / "ep", 12)
    spec = make_spec(loaded, attention="causal", dtype="float32", reference_frame="last")
    budget = {} if budget_frames is None else {"patch_cache_bytes": budget_frames}
    with Engine(loaded, spec, max_batch_frames=9, decode_workers=1, **budget) as engine:
        done = results(engine.submit([Unit.causal(c) for c in clips]))
        stats = engine.stats()
    embedded = 12 if budget_frames is None else sum(len(set(c)) for c in clips)
    cache = stats["patch_cache"]
    assert (cache["embedded"], cache["reused"]) == (embedded, 108 - embedded)
    assert cache["frames"] == (12 if budget_frames is None else 0)
    for clip, result in zip(clips, done, strict=True):  # equal to each clip computed alone, from its own pixels
        alone = torch.stack([preprocess(p, spec.preprocess, spec.size) for p in clip])[None]
        expected = entry_features(loaded.model, alone, spec)[0, 0]
        torch.testing.assert_close(result.entries[0].features, expected, rtol=1e-5, atol=1e-5 * expected.abs().max())


def test_each_device_keeps_its_own_patch_cache(tmp_path, loaded):
    # Device A is held before its batch's patch lookup while device B runs the next clip: each
    # device embeds frame 0 itself (a copy between GPUs would queue behind the other's forward).
    clips = episode_clips(tmp_path / "ep", 2)  # [0]*9 and [0]*8 + [1]
    spec = make_spec(loaded, attention="causal", dtype="float32")
    gate = Gate()
    first = threading.Event()

    def hold_the_first_batch(batch: torch.Tensor) -> None:
        if not first.is_set():
            first.set()
            gate(batch)

    engine = Engine(loaded, spec, devices=["cpu", "cpu"], max_batch_frames=9, before_forward=hold_the_first_batch)
    with engine:
        held = engine.submit([Unit.causal(clips[0])])[0]
        assert gate.entered.wait(30)
        second = results(engine.submit([Unit.causal(clips[1])]))[0]  # the other device runs it meanwhile
        gate.release.set()
        done = [held.result(timeout=60), second]
        stats = engine.stats()
    assert statuses(done) == ["computed", "computed"]
    assert [d["batches"] for d in stats["devices"]] == [1, 1]
    assert (stats["patch_cache"]["embedded"], stats["patch_cache"]["reused"]) == (3, 15)
    assert stats["patch_cache"]["budget_bytes"] == 2 * (ServiceSettings.patch_cache_mb << 20)
    for clip, result in zip(clips, done, strict=True):
        alone = torch.stack([preprocess(p, spec.preprocess, spec.size) for p in clip])[None]
        expected = entry_features(loaded.model, alone, spec)[0, 0]
        torch.testing.assert_close(result.entries[0].features, expected, rtol=1e-5, atol=1e-5 * expected.abs().max())


def test_units_in_lanes_on_two_devices_equal_each_clip_computed_alone(tmp_path, loaded):
    # Two episodes, one a lane, a unit of each in turn as a job runner submits them (routing: test_scheduler.py).
    clips = {0: episode_clips(tmp_path / "a", 5), 1: episode_clips(tmp_path / "b", 5)}
    spec = make_spec(loaded, attention="causal", dtype="float32")
    assert Engine(loaded, make_spec(loaded), devices=["cpu", "cpu"]).lanes == 1  # frame mode shares no frames
    assert Engine(loaded, spec, devices=["cpu", "cpu"], patch_cache_bytes=0).lanes == 1  # no cache to keep together
    with Engine(loaded, spec, devices=["cpu", "cpu"], max_batch_frames=9) as engine:
        assert engine.lanes == 2
        for priority, lanes in ((Priority.BULK, [2]), (Priority.ON_DEMAND, [0])):
            with pytest.raises(ValueError, match=r"give bulk units one lane each in 0\.\.1"):
                engine.submit([Unit.causal(clips[0][0])], priority, lanes=lanes)
        keys = [(lane, i) for i in range(5) for lane in clips]
        futures = dict(
            zip(
                keys,
                engine.submit(
                    [Unit.causal(clips[lane][i]) for lane, i in keys], Priority.BULK, lanes=[lane for lane, _ in keys]
                ),
                strict=True,
            )
        )
        done = {key: f.result(timeout=60) for key, f in futures.items()}
        stats = engine.stats()
    assert sum(d["batches"] for d in stats["devices"]) == 10
    for (lane, i), result in done.items():
        clip = clips[lane][i]
        alone = torch.stack([preprocess(p, spec.preprocess, spec.size) for p in clip])[None]
        expected = entry_features(loaded.model, alone, spec)[0, 0]
        torch.testing.assert_close(result.entries[0].features, expected, rtol=1e-5, atol=1e-5 * expected.abs().max())


def test_a_bulk_job_on_two_devices_runs_in_lanes_and_writes_every_entry(tmp_path, loaded):
    from vggt_cache.client.spec import preset_options
    from vggt_cache.service.jobs.runner import JobManager
    from vggt_cache.service.jobs.store import JobStore
    from vggt_cache.service.paths import AllowedRoots
    from vggt_cache.service.runtime import model_info

    root = tmp_path / "data"
    for episode, seed in (("ep_a", 0), ("ep_b", 50)):
        (root / episode).mkdir(parents=True)
        for i in range(6):
            write_image(root / episode / f"step_{i}_MOVE_FORWARD.png", seed + i)
    spec = make_spec(loaded, **{**preset_options("newjanusvln"), "dtype": "float32", "size": SIZE})
    store = JobStore(str(tmp_path / "state"))
    with Engine(loaded, spec, devices=["cpu", "cpu"], max_batch_frames=9) as engine:
        jobs = JobManager(store, engine, spec, AllowedRoots.of([str(root)]), model_info(loaded, engine))
        view = jobs.run(jobs.submit(str(root)).job_id)
        stats = engine.stats()
    store.close()
    assert (view.state, view.computed, view.failed) == ("finished", 12, 0)
    assert sum(d["batches"] for d in stats["devices"]) == 12
    cache = stats["patch_cache"]
    assert cache["embedded"] + cache["reused"] == 12 * 9
    # Each device embeds its own episode's 6 frames; the first one done may take the other's last
    # clips, whose frames it has not seen (6 more at most). Without lanes: 22 here, each device
    # embedding most frames of both episodes.
    assert 12 <= cache["embedded"] <= 18
    for episode in ("ep_a", "ep_b"):
        last = str(root / episode / "step_5_MOVE_FORWARD.png")
        assert read_entry(last, spec).hit


def test_the_patch_cache_keeps_the_most_recent_frames_within_its_budget(loaded):
    from vggt_cache.service.engine.patches import PatchCache

    frames = torch.rand(1, 4, 3, 42, 56)  # [B, S, 3, H, W]
    one_frame = 12 * loaded.config.embed_dim * 4  # a 3x4 grid of float32 tokens
    cache = PatchCache(budget_bytes=2 * one_frame)
    key = [("a", 1, 1), ("b", 1, 1), ("c", 1, 1), ("a", 1, 1)]
    tokens = cache.patches(loaded.model, frames, [key])  # a, b, c embedded (a repeats): b and c kept
    assert tokens.shape == (1, 4, 12, loaded.config.embed_dim) and torch.equal(tokens[0, 0], tokens[0, 3])
    assert (cache.embedded, cache.reused, len(cache), cache.nbytes) == (3, 1, 2, 2 * one_frame)
    cache.patches(loaded.model, frames[:, :1], [[("a", 1, 1)]])  # evicted: embedded again, b goes
    cache.patches(loaded.model, frames[:, :1], [[("c", 1, 1)]])  # still kept
    assert (cache.embedded, cache.reused) == (4, 2)
    cache.patches(loaded.model, frames[:, :1], [[("b", 1, 1)]])
    assert (cache.embedded, cache.reused, len(cache)) == (5, 2, 2)
    with pytest.raises(ValueError, match="frame keys"):
        cache.patches(loaded.model, frames, [key[:3]])


def test_a_repeated_frame_in_sequence_mode_keeps_its_last_positions_output(tmp_path, loaded):
    a, b = images(tmp_path / "seq", 2)
    spec = make_spec(loaded, attention="sequence", dtype="float32")
    clip = (a, a, b, a)  # a padded history repeats frames; `a` is also the current view
    with Engine(loaded, spec, max_batch_frames=8) as engine:
        [done] = results(engine.submit([Unit.sequence(clip)]))
    assert [e.image for e in done.entries] == [a, b]
    frames = torch.stack([preprocess(p, spec.preprocess, spec.size) for p in clip])
    expected = entry_features(loaded.model, frames[None], spec)[0]  # [4, P, C], one per position
    assert torch.equal(done.entries[0].features, expected[3]) and torch.equal(done.entries[1].features, expected[2])
    assert not torch.equal(expected[0], expected[3])  # position matters: frame 0 gets the first-frame tokens


def test_a_hint_never_waits_it_is_taken_within_its_room_or_refused_whole(tmp_path, loaded):
    from vggt_cache.service.engine import QueueFull

    frames = images(tmp_path / "hints", 12)
    gate = Gate()
    # Bulk backlog 2 frames (1 batch of 2), room for hints 4 more (2 batches).
    with Engine(
        loaded, make_spec(loaded), max_batch_frames=2, bulk_queue_batches=1, hint_queue_batches=2, before_forward=gate
    ) as engine:
        try:
            first = engine.submit([Unit.frame(frames[0])], Priority.BULK, block=False)  # held on the device
            assert gate.entered.wait(30)
            held = engine.submit([Unit.frame(p) for p in frames[1:7]], Priority.BULK, block=False)  # empty: taken
            with pytest.raises(QueueFull, match="bulk queue is full"):
                engine.submit([Unit.frame(frames[7])], Priority.BULK, block=False)  # 6 + 1 > 2 + 4, at once
            assert engine.pending(Priority.BULK) == 6
        finally:
            gate.release.set()
        assert statuses(results(first + held)) == ["computed"] * 7
        assert statuses(results(engine.submit([Unit.frame(frames[7])], Priority.BULK, block=False))) == ["computed"]
