import json
import os
import time

import pytest

from vggt_cache.service.sources import ScanResult, UnitPlanner, scan_data_root, shard
from vggt_cache.service.units import Unit, unit_key


def touch(path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not decoded by the scan")
    return str(path)


def write_jsonl(path, lines) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return str(path)


def test_frame_mode_reads_every_sample_shape_and_dedups_in_first_seen_order(tmp_path):
    a, b, c, d = (touch(tmp_path / "imgs" / f"{n}.jpg") for n in "abcd")
    write_jsonl(
        tmp_path / "train.jsonl",
        [
            {"images": ["imgs/b.jpg", "imgs/a.jpg"]},
            {"images": "imgs/c.jpg"},
            {"image": "imgs/a.jpg"},
            {"history_images": ["imgs/d.jpg", "imgs/b.jpg"], "current_image": "imgs/c.jpg"},
            {"conversations": [{"from": "human", "value": "text only"}]},
        ],
    )
    result = scan_data_root(str(tmp_path), "frame")
    assert isinstance(result, ScanResult)
    assert result.source_kind == "jsonl"
    assert result.num_samples == 5
    assert result.problems == []
    assert result.units == [Unit((p,), (p,)) for p in (b, a, c, d)]


def test_sequence_and_causal_make_one_unit_per_unique_clip(tmp_path):
    f = [touch(tmp_path / "ep" / f"{i}.png") for i in range(4)]
    write_jsonl(
        tmp_path / "samples.jsonl",
        [
            {"history_images": ["ep/0.png", "ep/1.png"], "current_image": "ep/2.png"},
            {"images": ["ep/0.png", "ep/1.png", "ep/2.png"]},  # the same clip again
            {"history_images": [], "current_image": "ep/3.png"},
            {"images": ["ep/1.png", "ep/3.png"]},
            {"images": ["ep/1.png", "ep/3.png"]},  # again: a clip that met another's target, seen all the same
            {"images": ["ep/3.png"]},
        ],
    )
    seq = scan_data_root(str(tmp_path), "sequence")
    assert seq.units == [
        Unit((f[0], f[1], f[2]), (f[0], f[1], f[2])),
        Unit((f[3],), (f[3],)),
        Unit((f[1], f[3]), (f[1], f[3])),
    ]
    # f1 and f3 are each targets of two different clips.
    assert seq.conflicts == 2

    causal = scan_data_root(str(tmp_path), "causal")
    assert causal.units == [
        Unit((f[0], f[1], f[2]), (f[2],)),
        Unit((f[3],), (f[3],)),
        Unit((f[1], f[3]), (f[3],)),
    ]
    assert causal.conflicts == 1  # only f3: a causal clip targets its last frame alone


def test_relative_paths_next_to_the_jsonl_first_then_under_the_data_root(tmp_path):
    beside = touch(tmp_path / "split" / "x.jpg")
    touch(tmp_path / "x.jpg")  # shadowed by the one beside the jsonl
    at_root = touch(tmp_path / "only_root.jpg")
    write_jsonl(tmp_path / "split" / "s.jsonl", [{"images": ["x.jpg", "only_root.jpg"]}])
    units = scan_data_root(str(tmp_path), "frame").units
    assert [u.frames[0] for u in units] == [beside, at_root]


def test_data_path_from_argument_or_sample_is_the_only_base(tmp_path):
    touch(tmp_path / "x.jpg")  # would be found without a data_path
    in_media = touch(tmp_path / "media" / "x.jpg")
    elsewhere = touch(tmp_path / "other" / "y.jpg")
    outside = touch(tmp_path.parent / f"{tmp_path.name}_abs" / "z.jpg")
    write_jsonl(
        tmp_path / "s.jsonl",
        [
            {"image": "x.jpg"},
            {"image": "y.jpg", "data_path": "other"},  # the sample's own data_path wins
            {"image": outside},  # absolute: used as it is
            {"image": "missing_in_media.jpg"},
        ],
    )
    result = scan_data_root(str(tmp_path), "frame", data_path="media")
    assert [u.frames[0] for u in result.units] == [in_media, elsewhere, outside]
    ((where, reason),) = result.problems
    assert where == f"{tmp_path / 's.jsonl'}:4"
    assert "missing_in_media.jpg" in reason and os.path.join("media", "missing_in_media.jpg") in reason


def test_malformed_lines_and_missing_images_are_problems_and_the_scan_goes_on(tmp_path):
    good = touch(tmp_path / "good.jpg")
    touch(tmp_path / "h.jpg")
    path = tmp_path / "s.jsonl"
    path.write_bytes(
        b"\n".join(
            [
                b'{"images": ["good.jpg"',  # 1: truncated JSON
                b"[1, 2]",  # 2: not an object
                b'{"images": [3]}',  # 3: wrong type
                b'{"history_images": ["h.jpg"]}',  # 4: no current_image
                b"",  # 5: blank, ignored
                b'{"image": "\xff\xfe"}',  # 6: not UTF-8
                b'{"images": ["h.jpg", "gone.jpg"]}',  # 7: missing image drops the clip
                b'{"image": "good.jpg"}',  # 8: fine
            ]
        )
        + b"\n"
    )
    result = scan_data_root(str(tmp_path), "sequence")
    assert [w for w, _ in result.problems] == [f"{path}:{n}" for n in (1, 2, 3, 4, 6, 7)]
    reasons = dict(result.problems)
    assert "not a JSON object" in reasons[f"{path}:2"]
    assert "'images'" in reasons[f"{path}:3"]
    assert "current_image" in reasons[f"{path}:4"]
    assert "image not found: gone.jpg" in reasons[f"{path}:7"]
    assert result.units == [Unit((good,), (good,))]
    assert result.num_samples == 1  # line 8; line 7 is left out whole

    # A sample with a missing frame is left out in every mode, as training leaves it out.
    frame = scan_data_root(str(tmp_path), "frame")
    assert [u.frames[0] for u in frame.units] == [good]
    assert frame.problems == result.problems


def test_image_folder_walk_is_recursive_sorted_and_skips_caches_temps_and_hidden(tmp_path):
    expected = [
        touch(tmp_path / "A.PNG"),
        touch(tmp_path / "b.jpeg"),
        touch(tmp_path / "a" / "c.Tif"),
        touch(tmp_path / "a" / "d.webp"),
        touch(tmp_path / "b" / "e.bmp"),
        touch(tmp_path / "b" / "f.tiff"),
    ]
    for name in (
        "x.jpg.vggt_cache.pt",
        "x.jpg.vggt_cache.pt.tmp",
        ".x.jpg",
        "~x.jpg",
        "notes.txt",
        ".hidden/y.jpg",
        "a/.cache/z.png",
    ):
        touch(tmp_path / name)
    result = scan_data_root(str(tmp_path), "frame")
    assert result.source_kind == "images"
    assert result.num_samples == 6
    assert [u.frames[0] for u in result.units] == expected
    assert scan_data_root(str(tmp_path), "frame") == result  # deterministic


def test_image_folders_have_no_clips_so_sequence_and_causal_are_refused(tmp_path):
    touch(tmp_path / "a.jpg")
    for attention in ("sequence", "causal"):
        with pytest.raises(ValueError, match="jsonl"):
            scan_data_root(str(tmp_path), attention)


def test_jsonl_in_hidden_folders_is_ignored_and_any_jsonl_beats_loose_images(tmp_path):
    touch(tmp_path / "loose.jpg")
    listed = touch(tmp_path / "z" / "listed.jpg")
    write_jsonl(tmp_path / ".trash" / "old.jsonl", [{"image": "../loose.jpg"}])
    write_jsonl(tmp_path / "z" / "s.jsonl", [{"image": "listed.jpg"}])
    result = scan_data_root(str(tmp_path), "frame")
    assert result.source_kind == "jsonl"
    assert [u.frames[0] for u in result.units] == [listed]


def test_paths_are_absolute_and_normalised_but_symlinks_are_kept(tmp_path, monkeypatch):
    real = touch(tmp_path / "real" / "a.jpg")
    os.symlink(tmp_path / "real", tmp_path / "link")
    write_jsonl(
        tmp_path / "s.jsonl",
        [
            {"images": ["real/../real/./a.jpg", "link/a.jpg"]},
        ],
    )
    monkeypatch.chdir(tmp_path.parent)
    result = scan_data_root(tmp_path.name, "frame")  # a relative data root
    assert [u.frames[0] for u in result.units] == [real, str(tmp_path / "link" / "a.jpg")]


def test_symlink_loops_do_not_hang_the_walk(tmp_path):
    a = touch(tmp_path / "d" / "a.jpg")
    os.symlink(tmp_path / "d", tmp_path / "d" / "loop")
    assert [u.frames[0] for u in scan_data_root(str(tmp_path), "frame").units] == [a]


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="attention"):
        scan_data_root(str(tmp_path), "bidirectional")
    with pytest.raises(ValueError, match="not a directory"):
        scan_data_root(str(tmp_path / "nope"), "frame")


def test_hundred_thousand_lines_scan_quickly(tmp_path):
    for i in range(500):
        touch(tmp_path / "ep" / f"{i:04d}.jpg")
    with open(tmp_path / "big.jsonl", "w") as f:
        for i in range(100_000):
            t = i % 500
            history = [f"ep/{j:04d}.jpg" for j in range(max(0, t - 7), t)]
            f.write(json.dumps({"id": i, "history_images": history, "current_image": f"ep/{t:04d}.jpg"}))
            f.write("\n")
    start = time.perf_counter()
    result = scan_data_root(str(tmp_path), "causal")
    elapsed = time.perf_counter() - start
    assert result.num_samples == 100_000
    assert len(result.units) == 500 and result.problems == [] and result.conflicts == 0
    assert elapsed < 10, f"scan took {elapsed:.1f}s"


def test_shards_are_disjoint_balanced_and_cover_everything():
    units = [Unit.frame(f"/d/{i}.jpg") for i in range(10)]
    shards = [shard(units, r, 3) for r in range(3)]
    assert sorted(u.frames[0] for s in shards for u in s) == sorted(u.frames[0] for u in units)
    assert sorted(len(s) for s in shards) == [3, 3, 4]
    assert [u for s in shards for u in s] == units  # contiguous runs in order: an episode's samples stay together
    assert shard(units, 1, 3) == shards[1]
    assert shard(units, 0, 1) == units
    for rank, world in ((3, 3), (-1, 2), (0, 0)):
        with pytest.raises(ValueError):
            shard(units, rank, world)


def test_unit_constructors_follow_the_attention_modes():
    clip = ("/a.jpg", "/b.jpg", "/c.jpg")
    assert Unit.for_clip("frame", clip[:1]) == Unit(("/a.jpg",), ("/a.jpg",))
    assert Unit.for_clip("sequence", clip).targets == clip
    assert Unit.for_clip("causal", list(clip)) == Unit(clip, ("/c.jpg",))
    with pytest.raises(ValueError):
        Unit.for_clip("frame", clip)
    with pytest.raises(ValueError):
        Unit(("/a.jpg",), ("/b.jpg",))
    assert hash(Unit(["/a.jpg"], ["/a.jpg"])) == hash(Unit.frame("/a.jpg"))


def test_a_units_key_is_its_frames_and_targets():
    clip = ("/d/a.jpg", "/d/b.jpg", "/d/\udcff.jpg")  # a name that is not UTF-8 keeps its bytes
    keys = {
        Unit.causal(clip).key,
        Unit.sequence(clip).key,
        Unit.causal(clip[:2]).key,
        Unit.frame("/d/\udcfe.jpg").key,
        # A sample can name a NUL or a lone surrogate: its unit is refused, but recorded, and must not read
        # as another's.
        Unit.sequence(("/d/a.jpg\x00/d/b.jpg",)).key,
        Unit.sequence(("/d/a.jpg", "/d/b.jpg")).key,
        Unit.frame("/d/\ud800.jpg").key,
    }
    assert len(keys) == 7 and all(len(k) == 16 for k in keys)
    assert Unit.causal(list(clip)).key == Unit.causal(clip).key == unit_key(clip, clip[-1:])


@pytest.mark.parametrize(
    "frames,targets",
    [((), ("/a",)), (("/a",), ()), (("/a", "/b"), ("/c",)), (("/a", "/b"), ("/a", "/c")), (["/a"], ["/a", "/c"])],
)
def test_a_unit_needs_frames_and_targets_among_them(frames, targets):
    with pytest.raises(ValueError, match=r"at least one frame and one target|must be one of its frames"):
        Unit(frames, targets)


@pytest.mark.parametrize("attention", ["frame", "sequence", "causal"])
def test_a_text_only_clip_makes_no_unit(attention):
    planner = UnitPlanner(attention)
    planner.add_clip([])
    planner.add_clip(["/d/a.jpg"])
    assert planner.take() == [Unit(("/d/a.jpg",), ("/d/a.jpg",))] and planner.conflicts == 0
