import json

import pytest
import torch
from safetensors.torch import save as st_save

from vggt_cache.client.wire import META_KEY, decode_features, encode_features


def item(image, status="computed", tensor="0", error=None, grid=(3, 5)):
    return {"image": image, "status": status, "tensor": tensor, "error": error, "grid": list(grid) if grid else None}


def sample():
    batch = torch.randn(3, 15, 16).to(torch.bfloat16)
    items = [
        item("/d/a.jpg", "computed", "0"),
        item("/d/b.jpg", "failed", None, "cannot decode image /d/b.jpg", None),
        item("/d/c.jpg", "cached", "1"),
    ]
    # Views of one batch, as the engine produces them.
    return items, {"0": batch[0], "1": batch[2]}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_round_trip(dtype):
    items, tensors = sample()
    tensors = {k: v.to(dtype) for k, v in tensors.items()}
    body = encode_features(items, tensors, "0123456789abcdef", [0, 1, 1])
    assert isinstance(body, bytes)
    got_items, got = decode_features(body, expected_digest="0123456789abcdef")
    assert got_items == [{**i, "request": r} for i, r in zip(items, [0, 1, 1], strict=True)]
    assert set(got) == {"0", "1"}
    for name in got:
        assert got[name].dtype == dtype and torch.equal(got[name], tensors[name])


def test_multi_layer_and_empty_bodies():
    stacked = torch.randn(2, 15, 16, dtype=torch.bfloat16)
    _, got = decode_features(encode_features([item("x")], {"0": stacked}, "d", [0]))
    assert torch.equal(got["0"], stacked)
    assert decode_features(encode_features([], {}, "d", [])) == ([], {})
    failed = [item("x", "failed", None, "boom", None)]
    assert decode_features(encode_features(failed, {}, "d", [3])) == ([{**failed[0], "request": 3}], {})


def test_expected_digest_is_enforced():
    items, tensors = sample()
    body = encode_features(items, tensors, "aaaa", [0, 1, 2])
    with pytest.raises(ValueError, match="spec aaaa, expected bbbb"):
        decode_features(body, expected_digest="bbbb")


@pytest.mark.parametrize(
    "items, names, message",
    [
        ([item("a", tensor="7")], ["0"], "not in the body"),
        ([item("a"), item("b")], ["0"], "referenced twice"),
        ([item("a")], ["0", "1"], "not referenced"),
        ([item("a", status="done")], ["0"], "status"),
        ([item("a", error="x")], ["0"], "no error"),
        ([item("a", grid=None)], ["0"], "has a grid"),
        ([item("a", grid=(3, 0))], ["0"], "grid"),
        ([item("a", "failed", "0", "x")], ["0"], "no tensor"),
        ([item("a", "failed", None, None, None)], [], "'error' string"),
        ([{"image": "a"}], [], "keys"),
        ([{**item("a"), "image": 5}], ["0"], "'image'"),
        ([item("a", tensor=["0"])], ["0"], "not in the body"),
    ],
)
def test_encode_rejects_inconsistent_items(items, names, message):
    tensors = {n: torch.zeros(15, 16) for n in names}
    with pytest.raises(ValueError, match=message):
        encode_features(items, tensors, "d", [0] * len(items))


def test_encode_rejects_a_bad_digest_and_bad_request_positions():
    with pytest.raises(ValueError, match="spec_digest"):
        encode_features([], {}, "", [])
    with pytest.raises(ValueError, match="'requests' must list 1 non-negative"):
        encode_features([item("a")], {"0": torch.zeros(15, 16)}, "d", [-1])


def test_a_body_without_request_positions_is_refused_by_name():
    # What a service of the first release sends: the items alone.
    body = _body_with_meta(
        {META_KEY: json.dumps({"items": [item("a")], "spec_digest": "d"})}, {"0": torch.zeros(15, 16)}
    )
    with pytest.raises(ValueError, match="older than this client"):
        decode_features(body)


def _body_with_meta(meta, tensors=None):
    return st_save(tensors or {}, metadata=meta)


@pytest.mark.parametrize(
    "body, message",
    [
        (b"", "too short"),
        (b"\xff" * 8 + b"{}", "past the end"),
        ((10).to_bytes(8, "little") + b"not json!!", "metadata"),
        (_body_with_meta(None), "metadata"),
        (_body_with_meta({"other": "x"}), "metadata"),
        (_body_with_meta({META_KEY: "not json"}), "metadata"),
        (_body_with_meta({META_KEY: "[1, 2]"}), "not an object"),
        (_body_with_meta({META_KEY: json.dumps({"items": {}, "spec_digest": "d"})}), "not a list"),
        (_body_with_meta({META_KEY: json.dumps({"items": []})}), "spec_digest"),
        (
            _body_with_meta(
                {META_KEY: json.dumps({"items": [item("a", tensor="1")], "spec_digest": "d"})},
                {"0": torch.zeros(2)},
            ),
            "not in the body",
        ),
    ],
)
def test_decode_rejects_malformed_bodies(body, message):
    with pytest.raises(ValueError, match=message):
        decode_features(body)


def test_decode_rejects_truncated_tensor_data():
    items, tensors = sample()
    body = encode_features(items, tensors, "d", [0, 1, 2])
    with pytest.raises(ValueError, match="malformed"):
        decode_features(body[:-10])


def test_decode_rejects_non_bytes():
    with pytest.raises(ValueError, match="bytes"):
        decode_features("text")
