"""The one sample parser: JSONL lines, JSON sample arrays (JanusVLN), episode folders (NewJanusVLN), loose images."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import numpy as np
import pytest

from vggt_cache.service import samplepaths
from vggt_cache.service.paths import AllowedRoots
from vggt_cache.service.samplepaths import _joined
from vggt_cache.service.samples import SampleStream, find_samples, history_indices
from vggt_cache.service.sources import scan_data_root

from helpers.service import FIXTURES

FIXTURE = FIXTURES / "janusvln"


def touch(path: Path, content: bytes = b"img") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def episode(folder: Path, actions: list[str], ext: str = "png") -> list[str]:
    """Step frames (and per-step descriptions) written in a scrambled order; returns the frames by step."""
    frames = [str(folder / f"step_{n}_{a}.{ext}") for n, a in enumerate(actions)]
    for n in reversed(range(len(actions))):
        touch(Path(frames[n]))
        (folder / f"step_{n}_{actions[n]}.json").write_text('{"landmark_description": "a door"}')
    (folder / "milestones_result.json").write_text('{"instruction_text": "walk"}')
    return frames


@pytest.mark.parametrize("layout", ["new", "orig"])
def test_both_janusvln_layouts_give_the_samples_their_training_builds(layout):
    expected = json.loads((FIXTURE / "samples.json").read_text())[layout]
    found = find_samples(str(FIXTURE / layout))
    root = str(FIXTURE / layout)
    assert [[p[len(root) + 1 :] for p in s.frames] for s in found.samples] == expected
    assert found.problems == []
    assert found.source == {"new": "episodes", "orig": "json"}[layout]  # orig's meta.json is not a sample file
    assert found.describe()["samples"] == len(expected)


def test_history_rule_pads_with_the_first_step_then_follows_numpy_linspace():
    assert history_indices(0, 8) == [0] * 9
    assert history_indices(3, 8) == [0, 0, 0, 0, 0, 0, 1, 2, 3]
    assert history_indices(8, 8) == list(range(9))
    assert history_indices(10, 8) == [0, 1, 2, 3, 5, 6, 7, 8, 10]
    for step in range(9, 200):
        for history in (1, 4, 8, 15):
            if step > history:
                assert history_indices(step, history) == np.linspace(0, step, history + 1, dtype=int).tolist()
    with pytest.raises(ValueError, match="at least 1"):
        history_indices(3, 0)
    with pytest.raises(ValueError, match="at least 1"):
        find_samples(".", max_history_images=0)


def test_episode_steps_sort_numerically_and_every_step_is_a_sample(tmp_path):
    actions = ["MOVE_FORWARD", "TURN_LEFT", "TURN_RIGHT"] * 4  # 12 steps: step_10 and step_11 sort after step_9
    frames = episode(tmp_path / "ep_b", actions)
    other = episode(tmp_path / "ep_a", ["STOP"] * 2, ext="JPG")  # any case
    found = find_samples(str(tmp_path), max_history_images=8)
    assert found.source == "episodes" and found.files == 2 and found.problems == []
    clips = [s.frames for s in found.samples]
    assert clips[:2] == [(other[0],) * 9, (other[0],) * 8 + (other[1],)]  # ep_a first: folders sort
    ep = clips[2:]
    assert len(ep) == 12 and [c[-1] for c in ep] == frames  # each step is the current view of one sample
    assert ep[0] == (frames[0],) * 9
    assert ep[6] == (frames[0],) * 2 + tuple(frames[:7])  # steps 0..7: frame 0 repeated in front
    assert ep[7] == (frames[0], *frames[:8])
    assert ep[8] == tuple(frames[:9])
    assert ep[11] == tuple(frames[i] for i in (0, 1, 2, 4, 5, 6, 8, 9, 11))  # linspace(0, 11, 9)
    records = find_samples(str(tmp_path), keep_records=True).samples
    assert records[2 + 10].record == {
        "episode": str(tmp_path / "ep_b"),
        "step": 10,
        "action": "TURN_LEFT",
        "image": frames[10],
    }
    assert [len(s.frames) for s in find_samples(str(tmp_path), max_history_images=3).samples][2:] == [4] * 12


def test_episode_json_files_are_never_opened_as_sample_files(tmp_path):
    episode(tmp_path / "ep", ["STOP"] * 3)
    (tmp_path / "ep" / "step_1_STOP.json").write_text("[ not json at all")
    found = find_samples(str(tmp_path))
    assert found.source == "episodes" and found.problems == [] and len(found.samples) == 3


def test_a_step_recorded_twice_is_a_problem_and_name_order_decides(tmp_path):
    touch(tmp_path / "ep" / "step_0_STOP.png")
    touch(tmp_path / "ep" / "step_1_TURN_LEFT.png")
    touch(tmp_path / "ep" / "step_1_MOVE_FORWARD.png")
    found = find_samples(str(tmp_path))
    assert [s.frames[-1].rsplit("/", 1)[1] for s in found.samples] == [
        "step_0_STOP.png",
        "step_1_MOVE_FORWARD.png",
        "step_1_TURN_LEFT.png",
    ]
    assert len(found.malformed) == 1 and "more than one frame for step(s) [1]" in found.malformed[0][1]


def test_json_arrays_are_samples_and_other_json_is_not(tmp_path):
    a, b = touch(tmp_path / "imgs" / "a.png"), touch(tmp_path / "imgs" / "b.png")
    (tmp_path / "ann").mkdir()
    (tmp_path / "ann" / "train.json").write_text(
        json.dumps(
            [
                {
                    "id": "x",
                    "conversations": [],
                    "images": ["../imgs/a.png", "../imgs/b.png"],
                },  # next to the file first
                {"id": "y", "images": ["imgs/b.png"]},  # then under the data root
                {"id": "z", "images": ["imgs/gone.png"]},
                "not an object",
            ]
        )
    )
    (tmp_path / "ann" / "meta.json").write_text('{"note": "an object"}')
    (tmp_path / "episodes.json").write_text(json.dumps([{"video": "v", "actions": [1, 2]}]))  # not sample objects
    (tmp_path / "numbers.json").write_text("[1, 2, 3]")
    (tmp_path / "vggt_cache_manifest.json").write_text("[")  # ours: never read as samples
    found = find_samples(str(tmp_path))
    assert found.source == "json" and found.files == 1
    assert [s.frames for s in found.samples] == [(str(a), str(b)), (str(b),)]
    where = [w for w, _ in found.problems]
    assert where == [f"{tmp_path}/ann/train.json[3]", f"{tmp_path}/ann/train.json[2]"]
    assert "not a JSON object" in found.malformed[0][1] and "image not found: imgs/gone.png" in found.missing[0][1]


def test_a_broken_sample_array_is_a_problem_not_a_crash(tmp_path):
    (tmp_path / "train.json").write_text('[{"images": ["a.png"]},')
    found = find_samples(str(tmp_path))
    # Read one element at a time: the problem is where the JSON breaks (the element before it was read).
    assert found.samples == [] and found.malformed[0][0] == f"{tmp_path}/train.json[1]"
    assert "not valid JSON" in found.malformed[0][1]


def test_sample_files_beat_episode_folders_which_beat_loose_images(tmp_path, caplog):
    touch(tmp_path / "loose" / "x.jpg")
    assert find_samples(str(tmp_path)).source == "images"
    episode(tmp_path / "ep", ["STOP"] * 2)
    assert find_samples(str(tmp_path)).source == "episodes"
    # A training log or other JSON beside the episodes is no sample file: the episodes stay the samples.
    (tmp_path / "train_log.jsonl").write_text(json.dumps({"loss": 1.0}) + "\n")
    (tmp_path / "stats.json").write_text(json.dumps([{"loss": 1.0}]))
    assert find_samples(str(tmp_path)).source == "episodes"
    (tmp_path / "s.jsonl").write_text(json.dumps({"image": "loose/x.jpg"}) + "\n")
    (tmp_path / "s.json").write_text("\ufeff" + json.dumps([{"image": "loose/x.jpg"}]))  # a BOM is fine
    with caplog.at_level("WARNING", logger="vggt_cache"):
        found = find_samples(str(tmp_path))
    assert found.source == "jsonl+json" and found.files == 2 and len(found.samples) == 2
    assert found.describe()["ignored_episode_folders"] == 1 and "1 episode folder(s) ignored" in caplog.text
    named = find_samples(str(tmp_path), files=["stats.json", "train_log.jsonl"])
    assert named.malformed == [
        (str(tmp_path / "stats.json"), "not a sample file: a JSON array of sample objects was expected")
    ]


def test_a_clip_keeps_its_repeated_frames_and_units_follow_the_attention_mode(tmp_path):
    frames = episode(tmp_path / "ep", ["STOP"] * 3)
    causal = scan_data_root(str(tmp_path), "causal")
    assert causal.source_kind == "episodes" and causal.num_samples == 3
    assert [u.frames for u in causal.units][1] == (frames[0],) * 8 + (frames[1],)
    assert [u.targets for u in causal.units] == [(f,) for f in frames]
    sequence = scan_data_root(str(tmp_path), "sequence")
    assert sequence.units[1].targets == (frames[0], frames[1])  # each distinct frame once
    assert [u.frames for u in scan_data_root(str(tmp_path), "frame").units] == [(f,) for f in frames]


def test_a_frame_name_joined_as_it_is_is_the_normalised_join():
    segments = ["a", "b.jpg", ".", "..", "", ".h", "~", "c d", "x..y"]
    names = ["/".join(p) for n in (1, 2, 3) for p in itertools.product(segments, repeat=n)]
    names = [n for n in names if n and not n.startswith("/")]  # relative, as `_joined` is given them
    for folder in ("/data/root", "/data", "/"):
        for name in names:
            assert _joined(folder, name) == os.path.abspath(os.path.join(folder, name)), (folder, name)


def test_the_resolver_gives_the_same_answers_when_its_memo_is_let_go(tmp_path, monkeypatch):
    images = [touch(tmp_path / "imgs" / f"{n}.png") for n in range(6)]
    touch(tmp_path / "ann" / "imgs" / "0.png")  # beside the sample file: found first, from its folder only
    samples = [{"images": [f"imgs/{n % 6}.png", f"imgs/{(n + 1) % 6}.png"]} for n in range(12)]
    samples += [{"images": [f"{n}.png"], "data_path": "imgs"} for n in range(6)]  # a data_path of their own
    samples += [{"images": ["imgs/1.png", "imgs/gone.png"]}]
    (tmp_path / "ann").mkdir(exist_ok=True)
    (tmp_path / "ann" / "train.json").write_text(json.dumps(samples))
    (tmp_path / "more.jsonl").write_text("\n".join(json.dumps(s) for s in samples) + "\n")
    kept = find_samples(str(tmp_path))
    monkeypatch.setattr(samplepaths, "MEMO_NAMES", 1)  # every name or two, the folder's answers are let go
    monkeypatch.setattr(samplepaths, "MEMO_FOLDERS", 0)  # and every other folder's
    let_go = find_samples(str(tmp_path))
    assert [s.frames for s in let_go.samples] == [s.frames for s in kept.samples]
    assert let_go.problems == kept.problems and len(kept.problems) == 2
    frames = {s.where.rsplit("/", 1)[1]: s.frames for s in kept.samples}
    assert frames["train.json[0]"] == (str(tmp_path / "ann" / "imgs" / "0.png"), str(images[1]))
    assert frames["more.jsonl:1"] == (str(images[0]), str(images[1]))
    assert frames["train.json[17]"] == (str(images[5]),)  # data_path: under the data root


def test_a_stream_says_how_much_of_the_root_it_has_read(tmp_path):
    """A streamed job's view scales its total by it: a JSON array by its bytes, episodes by their steps."""
    touch(tmp_path / "arr" / "a.png")
    samples = [{"images": ["a.png"], "id": f"sample {n:05d}"} for n in range(6000)]  # ~230 kB
    (tmp_path / "arr" / "train.json").write_text(json.dumps(samples))
    stream = SampleStream(str(tmp_path / "arr"))
    assert stream.read_fraction() == 0.0
    read = [stream.read_fraction() for n, _ in enumerate(stream) if n % 500 == 0]
    assert read == sorted(read) and abs(read[6] - 0.5) < 0.3  # read ahead by 64 kB at most
    assert stream.read_fraction() == 1.0 and stream.count == 6000

    # Small files read before a large one: by bytes, not by files read.
    for n in range(9):
        (tmp_path / "files" / f"a_{n}.jsonl").parent.mkdir(exist_ok=True)
        (tmp_path / "files" / f"a_{n}.jsonl").write_text(json.dumps({"images": ["a.png"]}) + "\n")
    touch(tmp_path / "files" / "a.png")
    (tmp_path / "files" / "z.jsonl").write_text("\n".join(json.dumps(s) for s in samples) + "\n")
    stream = SampleStream(str(tmp_path / "files"))
    read = [stream.read_fraction() for n, _ in enumerate(stream) if n % 1000 == 0]
    assert read == sorted(read) and abs(read[3] - 0.5) < 0.15 and stream.read_fraction() == 1.0

    for ep in ("ep_a", "ep_b"):
        episode(tmp_path / "eps" / ep, ["MOVE_FORWARD"] * 3 + ["STOP"])
    stream = SampleStream(str(tmp_path / "eps"))
    assert stream.read_fraction() == 0.0
    assert [stream.read_fraction() for _ in stream] == [n / 8 for n in range(1, 9)]
    assert stream.read_fraction() == 1.0


def test_a_name_no_file_can_have_is_a_malformed_sample_and_the_rest_is_read(tmp_path):
    a, accented = touch(tmp_path / "a.png"), touch(tmp_path / "\u00e9.png")
    samples = [
        {"images": ["a.png\u0000b.png"]},
        {"images": ["\ud800.png"]},  # a lone surrogate: JSON can say it, no file name decodes to it
        {"history_images": ["a.png"], "current_image": "\udfff"},
        {"images": ["a.png"], "data_path": ".\u0000"},
        {"images": ["a.png", "a.png\u0000", "a.png"]},  # one bad name among good ones
        {"images": ["a.png", "\u00e9.png", "\udbff"]},
        {"images": ["a.png\u0000", 5]},  # said of the first name that is wrong
        {"images": ["a.png", ""]},
        {"images": ["a.png"]},
        {"images": ["a.png", "\u00e9.png"]},  # not ASCII, and a name a file can have
    ]
    (tmp_path / "s.jsonl").write_text("\n".join(json.dumps(s) for s in samples) + "\n")
    found = find_samples(str(tmp_path))
    assert [s.frames for s in found.samples] == [(str(a),), (str(a), str(accented))]
    reasons = [why for _, why in found.malformed]
    assert len(reasons) == 8 and "(a NUL byte)" in reasons[0] and "(a lone surrogate)" in reasons[1]
    assert "(a NUL byte)" in reasons[4] and "(a lone surrogate)" in reasons[5] and "(a NUL byte)" in reasons[6]
    assert "'images' must be a non-empty string or a list of them" in reasons[7]
    assert "\\ud800" in reasons[1]  # storable as UTF-8 (SQLite, JSON): the lone surrogate escaped


def test_a_named_sample_file_outside_the_roots_is_not_looked_at_for_the_read_fraction(tmp_path):
    root = tmp_path / "root"
    touch(root / "a.png")
    (tmp_path / "outside.jsonl").write_text(json.dumps({"images": ["a.png"]}) + "\n")
    stream = SampleStream(str(root), files=["../outside.jsonl"], allowed=AllowedRoots.of([str(root)]))
    assert stream.read_fraction() == 0.0 and len(stream.table) == 0  # no file of it looked at
    assert list(stream) == [] and "outside" in stream.sample_set().malformed[0][1]
