"""The `/features` response body: safetensors bytes with a JSON item list.

Tensors are named "0", "1", ...; the safetensors metadata key `vggt_cache`
holds `json.dumps({"items": [...], "spec_digest": str, "requests": [int, ...]})`,
each item being `{"image", "status": "cached"|"computed"|"failed", "tensor":
name|None, "error": str|None, "grid": [h, w]|None}`. Failed items carry an error
and no tensor; the others carry a tensor and a grid and no error. `requests[i]`
is the position, in the request's `images` then `clips`, of the entry item `i`
answers (a `sequence` clip has one item per frame); the decoder puts it in each
item as `"request"`. Items keep their fixed keys, so a reader of the first
release still decodes the body.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from enum import Enum
from typing import Any

import torch
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

META_KEY = "vggt_cache"


class EntryStatus(str, Enum):
    """What became of one entry: read from a valid sibling file, computed (and written), or failed."""

    CACHED = "cached"
    COMPUTED = "computed"
    FAILED = "failed"


STATUSES = tuple(s.value for s in EntryStatus)
_ITEM_KEYS = ("image", "status", "tensor", "error", "grid")


def encode_features(
    items: Sequence[Mapping[str, Any]],
    tensors: Mapping[str, torch.Tensor],
    spec_digest: str,
    requests: Sequence[int],
) -> bytes:
    """Serialise a response; raises ValueError when items, tensors and request positions disagree."""
    items = [dict(item) for item in items]
    _check(items, set(tensors), spec_digest)
    requests = _requests(list(requests), len(items))
    meta = json.dumps({"items": items, "spec_digest": spec_digest, "requests": requests})
    # safetensors wants contiguous CPU tensors; it copies only each tensor's own bytes.
    tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    return _st_save(tensors, metadata={META_KEY: meta})


def decode_features(body: bytes, expected_digest: str | None = None) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """Parse a response into (items, tensors by name); malformed bodies raise ValueError.

    With `expected_digest`, a body made for another spec is refused too.
    """
    if not isinstance(body, (bytes, bytearray, memoryview)):
        raise ValueError(f"features body must be bytes, got {type(body).__name__}")
    body = bytes(body)
    payload = _metadata(body)
    try:
        tensors = _st_load(body)
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"malformed features body: {e}") from e
    items, spec_digest = payload.get("items"), payload.get("spec_digest")
    if not isinstance(items, list):
        raise ValueError("malformed features body: 'items' is not a list")
    _check(items, set(tensors), spec_digest)
    if expected_digest is not None and spec_digest != expected_digest:
        raise ValueError(f"features body is for spec {spec_digest}, expected {expected_digest}")
    for item, request in zip(items, _requests(payload.get("requests"), len(items)), strict=True):
        item["request"] = request
    return items, tensors


def _requests(requests: Any, n_items: int) -> list[int]:
    if not (
        isinstance(requests, list) and len(requests) == n_items and all(type(r) is int and r >= 0 for r in requests)
    ):
        raise ValueError(
            f"malformed features body: 'requests' must list {n_items} non-negative integers "
            "(a service older than this client does not send them)"
        )
    return requests


def _metadata(body: bytes) -> dict:
    # safetensors layout: u64 little-endian header length, then the JSON header.
    if len(body) < 8:
        raise ValueError("malformed features body: too short for a safetensors header")
    size = int.from_bytes(body[:8], "little")
    if size > len(body) - 8:
        raise ValueError("malformed features body: header runs past the end")
    try:
        header = json.loads(body[8 : 8 + size])
        payload = json.loads(header["__metadata__"][META_KEY])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"malformed features body: no valid {META_KEY!r} metadata ({e})") from e
    if not isinstance(payload, dict):
        raise ValueError(f"malformed features body: {META_KEY!r} metadata is not an object")
    return payload


def _check(items: list, names: set[str], spec_digest: Any) -> None:
    if not isinstance(spec_digest, str) or not spec_digest:
        raise ValueError(f"spec_digest must be a non-empty string, got {spec_digest!r}")
    used: set[str] = set()
    for i, item in enumerate(items):
        problem = _item_problem(item, names, used)
        if problem:
            raise ValueError(f"features item {i}: {problem}")
    if used != names:
        raise ValueError(f"tensors not referenced by any item: {sorted(names - used)}")


def _item_problem(item: Any, names: set[str], used: set[str]) -> str | None:
    if not isinstance(item, dict) or sorted(item) != sorted(_ITEM_KEYS):
        return f"must be an object with keys {list(_ITEM_KEYS)}"
    if not isinstance(item["image"], str):
        return "'image' must be a string"
    if item["status"] not in STATUSES:
        return f"'status' must be one of {STATUSES}, got {item['status']!r}"
    grid = item["grid"]
    if grid is not None and not (
        isinstance(grid, list) and len(grid) == 2 and all(type(g) is int and g > 0 for g in grid)
    ):
        return f"'grid' must be two positive integers or null, got {grid!r}"
    if item["status"] == "failed":
        if item["tensor"] is not None or not isinstance(item["error"], str):
            return "a failed item has an 'error' string and no tensor"
        return None
    name = item["tensor"]
    if item["error"] is not None or grid is None:
        return "a successful item has a grid and no error"
    if not isinstance(name, str) or name not in names:
        return f"tensor {name!r} is not in the body"
    if name in used:
        return f"tensor {name!r} is referenced twice"
    used.add(name)
    return None
