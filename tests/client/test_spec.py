import dataclasses
import hashlib
import json

import pytest
import torch

from vggt_cache.client.spec import FeatureSpec, matching_preset, preset_options

ARCH = {"img_size": 518, "patch_size": 14, "embed_dim": 1024, "depth": 24, "num_heads": 16}
FP = "sha256:" + "ab" * 32


def make(**kw) -> FeatureSpec:
    return FeatureSpec(**{"fingerprint": FP, "architecture": ARCH, **kw})


def test_defaults_and_layer_normalisation():
    spec = make()
    assert spec.layers == (22,)
    assert spec == make(layers=[22]) == make(layers=(-2,))
    assert spec.digest == make(layers=[22]).digest
    assert hash(spec) == hash(make(layers=[22]))
    assert make(layers=[-1, 0]).layers == (23, 0)


def test_canonical_json_and_digest():
    spec = make(dtype="float16", attention="causal")
    text = spec.canonical_json()
    assert text == json.dumps(spec.to_dict(), sort_keys=True, separators=(",", ":"))
    assert " " not in text and json.loads(text)["layers"] == [22]
    assert spec.digest == hashlib.sha256(text.encode()).hexdigest()[:16]
    assert len(spec.digest) == 16
    assert make().digest != spec.digest


@pytest.mark.parametrize(
    "change",
    [
        {"fingerprint": "sha256:" + "cd" * 32},
        {"architecture": {**ARCH, "embed_dim": 512}},
        {"layers": (21,)},
        {"layers": (21, 22)},
        {"tokens": "all"},
        {"preprocess": "pad"},
        {"size": 504},
        {"align": 28},
        {"dtype": "float32"},
        {"attention": "sequence"},
    ],
)
def test_every_field_changes_the_digest(change):
    assert make(**change).digest != make().digest
    assert make(**change) != make()


def test_round_trip_through_json():
    spec = make(layers=[4, -1], tokens="all", preprocess="pad", align=28, attention="sequence")
    back = FeatureSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert back == spec and back.digest == spec.digest
    assert back.layers == (4, 23)


def test_architecture_is_detached_from_the_callers_dict():
    arch = dict(ARCH)
    spec = make(architecture=arch)
    arch["depth"] = 12
    assert spec.architecture["depth"] == 24


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        make().dtype = "float32"


@pytest.mark.parametrize(
    "name, dtype", [("bfloat16", torch.bfloat16), ("float16", torch.float16), ("float32", torch.float32)]
)
def test_torch_dtype(name, dtype):
    assert make(dtype=name).torch_dtype is dtype


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"fingerprint": "abc"}, "fingerprint"),
        ({"fingerprint": 5}, "fingerprint"),
        ({"architecture": {"embed_dim": 1024}}, "depth"),
        ({"architecture": {"depth": 0}}, "depth"),
        ({"architecture": [1, 2]}, "architecture must be a dict"),
        ({"architecture": {**ARCH, "embed_dim": "1024"}}, "embed_dim"),
        ({"architecture": {**ARCH, "num_register_tokens": -1}}, "num_register_tokens"),
        ({"architecture": {**ARCH, "patch_size": 0}}, "patch_size"),
        ({"architecture": {"depth": 24, "x": object()}}, "JSON"),
        ({"layers": ()}, "at least one"),
        ({"layers": (24,)}, "out of range"),
        ({"layers": (-25,)}, "out of range"),
        ({"layers": (1.0,)}, "integers"),
        ({"layers": (True,)}, "integers"),
        ({"layers": "22"}, "sequence"),
        ({"layers": (-2, 22)}, "same layer twice"),
        ({"tokens": "cls"}, "tokens"),
        ({"preprocess": "resize"}, "preprocess"),
        ({"size": 500}, "multiple of the patch size"),
        ({"size": -518}, "positive"),
        ({"align": 0}, "positive"),
        ({"align": 20}, "multiple of the patch size"),
        ({"dtype": "int8"}, "dtype"),
        ({"attention": "global"}, "attention"),
    ],
)
def test_validation(kw, message):
    with pytest.raises(ValueError, match=message):
        make(**kw)


def test_from_dict_rejects_unknown_and_missing_fields():
    d = make().to_dict()
    with pytest.raises(ValueError, match=r"unknown.*colour"):
        FeatureSpec.from_dict({**d, "colour": "red"})
    del d["architecture"]
    with pytest.raises(ValueError, match=r"lacks.*architecture"):
        FeatureSpec.from_dict(d)
    with pytest.raises(ValueError, match="must be a dict"):
        FeatureSpec.from_dict([1])


def test_differences_names_fields():
    assert make().differences(make(dtype="float32", attention="causal")) == ["attention", "dtype"]
    assert make().differences(make(layers=[-2])) == []


def test_specs_without_a_reference_frame_keep_the_digest_they_had_before_it_existed():
    # Digests computed by the release before `reference_frame` existed: a multi-TB cache stays valid.
    assert make().digest == "8fcc46c329be4b1a"
    assert make(attention="causal", preprocess="crop", size=644).digest == "b04709f488273ee7"
    assert make(attention="causal", preprocess="pad", size=644, dtype="float32").digest == "852a4c9d2595d002"
    assert "reference_frame" not in make(attention="causal").to_dict()
    assert FeatureSpec.from_dict({**make().to_dict(), "reference_frame": "first"}) == make()


def test_reference_frame_last_is_another_spec_and_means_nothing_for_one_frame():
    last = make(attention="causal", reference_frame="last")
    assert last.to_dict()["reference_frame"] == "last" and last.digest != make(attention="causal").digest
    assert FeatureSpec.from_dict(json.loads(last.canonical_json())) == last
    assert last.differences(make(attention="causal")) == ["reference_frame"]
    assert make(attention="frame", reference_frame="last") == make()  # a single frame is its own first
    with pytest.raises(ValueError, match=r"reference_frame must be one of first\|last"):
        make(attention="causal", reference_frame="middle")


def test_presets_give_each_projects_training_spec_and_are_recognised_however_given():
    janus = make(**preset_options("janusvln"))
    new = make(**preset_options("newjanusvln"))
    assert (janus.attention, janus.preprocess, janus.size, janus.reference_frame, janus.layers) == (
        "causal",
        "crop",
        644,
        "first",
        (22,),
    )
    assert (new.attention, new.preprocess, new.size, new.reference_frame, new.dtype) == (
        "causal",
        "pad",
        644,
        "last",
        "bfloat16",
    )
    assert matching_preset(new) == "newjanusvln" and matching_preset(janus) == "janusvln"
    assert (
        matching_preset(make(attention="causal", preprocess="pad", size=644, reference_frame="last", layers=[22]))
        == "newjanusvln"
    )
    assert matching_preset(dataclasses.replace(new, dtype="float32")) is None and matching_preset(make()) is None
    with pytest.raises(ValueError, match=r"preset must be one of janusvln\|newjanusvln"):
        preset_options("janus")
