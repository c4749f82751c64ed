"""Training data: JSONL samples -> Qwen2.5-VL + VGGT inputs, with and without cached features."""

from __future__ import annotations

import json
import logging
import os
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import HfArgumentParser, Qwen2_5_VLForConditionalGeneration

from vggt_cache.client.cache import FeatureCache
from vggt_cache.client.cachefile import context_record, source_record, write_entry
from vggt_cache.service.cli import build_parser
from vggt_cache.service.model import load_aggregator
from vggt_cache.service.model.features import entry_features, model_spec
from vggt_cache.service.preprocess import preprocess
from vggt_cache.service.sources import scan_data_root
from vggt_cache.service.specflags import serve_flags, spec_options, train_options
from vggt_cache.training.arguments import CacheArguments, DataArguments, ModelArguments, feature_spec
from vggt_cache.training.data import IGNORE_INDEX, SampleError, VGGTCollator, VLNDataset, chat_turns, load_samples
from vggt_cache.training.model import Fusion, Qwen25VLWithVGGT
from vggt_cache.training.tiny import image_inputs
from vggt_cache.training.train import tiny_config, tiny_image_processor, tiny_tokenizer

from helpers.service import TINY_MODEL

FIXTURE = TINY_MODEL


@pytest.fixture(scope="module")
def loaded():
    return load_aggregator(str(FIXTURE))


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def make_spec(loaded, attention: str = "causal"):
    return feature_spec(
        loaded, DataArguments(image_size=56), CacheArguments(vggt_attention=attention, use_vggt_cache=False)
    )


def write_image(path: Path, seed: int, size=(64, 48)) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return str(path)


def write_jsonl(path: Path, samples: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((s if isinstance(s, str) else json.dumps(s)) + "\n" for s in samples))


def make_dataset(tok, loaded, samples, attention="causal", cache=None, qwen_images="all") -> VLNDataset:
    config = tiny_config(tok)
    return VLNDataset(
        samples, tok, tiny_image_processor(config), config, make_spec(loaded, attention), cache, qwen_images
    )


@pytest.fixture
def scene(tmp_path) -> tuple[Path, list[str]]:
    """A data root with one 3-frame clip and a sample in the seed's shape."""
    frames = [write_image(tmp_path / "scene0" / f"img_{t:04d}.png", t) for t in range(3)]
    write_jsonl(
        tmp_path / "train.jsonl",
        [
            {
                "history_images": ["scene0/img_0000.png", "scene0/img_0001.png"],
                "current_image": "scene0/img_0002.png",
                "instruction": "Walk to the door.",
                "answer": "forward",
            }
        ],
    )
    return tmp_path, frames


def test_samples_resolve_to_the_clips_precompute_scans(tmp_path):
    for name in ("a", "b", "c", "d"):
        write_image(tmp_path / "imgs" / f"{name}.png", ord(name))
    write_image(tmp_path / "sub" / "local.png", 7)
    write_image(tmp_path / "shared" / "imgs" / "e.png", 8)
    qa = {"instruction": "where?", "answer": "here"}
    write_jsonl(
        tmp_path / "train.jsonl",
        [
            {"history_images": ["imgs/a.png", "imgs/b.png"], "current_image": "imgs/c.png", **qa},
            {"images": ["imgs/d.png", "imgs/a.png"], **qa},
            {"image": "imgs/b.png", **qa},
            {"images": ["imgs/e.png"], "data_path": "shared", **qa},
            {"conversations": [{"from": "human", "value": "text only"}, {"from": "gpt", "value": "ok"}]},
        ],
    )
    write_jsonl(tmp_path / "sub" / "more.jsonl", [{"image": "local.png", **qa}])

    samples = load_samples(str(tmp_path))
    scanned = scan_data_root(str(tmp_path), "causal")
    assert scanned.problems == []
    assert [s.clip for s in samples if s.clip] == [unit.frames for unit in scanned.units]
    assert [s.clip for s in samples][4] == ()
    assert samples[0].turns == (("user", "where?"), ("assistant", "here"))
    assert samples[0].where == f"{tmp_path / 'train.jsonl'}:1"
    only_sub = load_samples(str(tmp_path), ["sub/more.jsonl"])
    assert [s.clip for s in only_sub] == [(str(tmp_path / "sub" / "local.png"),)]


def test_malformed_samples_name_their_line_and_missing_images_are_skipped(tmp_path, caplog):
    write_image(tmp_path / "a.png", 1)
    write_jsonl(
        tmp_path / "train.jsonl",
        [
            {"image": "a.png", "instruction": "x", "answer": "y"},
            {"image": "gone.png", "instruction": "x", "answer": "y"},
        ],
    )
    with caplog.at_level(logging.WARNING, logger="vggt_cache"):
        assert len(load_samples(str(tmp_path))) == 1
    assert "Skipped 1 sample(s) with missing images" in caplog.text and "gone.png" in caplog.text
    write_jsonl(tmp_path / "train.jsonl", [{"image": "a.png", "instruction": "no answer"}])
    with pytest.raises(SampleError, match=r"train.jsonl:1: malformed sample: .*'instruction' and 'answer'"):
        load_samples(str(tmp_path))
    write_jsonl(tmp_path / "train.jsonl", ['{"image": "a.png",'])
    with pytest.raises(SampleError, match=r"train.jsonl:1: malformed sample"):
        load_samples(str(tmp_path))
    with pytest.raises(ValueError, match="no assistant turn"):
        chat_turns({"conversations": [{"role": "user", "content": "hi"}]})


def test_an_item_holds_chat_tokens_labels_pixels_and_vggt_frames(scene, tok, loaded):
    root, frames = scene
    item = make_dataset(tok, loaded, load_samples(str(root)))[0]
    pixels = [preprocess(f, "pad", 56, 28) for f in frames]  # each [3, 56, 56]
    config = tiny_config(tok)

    assert item["image_grid_thw"].tolist() == [[1, 4, 4]] * 3  # 56 px = 4 patches; 2x2 merge -> 4 tokens
    assert torch.equal(item["pixel_values"], image_inputs(pixels, config)["pixel_values"])
    assert torch.equal(item["images_vggt"], torch.stack(pixels))  # causal: the whole clip, current last
    assert item["vggt_features"] is None and item["vggt_source"] == "online"
    image = "<|vision_start|>" + "<|image_pad|>" * 4 + "<|vision_end|>"
    assert tok.decode(item["input_ids"]) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{image * 3}Walk to the door.<|im_end|>\n"
        "<|im_start|>assistant\nforward<|im_end|>\n"
    )
    learned = item["labels"][item["labels"] != IGNORE_INDEX]
    assert tok.decode(learned) == "forward<|im_end|>"
    assert (item["input_ids"] == config.image_token_id).sum() == 12


def test_frame_attention_needs_only_the_current_frame_and_qwen_can_see_only_it(scene, tok, loaded):
    root, frames = scene
    samples = load_samples(str(root))
    current = preprocess(frames[-1], "pad", 56, 28)
    item = make_dataset(tok, loaded, samples, attention="frame")[0]
    assert torch.equal(item["images_vggt"], current[None])
    assert len(item["image_grid_thw"]) == 3
    item = make_dataset(tok, loaded, samples, qwen_images="current")[0]
    assert item["image_grid_thw"].tolist() == [[1, 4, 4]]
    assert item["images_vggt"].shape == (3, 3, 56, 56)  # causal VGGT still needs the history


def test_conversations_put_images_at_the_placeholder_and_learn_every_reply(tmp_path, tok, loaded):
    write_image(tmp_path / "a.png", 1)
    write_jsonl(
        tmp_path / "train.jsonl",
        [
            {
                "image": "a.png",
                "conversations": [
                    {"from": "human", "value": "Look: <image> now."},
                    {"from": "gpt", "value": "ok"},
                    {"from": "human", "value": "And?"},
                    {"from": "gpt", "value": "stop"},
                ],
            }
        ],
    )
    item = make_dataset(tok, loaded, load_samples(str(tmp_path)))[0]
    image = "<|vision_start|>" + "<|image_pad|>" * 4 + "<|vision_end|>"
    text = tok.decode(item["input_ids"])
    assert f"<|im_start|>user\nLook: {image} now.<|im_end|>\n<|im_start|>assistant\nok<|im_end|>\n" in text
    assert text.endswith("<|im_start|>user\nAnd?<|im_end|>\n<|im_start|>assistant\nstop<|im_end|>\n")
    learned = item["labels"] != IGNORE_INDEX
    assert tok.decode(item["input_ids"][learned]) == "ok<|im_end|>stop<|im_end|>"


def test_a_cached_entry_replaces_the_frames_and_history_is_not_decoded(scene, tok, loaded):
    root, frames = scene
    spec = make_spec(loaded, "causal")
    clip = torch.stack([preprocess(f, "pad", 56, 28) for f in frames])
    sources = [source_record(f) for f in frames]
    entry = entry_features(loaded.model, clip[None], spec)[0, -1].clone()  # [16, 128]
    write_entry(frames[-1], entry, spec, (4, 4), sources[-1], context_record(frames[-1], frames))
    # Garble a history frame but keep its size and mtime: the entry's context still
    # validates, and decoding the frame would fail.
    stat = os.stat(frames[0])
    Path(frames[0]).write_bytes(b"\0" * stat.st_size)
    os.utime(frames[0], ns=(stat.st_atime_ns, stat.st_mtime_ns))

    samples = load_samples(str(root))
    with FeatureCache(None, spec, fallback="error") as cache:
        item = make_dataset(tok, loaded, samples, cache=cache, qwen_images="current")[0]
        assert cache.stats["hits"] == 1
    assert torch.equal(item["vggt_features"], entry)
    assert item["images_vggt"] is None and item["vggt_source"] == "cache"

    os.remove(frames[-1] + ".vggt_cache.pt")
    Path(frames[0]).unlink()
    write_image(Path(frames[0]), 0)
    with FeatureCache(None, spec, fallback="online") as cache:
        item = make_dataset(tok, loaded, samples, cache=cache)[0]
        assert cache.stats["misses"] == 1 and cache.stats["fallbacks"] == 1
    assert item["vggt_features"] is None and item["vggt_source"] == "online"
    assert torch.equal(item["images_vggt"], clip)


def test_the_collated_batch_trains_the_fused_model(tmp_path, tok, loaded):
    write_image(tmp_path / "a.png", 1)
    write_image(tmp_path / "b.png", 2, size=(48, 96))
    write_jsonl(
        tmp_path / "train.jsonl",
        [
            {"images": ["a.png", "b.png"], "instruction": "go", "answer": "left"},
            {"conversations": [{"from": "human", "value": "hello there"}, {"from": "gpt", "value": "hi"}]},
            {"image": "b.png", "instruction": "and now?", "answer": "stop here"},
        ],
    )
    dataset = make_dataset(tok, loaded, load_samples(str(tmp_path)))
    items = [dataset[i] for i in range(3)]
    batch = VGGTCollator(tok.pad_token_id)(items)

    width = max(len(i["input_ids"]) for i in items)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, width)
    short = len(items[1]["input_ids"])
    assert batch["attention_mask"][1].sum() == short
    assert (batch["input_ids"][1, short:] == tok.pad_token_id).all()
    assert (batch["labels"][1, short:] == IGNORE_INDEX).all()
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 4], [1, 4, 4]]
    assert batch["pixel_values"].shape[0] == 3 * 16
    assert batch["vggt_source"] == ["online", None, "online"]
    assert batch["images_vggt"][1] is None and batch["images_vggt"][0].shape == (2, 3, 56, 56)

    torch.manual_seed(0)
    model = Qwen25VLWithVGGT(Qwen2_5_VLForConditionalGeneration(tiny_config(tok)), loaded, dataset.spec)
    batch.pop("vggt_source")
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss) and model.merger.mlp[0].weight.grad.abs().sum() > 0


def parse(argv: list[str]):
    return HfArgumentParser((ModelArguments, DataArguments, CacheArguments)).parse_args_into_dataclasses(args=argv)


def test_arguments_take_the_seeds_environment_and_flags_override_it(monkeypatch):
    monkeypatch.delenv("USE_VGGT_CACHE", raising=False)
    monkeypatch.delenv("VGGT_SERVICE_URL", raising=False)
    model, data, cache = parse([])
    assert (model.model_name_or_path, model.vggt_model_path, model.tiny) == ("Qwen/Qwen2.5-VL-3B-Instruct", None, False)
    assert (data.image_preprocess, data.image_size, data.image_align, data.max_history_images) == (None, None, None, 8)
    assert (cache.vggt_preset, model.fusion) == ("newjanusvln", Fusion())
    assert (cache.use_vggt_cache, cache.service_urls, cache.vggt_cache_fallback) == (False, [], "online")

    monkeypatch.setenv("USE_VGGT_CACHE", "True")
    monkeypatch.setenv("VGGT_SERVICE_URL", "http://gpu-a:8600, http://gpu-b:8600")
    monkeypatch.setenv("DATA_ROOT", "/data/train")
    _, data, cache = parse([])
    assert cache.use_vggt_cache and cache.service_urls == ["http://gpu-a:8600", "http://gpu-b:8600"]
    assert data.data_root == "/data/train"
    assert parse(["--use_vggt_cache", "false"])[2].use_vggt_cache is False
    monkeypatch.setenv("USE_VGGT_CACHE", "no")
    assert parse(["--use_vggt_cache"])[2].use_vggt_cache is True
    _, data, cache = parse(["--vggt_layers=4,-1", "--data_files", "a.jsonl, b/c.jsonl", "--vggt_attention", "causal"])
    assert train_options(cache)["layers"] == (4, -1) and data.sample_files == ["a.jsonl", "b/c.jsonl"]
    with pytest.raises(ValueError, match=r"--vggt_attention must be one of frame\|sequence\|causal"):
        parse(["--vggt_attention", "bidirectional"])
    with pytest.raises(ValueError, match="max_history_images must be an integer of at least 1"):
        parse(["--max_history_images", "0"])
    with pytest.raises(ValueError, match=r"--vggt_preset must be one of janusvln\|newjanusvln\|none"):
        parse(["--vggt_preset", "janus"])
    with pytest.raises(ValueError, match="--vggt_layers takes comma-separated integers"):
        parse(["--vggt_layers", "last"])


def test_serve_flags_give_the_service_the_training_spec(loaded):
    _, data, cache = parse(
        [
            "--image_size",
            "112",
            "--vggt_attention",
            "causal",
            "--vggt_layers=0,-1",
            "--vggt_dtype",
            "float16",
            "--vggt_tokens",
            "all",
        ]
    )
    spec = feature_spec(loaded, data, cache)
    assert spec.layers == (0, 1) and spec.size == 112 and spec.attention == "causal"
    args = build_parser().parse_args(["serve", "--allowed-root", "/data", *shlex.split(serve_flags(spec))])
    served = model_spec(loaded, **spec_options(args))
    assert served == spec and served.digest == spec.digest


def test_images_targeted_by_several_clips_are_reported(caplog, monkeypatch):
    import logging

    from vggt_cache.training.data import TrainingSample as Sample
    from vggt_cache.training.train import warn_shared_targets

    monkeypatch.setattr(logging.getLogger("vggt_cache"), "propagate", True)  # train.main may have turned it off

    samples = [
        Sample(("/d/a.jpg", "/d/b.jpg"), (), "x:1"),
        Sample(("/d/c.jpg", "/d/b.jpg"), (), "x:2"),
        Sample(("/d/b.jpg", "/d/e.jpg"), (), "x:3"),
    ]
    with caplog.at_level("WARNING", logger="vggt_cache"):
        warn_shared_targets(samples, "causal")
    assert "1 image(s) get a causal entry from more than one clip" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="vggt_cache"):
        warn_shared_targets(samples, "frame")
    assert caplog.text == ""


def test_training_defaults_to_the_newjanusvln_spec_and_takes_the_janusvln_recipe(loaded):
    model, data, cache = parse([])
    spec = feature_spec(loaded, data, cache)
    assert (spec.attention, spec.preprocess, spec.size, spec.reference_frame, spec.layers) == (
        "causal",
        "pad",
        644,
        "last",
        (loaded.config.depth - 2,),
    )
    _, data, cache = parse(["--vggt_preset", "janusvln", "--image_size", "56", "--vggt_dtype", "float32"])
    spec = feature_spec(loaded, data, cache)
    assert (spec.preprocess, spec.size, spec.reference_frame, spec.dtype) == ("crop", 56, "first", "float32")
    _, data, cache = parse(["--vggt_preset", "none"])
    assert feature_spec(loaded, data, cache).attention == "frame"
    model, _, _ = parse(["--vggt_fusion", "janusvln"])
    assert model.fusion == Fusion(vggt_weight=0.2, merger_hidden_dim=4096, merger_norm="rmsnorm", add_to="all_frames")
    model, _, _ = parse(["--vggt_fusion", "janusvln", "--vggt_weight", "0.5", "--vggt_add_to", "current"])
    assert (model.fusion.vggt_weight, model.fusion.add_to, model.fusion.merger_norm) == (0.5, "current", "rmsnorm")
    with pytest.raises(ValueError, match=r"add_to must be one of current\|all_frames"):
        parse(["--vggt_add_to", "every"])


def test_episode_folders_train_on_the_clips_a_job_computes_with_their_descriptions(tmp_path, tok, loaded):
    episode = tmp_path / "ep_0001"
    for n, action in enumerate(["MOVE_FORWARD", "TURN_LEFT", "STOP"] * 4):
        write_image(episode / f"step_{n}_{action}.png", n)
        (episode / f"step_{n}_{action}.json").write_text(
            json.dumps({"landmark_description": f"door {n}", "spatial_description": "ahead"})
        )
    (episode / "milestones_result.json").write_text(json.dumps({"instruction_text": "walk to the door"}))
    samples = load_samples(str(tmp_path), max_history_images=8)
    units = scan_data_root(str(tmp_path), "causal", max_history_images=8).units
    assert [s.clip for s in samples] == [u.frames for u in units] and len(samples) == 12
    assert samples[11].turns == (
        (
            "user",
            "<image>Your task is to walk to the door.\nChoose one action: MOVE_FORWARD, TURN_LEFT, TURN_RIGHT or STOP.",
        ),
        ("assistant", "2D_DESCRIPTION: door 11\n3D_DESCRIPTION: ahead\nACTION: STOP"),
    )
    item = make_dataset(tok, loaded, samples[:1])[0]
    assert item["images_vggt"].shape == (9, 3, 56, 56)  # step 0: nine copies of its one frame
    assert item["image_grid_thw"].tolist() == [[1, 4, 4]] * 9 and item["vggt_grid"] == (4, 4)
    with pytest.raises(ValueError, match=r"no samples under .*loose images carry no text"):
        write_image(tmp_path / "other" / "x.png", 0)
        load_samples(str(tmp_path / "other"))
