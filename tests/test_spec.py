import dataclasses
import hashlib
import json

import pytest
import torch

from client.spec import FeatureSpec

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
    with pytest.raises(ValueError, match="unknown.*colour"):
        FeatureSpec.from_dict({**d, "colour": "red"})
    del d["architecture"]
    with pytest.raises(ValueError, match="lacks.*architecture"):
        FeatureSpec.from_dict(d)
    with pytest.raises(ValueError, match="must be a dict"):
        FeatureSpec.from_dict([1])


def test_differences_names_fields():
    assert make().differences(make(dtype="float32", attention="causal")) == ["attention", "dtype"]
    assert make().differences(make(layers=[-2])) == []
