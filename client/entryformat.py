"""The restricted parser of a cache entry, and the shape and size an entry of a spec has.

`parse_entry` takes what `fastload.load_file` or `torch.load(weights_only=True)` returned for a
file (anything: the file may be foreign or hand-made) and says what is wrong with it, or gives
its features, meta and spec (`read_entry` makes whatever it raises a CORRUPT outcome). `write_entry` checks what it
writes with the same `shape_problem` and `context_problem`, so a file it wrote always parses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from vggt_cache.client.spec import Attention, FeatureSpec, canonical_json, short_digest
from vggt_cache.client.storage import BadPayload, check_payload_size, decode, max_payload_bytes, stored_nbytes

FORMAT_VERSION = 1
# Packed VGGT activations measured 1.40-1.47x smaller than raw (docs/performance.md): plans assume less, to err large.
PACKED_PLAN_RATIO = 1.3
_META_KEYS = ("format_version", "spec", "spec_digest", "grid", "source", "context", "shape", "dtype")


def entry_shape(spec: FeatureSpec, grid: Sequence[int], channels: int) -> tuple[int, ...]:
    """The `features` shape of an entry of `spec` for a `grid` = [h, w] of patches."""
    arch = spec.architecture
    tokens = grid[0] * grid[1]
    if spec.tokens == "all":  # camera + register tokens come first
        tokens += 1 + arch.get("num_register_tokens", 4)
    if "embed_dim" in arch:
        channels = 2 * int(arch["embed_dim"])
    return (tokens, channels) if len(spec.layers) == 1 else (len(spec.layers), tokens, channels)


def entry_nbytes(spec: FeatureSpec, grid: Sequence[int]) -> int:
    """Bytes of an entry's tensor (the file adds a few KB of records and metadata)."""
    # An architecture without embed_dim (only hand-made specs) is taken as VGGT-1B's: 2 x 1024 channels.
    return math.prod(entry_shape(spec, grid, channels=2048)) * spec.torch_dtype.itemsize


def stored_entry_bytes(spec: FeatureSpec, grid: Sequence[int]) -> int:
    """Bytes an entry's tensor or payload takes on disk in the spec's storage (packed: an estimate that errs large)."""
    return stored_nbytes(spec.storage, entry_shape(spec, grid, channels=2048), spec.torch_dtype, PACKED_PLAN_RATIO)


def max_entry_bytes(spec: FeatureSpec) -> int:
    """The largest tensor or payload of an entry of `spec`: preprocessing makes no side longer than `spec.size`."""
    side = spec.size // spec.architecture.get("patch_size", 14)
    if spec.storage == "raw":
        return entry_nbytes(spec, (side, side))
    return max_payload_bytes(spec.storage, entry_shape(spec, (side, side), channels=2048), spec.torch_dtype)


def shape_problem(shape: tuple[int, ...], spec: FeatureSpec, grid: list[int]) -> str | None:
    """Why `features` of `shape` cannot be an entry of `spec` for `grid`, or None."""
    if len(grid) != 2 or min(grid) <= 0:
        return f"grid must be two positive integers, got {grid}"
    expected = entry_shape(spec, grid, channels=shape[-1] if shape else -1)
    if shape != expected:
        return f"features shape {list(shape)} does not match spec and grid {grid}: expected {list(expected)}"
    return None


def context_problem(spec: FeatureSpec, context: Any) -> str | None:
    """Why `context` cannot be the context record of an entry of `spec`, or None."""
    if spec.attention == Attention.FRAME:
        return None if context is None else "attention 'frame' takes no context"
    if not (
        isinstance(context, dict)
        and isinstance(context.get("frames"), list)
        and context["frames"]
        and all(_is_frame_record(r) for r in context["frames"])
        and isinstance(context.get("digest"), str)
    ):
        return f"attention {spec.attention!r} needs a context record (see context_record)"
    if context["digest"] != short_digest(context["frames"]):
        return "context digest does not match its frames"
    return None


def _is_frame_record(record: Any) -> bool:
    return (
        isinstance(record, dict)
        and isinstance(record.get("path"), str)
        and "\x00" not in record["path"]
        and type(record.get("size")) is int
        and type(record.get("mtime_ns")) is int
    )


def parse_entry(data: Any, expected: FeatureSpec | None) -> tuple[torch.Tensor, dict, FeatureSpec] | str:
    """The entry's parts (a non-raw entry's payload decoded), or why it is not a valid entry."""
    if not isinstance(data, dict) or not any(isinstance(data.get(k), torch.Tensor) for k in ("features", "payload")):
        return "not a cache entry (no 'features' tensor)"
    meta = data.get("meta")
    if not isinstance(meta, dict):
        return "not a cache entry (no 'meta' dict)"
    missing = [k for k in _META_KEYS if k not in meta]
    if missing:
        return f"meta lacks {', '.join(missing)}"
    if meta["format_version"] != FORMAT_VERSION or isinstance(meta["format_version"], bool):
        return f"unsupported format_version {meta['format_version']!r}"
    try:
        # The common case, the expected spec itself, skips building and validating a new one (and, written by
        # it, its canonical JSON too).
        if expected is not None and (
            expected.wrote(meta["spec"], meta["spec_digest"])
            or canonical_json(meta["spec"]) == expected.canonical_json()
        ):
            spec = expected
        else:
            spec = FeatureSpec.from_dict(meta["spec"])
    except (TypeError, ValueError) as e:
        return f"invalid spec: {e}"
    if meta["spec_digest"] != spec.digest:
        return "spec_digest does not match the spec"
    grid = meta["grid"]
    if not (isinstance(grid, list) and all(type(g) is int for g in grid)):
        return f"invalid grid {grid!r}"
    if meta["dtype"] != spec.dtype:
        return f"dtype {meta['dtype']} does not match spec dtype {spec.dtype}"
    features = _stored_features(data, meta, spec)
    if isinstance(features, str):
        return features
    if features.dtype != spec.torch_dtype:
        return f"dtype {features.dtype} does not match spec dtype {spec.dtype}"
    if meta["shape"] != list(features.shape):
        return f"features shape {list(features.shape)} differs from meta shape {meta['shape']}"
    problem = shape_problem(tuple(features.shape), spec, grid) or context_problem(spec, meta["context"])
    if problem:
        return problem
    source = meta["source"]
    if not (isinstance(source, dict) and set(source) == {"size", "mtime_ns"}):
        return f"invalid source record {source!r}"
    return features, meta, spec


def _stored_features(data: dict, meta: dict, spec: FeatureSpec) -> torch.Tensor | str:
    """The features as the spec's storage holds them (decoded), or why they cannot be.

    A payload is decoded only once the spec and grid have said what it must decode to, so it
    never inflates past an entry's size; a meta-device payload (a metadata-only read) gives a
    meta-device tensor of that shape once the payload's length fits it.
    """
    if spec.storage == "raw":
        features = data.get("features")
        return features if isinstance(features, torch.Tensor) else "a raw entry needs a 'features' tensor"
    payload = data.get("payload")
    if "features" in data or not isinstance(payload, torch.Tensor):
        return f"a {spec.storage} entry holds a 'payload' tensor and no 'features'"
    shape = tuple(meta["shape"]) if isinstance(meta["shape"], list) else ()
    problem = shape_problem(shape, spec, meta["grid"])
    if problem:
        return problem
    try:
        if payload.is_meta:
            check_payload_size(payload, spec.storage, shape, spec.torch_dtype)
            return torch.empty(shape, dtype=spec.torch_dtype, device="meta")
        return decode(payload, spec.storage, shape, spec.torch_dtype)
    except BadPayload as e:
        return f"bad {spec.storage} payload: {e}"
