"""Loading checkpoints (official layout, folders, files, HF cache), key checks, fingerprints, configs."""

from __future__ import annotations

import importlib.metadata
import json
import os
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants as hf_constants
from safetensors.torch import load_file, save_file

import vggt_cache.service.model.fingerprint as fingerprint_mod
from vggt_cache.service.model import AggregatorConfig, VGGTAggregator, file_fingerprint, load_aggregator

from helpers.service import FIXTURES, TINY_MODEL

FIXTURE = TINY_MODEL
KEYS_1B = FIXTURES / "vggt1b_checkpoint_keys.json"
HEADS = {"camera_head.x": torch.ones(3), "depth_head.y": torch.zeros(2, 2), "track_head.z.weight": torch.ones(1)}


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "vggt-cache-home"
    monkeypatch.setenv("VGGT_CACHE_HOME", str(home))
    return home


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return load_file(FIXTURE / "state_dict.safetensors")


@pytest.fixture(scope="module")
def fixture_config() -> dict:
    return json.loads((FIXTURE / "config.json").read_text())


def official_folder(folder: Path, state: dict, config: dict, fmt: str = "safetensors") -> Path:
    """A checkpoint folder laid out like facebook/VGGT-1B: `aggregator.` keys plus head keys."""
    folder.mkdir(parents=True, exist_ok=True)
    full = {f"aggregator.{k}": v for k, v in state.items()} | HEADS
    if fmt == "safetensors":
        save_file(full, folder / "model.safetensors")
    else:
        torch.save(full, folder / "model.pt")
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def sequence_outputs(model: VGGTAggregator) -> list[torch.Tensor]:
    images = load_file(FIXTURE / "inputs.safetensors")["images"]
    return model(images.to(model.camera_token.dtype), attention="sequence")[0]


def assert_matches_fixture(model: VGGTAggregator, state: dict) -> None:
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(loaded[k].float(), v), k
    expected = load_file(FIXTURE / "expected.safetensors")
    for layer, out in enumerate(sequence_outputs(model)):
        want = expected[f"sequence.{layer}"]
        assert ((out.float() - want).abs().max() / want.abs().max()).item() < 1e-4


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_official_layout_folder_loads(tmp_path, state, fixture_config, fmt):
    folder = official_folder(tmp_path / "ckpt", state, fixture_config, fmt)
    loaded = load_aggregator(folder)
    assert loaded.source == str(folder / f"model.{fmt}")
    assert loaded.config == AggregatorConfig.from_dict(fixture_config)
    assert loaded.num_params == sum(v.numel() for v in state.values()) == 340_864
    assert loaded.fingerprint.startswith("sha256:") and len(loaded.fingerprint) == 7 + 64
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert not any(t.is_meta for t in (*loaded.model.parameters(), *loaded.model.buffers()))
    assert_matches_fixture(loaded.model, state)


def test_folder_prefers_model_safetensors(tmp_path, state, fixture_config):
    folder = official_folder(tmp_path / "ckpt", state, fixture_config, "pt")
    official_folder(folder, state, fixture_config, "safetensors")
    assert load_aggregator(folder).source.endswith("model.safetensors")


def test_fixture_folder_and_files_load(tmp_path, state, fixture_config):
    assert_matches_fixture(load_aggregator(str(FIXTURE)).model, state)
    assert_matches_fixture(load_aggregator(FIXTURE / "state_dict.safetensors").model, state)
    pth = tmp_path / "weights.pth"
    torch.save(state, pth)
    (tmp_path / "config.json").write_text(json.dumps(fixture_config))
    assert_matches_fixture(load_aggregator(pth).model, state)


def test_file_without_config_takes_vgg1b_defaults(tmp_path, state):
    save_file(state, tmp_path / "tiny.safetensors")
    with pytest.raises(ValueError, match="mis-shaped") as info:
        load_aggregator(tmp_path / "tiny.safetensors")
    assert "camera_token (checkpoint [1, 2, 1, 64], model [1, 2, 1, 1024])" in str(info.value)


def test_dtype_and_buffers(tmp_path, state, fixture_config):
    loaded = load_aggregator(official_folder(tmp_path / "ckpt", state, fixture_config), dtype=torch.float64)
    model = loaded.model
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert model._resnet_mean.dtype == torch.float64
    torch.testing.assert_close(model._resnet_std.flatten(), torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64))
    assert "_resnet_mean" not in model.state_dict()
    assert_matches_fixture(model, state)


def test_missing_key_is_refused(tmp_path, state, fixture_config):
    broken = {k: v for k, v in state.items() if k != "global_blocks.1.attn.k_norm.weight"}
    official_folder(tmp_path / "ckpt", broken, fixture_config)
    with pytest.raises(ValueError, match=r"1 missing key\(s\): global_blocks\.1\.attn\.k_norm\.weight"):
        load_aggregator(tmp_path / "ckpt")


def test_misshaped_key_is_refused(tmp_path, state, fixture_config):
    broken = dict(state, **{"frame_blocks.0.mlp.fc1.bias": torch.zeros(255)})
    official_folder(tmp_path / "ckpt", broken, fixture_config, "pt")
    with pytest.raises(ValueError, match=r"mis-shaped key\(s\): frame_blocks\.0\.mlp\.fc1\.bias \(checkpoint \[255\]"):
        load_aggregator(tmp_path / "ckpt")


def test_unexpected_key_is_refused_but_heads_are_ignored(tmp_path, state, fixture_config):
    broken = dict(state, **{"extra.weight": torch.zeros(1)})
    official_folder(tmp_path / "ckpt", broken, fixture_config)
    with pytest.raises(ValueError, match=r"1 unexpected key\(s\): extra\.weight") as info:
        load_aggregator(tmp_path / "ckpt")
    assert "head" not in str(info.value)


def test_refusal_names_only_the_first_few(tmp_path, fixture_config):
    save_file({"aggregator.camera_token": torch.zeros(1, 2, 1, 64)}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(fixture_config))
    with pytest.raises(ValueError, match=r"missing key\(s\): .* and \d+ more"):
        load_aggregator(tmp_path)


def test_hugging_face_cache(tmp_path, monkeypatch, state, fixture_config):
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match="`hf download facebook/VGGT-1B`"):
        load_aggregator()
    # The command the message names is one the installed huggingface_hub provides.
    scripts = {
        ep.name
        for ep in importlib.metadata.entry_points(group="console_scripts")
        if ep.dist is not None and ep.dist.name.replace("-", "_") == "huggingface_hub"
    }
    assert "hf" in scripts, scripts
    commit = "0" * 40
    repo = tmp_path / "hub" / "models--someone--tiny-vggt"
    official_folder(repo / "snapshots" / commit, state, fixture_config, "pt")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    loaded = load_aggregator("someone/tiny-vggt")
    assert loaded.source == str(repo / "snapshots" / commit / "model.pt")
    assert_matches_fixture(loaded.model, state)


def test_unknown_source(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither"):
        load_aggregator(str(tmp_path / "no" / "such" / "thing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no weights"):
        load_aggregator(tmp_path / "empty")


def test_fingerprint_changes_with_weights_and_is_memoised(tmp_path, monkeypatch, state, fixture_config, cache_home):
    hashed: list[str] = []
    real = fingerprint_mod._sha256_file
    monkeypatch.setattr(fingerprint_mod, "_sha256_file", lambda path: hashed.append(path) or real(path))
    folder = official_folder(tmp_path / "ckpt", state, fixture_config)
    weights = str(folder / "model.safetensors")

    first = load_aggregator(folder).fingerprint
    assert hashed == [weights]
    sidecar = json.loads((cache_home / "fingerprints.json").read_text())
    st = os.stat(weights)
    assert sidecar[weights] == {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "fingerprint": first}
    assert load_aggregator(folder).fingerprint == first
    assert hashed == [weights]  # second start: no re-hash
    assert os.listdir(cache_home) == ["fingerprints.json"]  # atomic write left no temporary file

    changed = dict(state, camera_token=state["camera_token"] + 1)
    official_folder(folder, changed, fixture_config)
    second = load_aggregator(folder).fingerprint
    assert second != first and len(hashed) == 2

    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched, same bytes
    assert file_fingerprint(weights) == second and len(hashed) == 3


def test_fingerprint_survives_a_corrupt_sidecar(tmp_path, cache_home):
    cache_home.mkdir()
    (cache_home / "fingerprints.json").write_text("{not json")
    target = tmp_path / "w.bin"
    target.write_bytes(b"abc")
    expected = "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert file_fingerprint(target) == expected
    assert json.loads((cache_home / "fingerprints.json").read_text())[str(target)]["fingerprint"] == expected


def test_fingerprint_sidecar_forgets_deleted_files(tmp_path, cache_home):
    gone, kept = tmp_path / "gone.bin", tmp_path / "kept.bin"
    gone.write_bytes(b"old")
    kept.write_bytes(b"new")
    file_fingerprint(gone)
    gone.unlink()
    file_fingerprint(kept)
    assert list(json.loads((cache_home / "fingerprints.json").read_text())) == [str(kept)]


def test_full_size_model_on_meta_has_the_official_keys():
    official = json.loads(KEYS_1B.read_text())
    expected = {k.removeprefix("aggregator."): v for k, v in official["keys"].items() if k.startswith("aggregator.")}
    with torch.device("meta"):
        model = VGGTAggregator(AggregatorConfig())
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == expected
    assert sum(p.numel() for p in model.parameters()) == official["aggregator_params"] == 909_112_320


def test_config_from_dict_and_to_dict(fixture_config):
    config = AggregatorConfig.from_dict(fixture_config)
    assert (config.embed_dim, config.depth, config.patch_embed.depth, config.patch_start_idx) == (64, 2, 2, 5)
    canonical = config.to_dict()
    assert "patch_start_idx" not in canonical
    assert json.loads(json.dumps(canonical)) == canonical
    assert AggregatorConfig.from_dict(canonical) == config
    assert canonical == {k: v for k, v in fixture_config.items() if k != "patch_start_idx"}
    # The official VGGT config.json: unknown keys ignored, everything else VGGT-1B.
    official = {"img_size": 518, "patch_size": 14, "embed_dim": 1024, "enable_camera": True, "enable_depth": True}
    assert AggregatorConfig.from_dict(official) == AggregatorConfig() == AggregatorConfig.from_dict({})
    assert AggregatorConfig().to_dict()["patch_embed"]["init_values"] == 1.0


def test_config_rejects_inconsistent_values():
    with pytest.raises(ValueError, match=r"patch_embed\.embed_dim"):
        AggregatorConfig.from_dict({"embed_dim": 64, "num_heads": 4, "patch_embed": {"embed_dim": 128}})
    with pytest.raises(ValueError, match="multiple of num_heads"):
        AggregatorConfig.from_dict({"num_heads": 7})
    with pytest.raises(ValueError, match="integer"):
        AggregatorConfig.from_dict({"depth": 2.5})
