"""Qwen2.5-VL + VGGT: cached features train exactly like features computed online."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

from vggt_cache.client.spec import FeatureSpec
from vggt_cache.service.model import load_aggregator
from vggt_cache.service.model.features import compute_features, entry_features, select_features
from vggt_cache.service.preprocess import preprocess
from vggt_cache.training.merger import VGGTMerger, merge_grid
from vggt_cache.training.model import Fusion, Qwen25VLWithVGGT, sample_images
from vggt_cache.training.tiny import image_inputs, tiny_batch, tiny_qwen25vl_config

from helpers.service import TINY_MODEL

FIXTURE = TINY_MODEL
FRAMES = ["landscape.jpg", "portrait.png", "rgba.png", "tall.png"]


@pytest.fixture(scope="module")
def loaded():
    return load_aggregator(str(FIXTURE))


@pytest.fixture(scope="module")
def clips() -> list[torch.Tensor]:
    """Two 3-frame clips of the fixture images, preprocessed as the spec says (pad, 56, align 28)."""
    frames = [preprocess(FIXTURE / "preprocess" / name, mode="pad", size=56, align=28) for name in FRAMES]
    return [torch.stack(frames[:3]), torch.stack(frames[1:])]  # each [3, 3, 56, 56]


def make_spec(loaded, attention: str = "frame", dtype: str = "bfloat16", **kw) -> FeatureSpec:
    return FeatureSpec(
        **{
            "fingerprint": loaded.fingerprint,
            "architecture": loaded.config.to_dict(),
            "layers": (-1,),
            "preprocess": "pad",
            "size": 56,
            "align": 28,
            "dtype": dtype,
            "attention": attention,
            **kw,
        }
    )


def make_model(loaded, spec: FeatureSpec, vggt_weight: float = 1.0, **fusion) -> Qwen25VLWithVGGT:
    torch.manual_seed(0)
    qwen = Qwen2_5_VLForConditionalGeneration(tiny_qwen25vl_config())
    return Qwen25VLWithVGGT(qwen, loaded, spec, Fusion(vggt_weight=vggt_weight, **fusion))


def cache_entry(tmp_path: Path, loaded, spec: FeatureSpec, clip: torch.Tensor, name: str) -> torch.Tensor:
    """What the service would write for the clip's last frame, read back from a real file."""
    unit = clip[-1:] if spec.attention == "frame" else clip  # a frame-mode unit is the target alone
    entry = compute_features(loaded.model, unit[None], spec)[0, -1].clone()
    path = tmp_path / f"{name}.vggt_cache.pt"
    torch.save({"features": entry}, path)
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)["features"]


def loss_and_grads(model: Qwen25VLWithVGGT, batch: dict, **vggt) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(**batch, **vggt)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.loss.detach(), grads


def current_frame_batch(model: Qwen25VLWithVGGT, clips: list[torch.Tensor]) -> dict:
    return tiny_batch(model.config, [[clip[-1]] for clip in clips])


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("attention", ["frame", "causal"])
def test_cached_and_online_features_give_the_same_loss_and_gradients(tmp_path, loaded, clips, attention, dtype):
    spec = make_spec(loaded, attention, dtype)
    model = make_model(loaded, spec)
    batch = current_frame_batch(model, clips)
    cached = [cache_entry(tmp_path, loaded, spec, clip, f"s{b}") for b, clip in enumerate(clips)]
    assert cached[0].shape == (16, 128) and cached[0].dtype == spec.torch_dtype

    loss_cached, grads_cached = loss_and_grads(model, batch, vggt_features=cached)
    loss_online, grads_online = loss_and_grads(model, batch, images_vggt=clips)
    loss_mixed, grads_mixed = loss_and_grads(
        model, batch, vggt_features=[cached[0], None], images_vggt=[None, clips[1]]
    )

    assert torch.isfinite(loss_cached)
    assert torch.equal(loss_cached, loss_online) and torch.equal(loss_cached, loss_mixed)
    assert grads_cached.keys() == grads_online.keys() == grads_mixed.keys()
    for name, grad in grads_cached.items():
        assert torch.equal(grad, grads_online[name]), name
        assert torch.equal(grad, grads_mixed[name]), name
    assert grads_cached["merger.mlp.0.weight"].abs().sum() > 0


def test_vggt_features_change_the_loss_and_the_context_matters(loaded, clips):
    spec = make_spec(loaded, "causal")
    batch = current_frame_batch(make_model(loaded, spec), clips)
    with torch.no_grad():
        fused = make_model(loaded, spec)(**batch, images_vggt=clips).loss
        plain = make_model(loaded, spec, vggt_weight=0.0)(**batch, images_vggt=clips).loss
        alone = make_model(loaded, spec)(**batch, images_vggt=[clip[-1:] for clip in clips]).loss
    assert not torch.equal(fused, plain)
    # Causal features of the last frame depend on the frames before it.
    assert not torch.equal(fused, alone)


def test_vggt_stays_frozen_and_in_eval_mode(loaded, clips):
    model = make_model(loaded, make_spec(loaded))
    model.train()
    assert model.training and model.qwen.training and not model.vggt.training
    _, grads = loss_and_grads(model, current_frame_batch(model, clips), images_vggt=clips)
    assert not any(name.startswith("vggt.") for name in grads)
    assert all(p.grad is None for p in model.vggt.parameters())


def test_qwen_tokens_and_merged_vggt_grid_have_the_same_count(loaded, clips):
    model = make_model(loaded, make_spec(loaded))
    images = [clips[0][-1], torch.rand(3, 56, 84)]
    vision = image_inputs(images, model.config)
    assert vision["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 6]]
    embeds = model.qwen.model.get_image_features(**vision, return_dict=True).pooler_output
    assert [e.shape[0] for e in embeds] == [4, 6]
    for image, e in zip(images, embeds, strict=True):
        outputs, start = loaded.model(image[None, None], attention="frame", layers=[-1])
        patches = outputs[0][0, :, start:]  # [1, h*w, 128]
        grid = (image.shape[1] // 14, image.shape[2] // 14)
        assert model.merger(patches, grid).shape == (1, e.shape[0], model.config.text_config.hidden_size)


def test_non_square_images_several_images_per_sample_and_text_only_samples(loaded):
    spec = make_spec(loaded, "causal")
    model = make_model(loaded, spec)
    g = torch.Generator().manual_seed(1)
    wide = torch.rand(2, 3, 56, 84, generator=g)
    square = torch.rand(3, 3, 56, 56, generator=g)
    # Sample 0 shows Qwen a history image, then its current frame; sample 1 is text only.
    batch = tiny_batch(model.config, [[square[0], wide[-1]], [], [square[-1]]])
    assert sample_images(batch["input_ids"], batch["image_grid_thw"], 2, model.config.image_token_id) == [
        [0, 1],
        [],
        [2],
    ]
    cached = [compute_features(loaded.model, clip[None], spec)[0, -1] for clip in (wide, square)]
    loss_cached, _ = loss_and_grads(model, batch, vggt_features=[cached[0], None, cached[1]])
    loss_online, _ = loss_and_grads(model, batch, images_vggt=[wide, None, square])
    assert torch.equal(loss_cached, loss_online)
    with pytest.raises(ValueError, match="sample 1 has VGGT inputs but no image"):
        model(**batch, images_vggt=[wide, square, square])


def test_several_layers_and_all_tokens(tmp_path, loaded, clips):
    spec = make_spec(loaded, "frame", "float32", layers=(0, -1), tokens="all")
    model = make_model(loaded, spec)
    batch = current_frame_batch(model, clips)
    cached = [cache_entry(tmp_path, loaded, spec, clip, f"s{b}") for b, clip in enumerate(clips)]
    assert cached[0].shape == (2, 5 + 16, 128)
    loss_cached, grads_cached = loss_and_grads(model, batch, vggt_features=cached)
    loss_online, grads_online = loss_and_grads(model, batch, images_vggt=clips)
    assert torch.equal(loss_cached, loss_online)
    assert all(torch.equal(g, grads_online[n]) for n, g in grads_cached.items())


def test_wrong_vggt_inputs_are_refused_with_a_clear_error(tmp_path, loaded, clips):
    spec = make_spec(loaded)
    model = make_model(loaded, spec)
    batch = current_frame_batch(model, clips)
    good = cache_entry(tmp_path, loaded, spec, clips[0], "good")
    with pytest.raises(ValueError, match=r"sample 1: VGGT features have shape \[17, 128\], expected \[16, 128\]"):
        model(**batch, vggt_features=[good, torch.zeros(17, 128, dtype=torch.bfloat16)])
    with pytest.raises(ValueError, match=r"sample 1: VGGT features are torch.float32, the spec stores torch.bfloat16"):
        model(**batch, vggt_features=[good, good.float()])
    with pytest.raises(ValueError, match="sample 1 has neither vggt_features nor images_vggt"):
        model(**batch, vggt_features=[good, None])
    with pytest.raises(ValueError, match=r"sample 0: the VGGT grid 2x4 does not hold Qwen's 4x4 .*same image"):
        model(**batch, images_vggt=[torch.rand(2, 3, 28, 56), clips[1]])
    with pytest.raises(ValueError, match=r"sample 0: vggt_grid \[5, 4\] but images_vggt frames give \[4, 4\]"):
        model(**batch, images_vggt=clips, vggt_grid=[(5, 4), None])
    with pytest.raises(ValueError, match="vggt_features has 1 entries for a batch of 2"):
        model(**batch, vggt_features=[good])


def test_token_types_are_derived_as_the_processor_builds_them(loaded, clips):
    model = make_model(loaded, make_spec(loaded))
    batch = current_frame_batch(model, clips)
    types = (batch["input_ids"] == model.config.image_token_id).int()
    with torch.no_grad():
        derived = model(**batch, images_vggt=clips).loss
        given = model(**batch, images_vggt=clips, mm_token_type_ids=types).loss
    assert torch.equal(derived, given)


def test_merge_grid_follows_qwens_patch_order():
    h, w, p = 4, 6, 14
    ids = torch.arange(h * w, dtype=torch.float32)
    # An image whose 14-px patch k is filled with the value k, row-major.
    image = ids.view(h, w).repeat_interleave(p, 0).repeat_interleave(p, 1).expand(3, -1, -1) / 255
    out = Qwen2VLImageProcessorPil()(
        images=[image], do_resize=False, do_rescale=False, do_normalize=False, return_tensors="pt"
    )
    qwen_order = (out["pixel_values"][:, 0] * 255).round()  # patch id of each row, in Qwen's order
    merged = merge_grid(ids.view(1, h * w, 1), (h, w))  # [1, 6, 4]
    assert torch.equal(merged.flatten(), qwen_order)


def test_merger_refuses_odd_grids_and_wrong_widths():
    merger = VGGTMerger(vggt_dim=8, llm_dim=16)
    assert merger(torch.zeros(2, 16, 8), (4, 4)).shape == (2, 4, 16)
    with pytest.raises(
        ValueError, match=r"37x37 is not divisible by the spatial merge 2; cut it to Qwen2\.5-VL's even grid first"
    ):
        merger(torch.zeros(1, 37 * 37, 8), (37, 37))
    with pytest.raises(ValueError, match="expected 4x4=16 patch tokens, got 15"):
        merger(torch.zeros(1, 15, 8), (4, 4))
    with pytest.raises(ValueError, match="width 8, got 4"):
        merger(torch.zeros(1, 16, 4), (4, 4))


def test_select_features_layout(loaded):
    outputs = [torch.randn(2, 3, 21, 128), torch.randn(2, 3, 21, 128)]
    one = select_features(outputs[:1], 5, make_spec(loaded, layers=(-1,)))
    assert one.shape == (2, 3, 16, 128) and one.dtype == torch.bfloat16
    assert torch.equal(one, outputs[0][:, :, 5:].bfloat16())
    both = select_features(outputs, 5, make_spec(loaded, dtype="float32", layers=(1, 0), tokens="all"))
    assert both.shape == (2, 3, 2, 21, 128)
    assert torch.equal(both[:, :, 0], outputs[0]) and torch.equal(both[:, :, 1], outputs[1])
    with pytest.raises(ValueError, match=r"expected 2 layer output\(s\)"):
        select_features(outputs[:1], 5, make_spec(loaded, layers=(0, 1)))


def test_save_and_reload_give_the_same_model(tmp_path, loaded, clips):
    spec = make_spec(loaded, "causal")
    model = make_model(loaded, spec, vggt_weight=0.5)
    batch = current_frame_batch(model, clips)
    with torch.no_grad():
        model.merger.mlp[2].bias.add_(1.0)  # a trained merger, unlike a fresh one
        expected = model(**batch, images_vggt=clips).loss
    model.save_pretrained(tmp_path / "ckpt")
    assert not any(k.startswith("vggt.") for k in load_file(tmp_path / "ckpt" / "vggt_merger.safetensors"))
    reloaded = Qwen25VLWithVGGT.from_pretrained(tmp_path / "ckpt", loaded)
    assert reloaded.spec == spec and reloaded.fusion == Fusion(vggt_weight=0.5, merger_hidden_dim=512)
    with torch.no_grad():
        assert torch.equal(reloaded(**batch, images_vggt=clips).loss, expected)


def test_vggt_weights_must_be_the_specs(loaded):
    spec = dataclasses.replace(make_spec(loaded), fingerprint="sha256:" + "0" * 64)
    with pytest.raises(ValueError, match=r"VGGT weights sha256:.* are not the spec's sha256:0000"):
        make_model(loaded, spec)


def test_an_outer_autocast_does_not_change_the_features(loaded, clips):
    # HF Trainer's bf16=True wraps the forward in autocast; VGGT must still run as the service runs it.
    spec = make_spec(loaded, "causal", "float32")
    expected = compute_features(loaded.model, clips[0][None], spec)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(compute_features(loaded.model, clips[0][None], spec), expected)
        outputs, _ = loaded.model(clips[0][None], attention="causal", layers=[-1])
    assert not torch.equal(outputs[0][:, :, 5:].float(), expected)  # the guard is what keeps them equal


def test_hf_trainer_trains_the_merger_and_llm_on_a_mixed_batch(tmp_path, loaded, clips):
    from transformers import Trainer, TrainingArguments

    spec = make_spec(loaded, "causal")
    model = make_model(loaded, spec)
    samples = [{"clip": clip, "name": f"s{b}", "cached": b % 2 == 0} for b, clip in enumerate(clips * 2)]

    def collate(batch: list[dict]) -> dict:
        out = tiny_batch(model.config, [[s["clip"][-1]] for s in batch])
        out["vggt_features"] = [
            cache_entry(tmp_path, loaded, spec, s["clip"], s["name"]) if s["cached"] else None for s in batch
        ]
        out["images_vggt"] = [None if s["cached"] else s["clip"] for s in batch]
        return out

    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=2,
        max_steps=2,
        learning_rate=1e-3,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        remove_unused_columns=False,
        activation_checkpointing=True,
    )
    merger_before = model.merger.mlp[0].weight.detach().clone()
    llm_before = model.qwen.lm_head.weight.detach().clone()
    vggt_before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    result = Trainer(model=model, args=args, train_dataset=samples, data_collator=collate).train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
    assert model.qwen.is_activation_checkpointing
    assert not torch.equal(model.merger.mlp[0].weight, merger_before)
    assert not torch.equal(model.qwen.lm_head.weight, llm_before)
    assert all(torch.equal(v, vggt_before[k]) for k, v in loaded.model.state_dict().items())


def test_janusvln_crop_geometry_odd_vggt_grids_merge_onto_qwens_cut(loaded):
    # crop at 70 px of a 4:3 frame gives 70x56 -> a 5x4 VGGT grid (odd rows); Qwen sees the top 4x4.
    spec = make_spec(loaded, "causal", preprocess="crop", size=70, align=14, reference_frame="first")
    model = make_model(loaded, spec)
    g = torch.Generator().manual_seed(3)
    clip = torch.rand(3, 3, 70, 56, generator=g)  # [S, 3, H, W]
    batch = tiny_batch(model.config, [[clip[-1][:, :56]]])
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4]]
    entry = entry_features(loaded.model, clip[None], spec)[0, -1]  # [5*4, 128]
    assert entry.shape == (20, 128)
    loss_cached, grads_cached = loss_and_grads(model, batch, vggt_features=[entry], vggt_grid=[(5, 4)])
    loss_online, grads_online = loss_and_grads(model, batch, images_vggt=[clip])
    assert torch.equal(loss_cached, loss_online)
    assert all(torch.equal(g, grads_online[n]) for n, g in grads_cached.items())
    # The merged tokens are those of the grid's top 4 rows: JanusVLN's features[:, :h//2*2, :w//2*2].
    tokens = model._entry_to_patches(0, entry, (5, 4), (4, 4))
    assert torch.equal(tokens, entry.view(5, 4, 128)[:4].reshape(16, 128))
    with pytest.raises(ValueError, match=r"shape \[20, 128\], expected \[16, 128\] for a 4x4 patch grid"):
        model(**batch, vggt_features=[entry])  # without its grid, an entry is taken to be on Qwen's grid
    with pytest.raises(ValueError, match="the VGGT grid 6x4 does not hold Qwen's 4x4"):
        model(**batch, vggt_features=[entry], vggt_grid=[(6, 4)])


def test_janusvln_fusion_adds_the_merged_features_to_every_frame_with_an_rmsnorm_merger(loaded, clips):
    spec = make_spec(loaded, "causal", reference_frame="last")
    janus = make_model(
        loaded, spec, vggt_weight=0.2, merger_hidden_dim=4096, merger_norm="rmsnorm", add_to="all_frames"
    )
    assert janus.merger.hidden_dim == 4096 and janus.merger.mlp[0].out_features == 4096
    x = torch.randn(1, 16, 128)
    norm = janus.merger.norm
    assert torch.allclose(norm(x), x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6), atol=1e-6)
    sample = list(clips[0])  # Qwen sees all three frames of the clip
    batch = tiny_batch(janus.config, [sample])
    embeds = janus.qwen.model.get_image_features(
        batch["pixel_values"], batch["image_grid_thw"], return_dict=True
    ).pooler_output
    fused = janus._add_vggt(list(embeds), batch["input_ids"], batch["image_grid_thw"], None, [clips[0]], None)
    entry = entry_features(loaded.model, clips[0][None], spec)[0, -1]
    merged = janus.merger(entry[None].to(janus.merger.dtype), (4, 4))[0]
    for before, after in zip(embeds, fused, strict=True):
        assert torch.equal(after, before + 0.2 * merged)
    current_only = make_model(loaded, spec, vggt_weight=0.2, merger_hidden_dim=4096, merger_norm="rmsnorm")
    fused = current_only._add_vggt(list(embeds), batch["input_ids"], batch["image_grid_thw"], None, [clips[0]], None)
    assert (
        torch.equal(fused[0], embeds[0]) and torch.equal(fused[1], embeds[1]) and not torch.equal(fused[2], embeds[2])
    )
