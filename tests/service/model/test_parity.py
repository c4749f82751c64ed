"""VGGTAggregator against the reference fixture (tests/fixtures/vggt_tiny), and its attention modes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from vggt_cache.service.model import AggregatorConfig, KVCache, VGGTAggregator

from helpers.service import TINY_MODEL

FIXTURE = TINY_MODEL
MODES = ("frame", "sequence", "causal")
TOL32 = 1e-4  # x max|expected|, float32 against the float64 reference
# The fixture stores its float64 results as float32, so float64 can only be checked down to that rounding
# (our float32 runs sit at ~7e-7); float64 consistency between our own modes is checked at 1e-10.
TOL64_FIXTURE = 3e-7
TOL64 = 1e-10


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.to(actual.dtype)
    return ((actual - expected).abs().max() / expected.abs().max()).item()


@pytest.fixture(scope="module")
def model32() -> VGGTAggregator:
    config = AggregatorConfig.from_dict(json.loads((FIXTURE / "config.json").read_text()))
    model = VGGTAggregator(config)
    model.load_state_dict(load_file(FIXTURE / "state_dict.safetensors"))
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def model64(model32: VGGTAggregator) -> VGGTAggregator:
    model = VGGTAggregator(model32.config)
    model.load_state_dict(model32.state_dict())
    return model.double().eval().requires_grad_(False)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return load_file(FIXTURE / "inputs.safetensors")["images"]  # [1, 3, 3, 42, 70]


@pytest.fixture(scope="module")
def expected() -> dict[str, torch.Tensor]:
    return load_file(FIXTURE / "expected.safetensors")


@pytest.mark.parametrize("mode", MODES)
def test_every_layer_matches_reference_float32(model32, images, expected, mode):
    outputs, patch_start_idx = model32(images, attention=mode)
    assert patch_start_idx == 5
    assert len(outputs) == model32.config.depth == 2
    for layer, out in enumerate(outputs):
        want = expected[f"{mode}.{layer}"]
        assert out.shape == want.shape == (1, 3, 20, 128)
        assert out.dtype == torch.float32
        assert rel_err(out, want) < TOL32, (mode, layer)


@pytest.mark.parametrize("mode", MODES)
def test_every_layer_matches_reference_float64(model64, images, expected, mode):
    outputs, _ = model64(images.double(), attention=mode)
    for layer, out in enumerate(outputs):
        assert out.dtype == torch.float64
        assert rel_err(out, expected[f"{mode}.{layer}"]) < TOL64_FIXTURE, (mode, layer)


def test_modes_differ(model32, images):
    """Guards the parity tests: the three modes really compute different things on this clip."""
    outs = {mode: model32(images, attention=mode, layers=[-1])[0][0] for mode in MODES}
    assert rel_err(outs["sequence"], outs["causal"]) > 1e-3
    assert rel_err(outs["frame"], outs["causal"]) > 1e-3
    # The first frame sees only itself in both frame and causal modes.
    torch.testing.assert_close(outs["frame"][:, 0], outs["causal"][:, 0])


def test_frame_mode_is_each_frame_alone(model64, images):
    together, _ = model64(images.double(), attention="frame")
    for s in range(images.shape[1]):
        alone, _ = model64(images[:, s : s + 1].double(), attention="sequence")
        for a, t in zip(alone, together, strict=True):
            assert rel_err(t[:, s : s + 1], a) < TOL64


@pytest.mark.parametrize("chunks", [(1, 1, 1), (2, 1), (1, 2)])
def test_streaming_equals_causal(model32, model64, images, expected, chunks):
    for model, dtype in ((model32, torch.float32), (model64, torch.float64)):
        clip = images.to(dtype)
        whole, _ = model(clip, attention="causal")
        cache = KVCache()
        pieces, start = [], 0
        for n in chunks:
            outputs, _ = model(clip[:, start : start + n], attention="causal", kv_cache=cache)
            pieces.append(outputs)
            start += n
        assert cache.num_frames == 3 and cache.num_layers == 2
        for layer in range(2):
            streamed = torch.cat([p[layer] for p in pieces], dim=1)
            assert rel_err(streamed, expected[f"causal.{layer}"]) < TOL32
            if dtype == torch.float64:
                assert rel_err(streamed, whole[layer]) < TOL64


def test_cache_reset_starts_a_new_clip(model64, images):
    clip = images.double()
    cache = KVCache()
    first, _ = model64(clip[:, :1], attention="causal", kv_cache=cache)
    model64(clip[:, 1:], attention="causal", kv_cache=cache)
    cache.reset()
    again, _ = model64(clip[:, :1], attention="causal", kv_cache=cache)
    assert rel_err(again[-1], first[-1]) < TOL64
    # Without the reset, the same frame would be a later frame (camera token 1, earlier frames in view).
    later, _ = model64(clip[:, :1], attention="causal", kv_cache=cache)
    assert rel_err(later[-1], first[-1]) > 1e-3


def test_layer_selection(model32, images, expected):
    for layers, names in (([-1], ["1"]), ([0], ["0"]), ([0, -1], ["0", "1"]), ([1, 0], ["1", "0"])):
        outputs, _ = model32(images, attention="sequence", layers=layers)
        assert len(outputs) == len(names)
        for out, name in zip(outputs, names, strict=True):
            assert rel_err(out, expected[f"sequence.{name}"]) < TOL32


def test_computes_only_up_to_the_deepest_requested_layer(model32, images):
    calls: list[str] = []
    hooks = [
        block.register_forward_hook(lambda *_, name=f"{kind}{i}": calls.append(name))
        for kind, blocks in (("frame", model32.frame_blocks), ("global", model32.global_blocks))
        for i, block in enumerate(blocks)
    ]
    try:
        model32(images, attention="sequence", layers=[0])
        assert calls == ["frame0", "global0"]
    finally:
        for hook in hooks:
            hook.remove()


@pytest.mark.parametrize("mode", MODES)
def test_batch_of_clips_equals_each_alone(model64, images, mode):
    clip = images.double()
    reverse = clip.flip(1)
    batch, _ = model64(torch.cat((clip, reverse)), attention=mode)
    alone = [model64(c, attention=mode)[0] for c in (clip, reverse)]
    for layer, out in enumerate(batch):
        assert out.shape == (2, 3, 20, 128)
        for b in range(2):
            assert rel_err(out[b : b + 1], alone[b][layer]) < TOL64, (mode, layer, b)


def test_streaming_a_batch_of_clips(model64, images):
    clips = torch.cat((images, images.flip(1))).double()
    whole, _ = model64(clips, attention="causal")
    cache = KVCache()
    streamed = [model64(clips[:, s : s + 1], attention="causal", kv_cache=cache)[0] for s in range(3)]
    for layer in range(2):
        assert rel_err(torch.cat([s[layer] for s in streamed], dim=1), whole[layer]) < TOL64


def test_cache_refuses_mismatched_calls(model32, images):
    cache = KVCache()
    model32(images[:, :1], attention="causal", layers=[0], kv_cache=cache)
    assert cache.num_layers == 1
    with pytest.raises(ValueError, match="global block"):
        model32(images[:, 1:2], attention="causal", layers=[1], kv_cache=cache)
    with pytest.raises(ValueError, match="clip"):
        model32(torch.cat((images, images))[:, 1:2], attention="causal", layers=[0], kv_cache=cache)
    with pytest.raises(ValueError, match="tokens per frame"):
        model32(images[:, 1:2, :, :28], attention="causal", layers=[0], kv_cache=cache)
    with pytest.raises(ValueError, match="causal"):
        model32(images, attention="sequence", kv_cache=cache)
    # A shallower request still extends every cached block, so the stream stays usable.
    model32(images[:, 1:2], attention="causal", layers=[0], kv_cache=cache)
    assert cache.num_frames == 2


def test_rejects_bad_arguments(model32, images):
    with pytest.raises(ValueError, match="attention"):
        model32(images, attention="bidirectional")
    with pytest.raises(ValueError, match="out of range"):
        model32(images, layers=[2])
    with pytest.raises(ValueError, match="out of range"):
        model32(images, layers=[-3])
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model32(images[..., :40])
    with pytest.raises(ValueError, match=r"\[B, S, 3, H, W\]"):
        model32(images[0])


def test_pos_embed_interpolation_is_used(model32, images):
    """42x70 frames give a 3x5 grid from the 4x4 pos_embed; a 56x56 frame uses it as is."""
    encoder = model32.patch_embed
    assert encoder.interpolate_pos_encoding(3, 5, torch.float32).shape == (1, 16, 64)
    assert torch.equal(encoder.interpolate_pos_encoding(4, 4, torch.float32), encoder.pos_embed)
    square = torch.rand(1, 1, 3, 56, 56)
    outputs, _ = model32(square, attention="frame")
    assert outputs[0].shape == (1, 1, 5 + 16, 128)


def test_trainable_fresh_model(model32, images):
    """A fresh (non-frozen) aggregator is an ordinary nn.Module: gradients reach its weights."""
    model = VGGTAggregator(model32.config).train()
    outputs, _ = model(images[:, :2], attention="causal", layers=[-1])
    outputs[0].square().mean().backward()
    assert model.patch_embed.patch_embed.proj.weight.grad is not None
    assert model.global_blocks[1].attn.qkv.weight.grad.abs().sum() > 0
    assert model.camera_token.grad.abs().sum() > 0


@pytest.mark.parametrize("chunks", [(3,), (1, 2), (2, 1)])
def test_chunked_block_causal_attention_equals_the_dense_mask(model32, images, chunks):
    # Two clips of 3 frames; the reference path builds the (S*P)^2 boolean mask, the default never does.
    clips = torch.cat([images, images.flip(1)])  # [2, 3, 3, H, W]
    results = {}
    for impl in ("mask", "chunked"):
        model32.causal_impl = impl
        try:
            cache, outs, start = KVCache(), [], 0
            for n in chunks:  # a clip streamed in calls of n frames continues through the cache
                out, _ = model32(clips[:, start : start + n], attention="causal", kv_cache=cache)
                outs.append(out)
                start += n
            results[impl] = [torch.cat([o[layer] for o in outs], dim=1) for layer in range(len(outs[0]))]
        finally:
            model32.causal_impl = "chunked"
    for dense, chunked in zip(results["mask"], results["chunked"], strict=True):
        assert rel_err(chunked, dense) < 1e-5
    assert not torch.equal(results["chunked"][0][0], results["chunked"][0][1])  # the two clips differ


@pytest.mark.parametrize("mode", MODES)
def test_patches_embedded_elsewhere_give_the_same_outputs(model32, images, mode):
    # A frame's DINOv2 tokens depend on it alone: embedded in another batch, in another order, or
    # given for a repeated frame, they make the same features as the forward computing them itself.
    clips = torch.cat([images, images[:, [0, 0, 2]]])  # [2, 3, 3, H, W]; clip 2 repeats frame 0
    B, S = clips.shape[:2]
    distinct = torch.stack([images[0, 2], images[0, 0], images[0, 1]])  # embedded once each, shuffled
    tokens = model32.embed_patches(distinct)  # [3, h*w, C]
    order = {0: 1, 1: 2, 2: 0}  # frame index -> row of `tokens`
    patches = tokens[[order[i] for i in (0, 1, 2, 0, 0, 2)]].unflatten(0, (B, S))  # [2, 3, h*w, C]
    own, _ = model32(clips, attention=mode)
    given, _ = model32(clips, attention=mode, patches=patches)
    for a, b in zip(own, given, strict=True):
        assert rel_err(b, a) < 1e-5
    with pytest.raises(ValueError, match="patches must be"):
        model32(clips, attention=mode, patches=patches[:, :2])


def test_compiled_blocks_give_the_eager_features(model32, images):
    import copy

    from vggt_cache.service.model.resident import compile_blocks, make_resident

    compiled = compile_blocks(make_resident(copy.deepcopy(model32), torch.device("cpu"), torch.float32))
    clips = torch.cat([images, images.flip(1)])  # [2, 3, 3, H, W]
    for mode in ("causal", "frame"):
        with torch.inference_mode():
            eager, _ = model32(clips, attention=mode, layers=[-1])
            fast, _ = compiled(clips, attention=mode, layers=[-1])
        assert rel_err(fast[0], eager[0]) < 1e-5
    assert all(getattr(b, "_compiled_call_impl", None) is not None for b in compiled.global_blocks)
    import torch._dynamo.config as dynamo_config

    assert dynamo_config.recompile_limit >= 32  # clip lengths and block kinds compile instead of falling back


def test_resident_weights_dtype_follows_the_device_and_the_storage_dtype(model32):
    from vggt_cache.service.model.resident import weights_dtype

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert weights_dtype(cuda, torch.bfloat16) == weights_dtype(cuda, torch.float16) == torch.bfloat16
    assert weights_dtype(cuda, torch.bfloat16, fp32_weights=True) == torch.float32
    assert weights_dtype(cuda, torch.float32) == weights_dtype(cpu, torch.bfloat16) == torch.float32


def test_bfloat16_resident_weights_give_what_autocast_gives_with_float32_weights(model32, images):
    # Only the matmul and conv weights are held in bfloat16, which autocast casts them to anyway;
    # norms, LayerScale, tokens and the position embedding stay float32 (the residual streams too).
    import copy

    from vggt_cache.service.model.resident import make_resident

    resident = make_resident(copy.deepcopy(model32), torch.device("cpu"), torch.bfloat16)
    assert resident.frame_blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    assert resident.patch_embed.patch_embed.proj.weight.dtype == torch.bfloat16
    assert resident.frame_blocks[0].norm1.weight.dtype == resident.patch_embed.pos_embed.dtype == torch.float32
    assert resident.camera_token.dtype == resident._resnet_mean.dtype == torch.float32
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        reference, _ = model32(images, attention="causal", layers=[-1])
        held, _ = resident(images, attention="causal", layers=[-1])
    assert torch.equal(held[0], reference[0])
