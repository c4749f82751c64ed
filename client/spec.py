"""`FeatureSpec`: everything that determines a cached feature, with a stable digest."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from functools import cached_property
from typing import Any, TypeVar, cast

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
TOKENS = ("patch", "all")
PREPROCESS = ("crop", "pad")
S = TypeVar("S", bound=Sequence)  # a clip: paths, or a tensor of frames


class Attention(str, Enum):
    """What a frame sees: itself (`frame`), its whole clip (`sequence`), or the frames up to it (`causal`)."""

    FRAME = "frame"
    SEQUENCE = "sequence"
    CAUSAL = "causal"


ATTENTION = tuple(a.value for a in Attention)
# Read once: an Enum member's read costs ~0.2 us on Python 3.11 (EnumType.__getattr__), and a plan asks
# `frames_of` / `context_of` for every clip.
_FRAME = Attention.FRAME
# Which frame of a clip streams first and gets VGGT's first-frame camera/register tokens:
# "first" the clip in order, "last" the clip reversed (the current view first; NewJanusVLN).
REFERENCE_FRAMES = ("first", "last")
# How an entry's features lie on disk (client/storage.py): the tensor itself, lossless byte planes + zstd, float8.
STORAGES = ("raw", "packed", "fp8")
# Specs that reproduce what each project's training computes online (see docs/janusvln.md).
PRESETS: dict[str, dict[str, Any]] = {
    "janusvln": {
        "attention": "causal",
        "preprocess": "crop",
        "size": 644,
        "align": 14,
        "reference_frame": "first",
        "layers": (-2,),
        "tokens": "patch",
        "dtype": "bfloat16",
    },
    "newjanusvln": {
        "attention": "causal",
        "preprocess": "pad",
        "size": 644,
        "align": 14,
        "reference_frame": "last",
        "layers": (-2,),
        "tokens": "patch",
        "dtype": "bfloat16",
    },
}
_FINGERPRINT = re.compile(r"sha256:[0-9a-f]+")


@dataclass(frozen=True)
class FeatureSpec:
    """How a feature was (or must be) computed; two specs with equal digests are interchangeable.

    `layers` is normalised to non-negative indices with `architecture["depth"]`,
    so `(-2,)` and `(22,)` are the same spec for a depth-24 model. `reference_frame`
    means nothing for a single frame, so `frame` attention always records "first".
    A spec at the default `reference_frame="first"` or `storage="raw"` leaves the field out of
    its dict and canonical JSON: entries written before the field existed keep their digest.
    `storage` is part of the spec so that entries of different storage never pass for each other.
    """

    fingerprint: str
    architecture: dict
    layers: tuple[int, ...] = (-2,)
    tokens: str = "patch"
    preprocess: str = "crop"
    size: int = 518
    align: int = 14
    dtype: str = "bfloat16"
    attention: str = "frame"
    reference_frame: str = "first"
    storage: str = "raw"

    def __post_init__(self) -> None:
        if not isinstance(self.fingerprint, str) or not _FINGERPRINT.fullmatch(self.fingerprint):
            raise ValueError(f"fingerprint must look like 'sha256:<hex>', got {self.fingerprint!r}")
        arch = _plain_json("architecture", self.architecture)
        if not isinstance(arch, dict):
            raise ValueError(f"architecture must be a dict, got {type(self.architecture).__name__}")
        depth = positive_int("architecture['depth']", arch.get("depth"))
        patch = positive_int("architecture['patch_size']", arch.get("patch_size", 14))
        # Optional here, but cache files derive token counts and widths from them.
        if "embed_dim" in arch:
            positive_int("architecture['embed_dim']", arch["embed_dim"])
        if arch.get("num_register_tokens", 0) != 0:
            positive_int("architecture['num_register_tokens']", arch["num_register_tokens"])
        object.__setattr__(self, "architecture", arch)
        object.__setattr__(self, "layers", normalise_layers(self.layers, depth))
        _choice("tokens", self.tokens, TOKENS)
        _choice("preprocess", self.preprocess, PREPROCESS)
        _choice("dtype", self.dtype, tuple(DTYPES))
        _choice("attention", self.attention, ATTENTION)
        _choice("reference_frame", self.reference_frame, REFERENCE_FRAMES)
        _choice("storage", self.storage, STORAGES)
        if self.attention == "frame":
            object.__setattr__(self, "reference_frame", "first")
        for name in ("size", "align"):
            value = positive_int(name, getattr(self, name))
            if value % patch:
                raise ValueError(f"{name} must be a multiple of the patch size {patch}, got {value}")

    def __hash__(self) -> int:
        return hash(self.digest)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values; `from_dict(to_dict())` gives an equal spec."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["architecture"] = json.loads(json.dumps(self.architecture))
        d["layers"] = list(self.layers)
        if self.reference_frame == "first":
            del d["reference_frame"]
        if self.storage == "raw":
            del d["storage"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureSpec:
        if not isinstance(d, dict):
            raise ValueError(f"a feature spec must be a dict, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown feature spec field(s): {', '.join(unknown)}")
        missing = sorted({"fingerprint", "architecture"} - set(d))
        if missing:
            raise ValueError(f"feature spec lacks required field(s): {', '.join(missing)}")
        return cls(**d)

    def canonical_json(self) -> str:
        return self._canonical

    @cached_property
    def _canonical(self) -> str:
        return canonical_json(self.to_dict())

    def wrote(self, spec: Any, digest: Any) -> bool:
        """Whether an entry's stored spec dict and digest are this spec's: a dict compare (an entry's check
        of a plan of 612k), not its canonical JSON."""
        return digest == self.digest and spec == self._dict

    @cached_property
    def _dict(self) -> dict[str, Any]:  # compared, never handed out
        return self.to_dict()

    @cached_property
    def digest(self) -> str:
        """First 16 hex digits of the sha256 of `canonical_json()`."""
        return hashlib.sha256(self._canonical.encode()).hexdigest()[:16]

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def frames_of(self, clip: S) -> S:
        """The frames (paths or a tensor's rows) a clip's entry is computed from: the last one alone in `frame`."""
        return cast(S, clip[-1:]) if self.attention == _FRAME else clip  # a slice keeps its type

    def context_of(self, clip: S) -> S | None:
        """The frames a clip's entry records as its context: none in `frame` attention, else the whole clip."""
        return None if self.attention == _FRAME else clip

    def differences(self, other: FeatureSpec) -> list[str]:
        """Names of the fields whose values differ from `other` (for messages)."""
        return sorted(f.name for f in dataclasses.fields(self) if getattr(self, f.name) != getattr(other, f.name))


def preset_options(name: str) -> dict[str, Any]:
    """The spec fields a named preset sets (see PRESETS)."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {'|'.join(PRESETS)}, got {name!r}")
    return dict(PRESETS[name])


def resolve_options(preset: str | None, **given: Any) -> dict[str, Any]:
    """FeatureSpec keyword arguments: the preset's fields (if any), each one `given` (not None) on top."""
    options = preset_options(preset) if preset is not None else {}
    options.update({k: v for k, v in given.items() if v is not None})
    return options


def matching_preset(spec: FeatureSpec) -> str | None:
    """The preset that gives exactly `spec` for its model, if any (however the spec was given)."""
    for name, options in PRESETS.items():
        try:
            if FeatureSpec(fingerprint=spec.fingerprint, architecture=spec.architecture, **options) == spec:
                return name
        except ValueError:  # a model too shallow or a patch size the preset does not fit
            continue
    return None


def canonical_json(value: Any) -> str:
    """Key-sorted, whitespace-free JSON: equal values give equal text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def short_digest(value: Any) -> str:
    """First 16 hex digits of the sha256 of `canonical_json(value)`."""
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()[:16]


def _plain_json(name: str, value: Any) -> Any:
    # A deep copy through JSON both validates and detaches from the caller's dict.
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must hold plain JSON values: {e}") from e


def positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {'|'.join(allowed)}, got {value!r}")


def normalise_layers(layers: Any, depth: int) -> tuple[int, ...]:
    """Layer indices made non-negative for a model of `depth` (negatives count from the end), in order."""
    if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
        raise ValueError(f"layers must be a sequence of integers, got {layers!r}")
    layers = tuple(layers)
    if not layers:
        raise ValueError("layers must name at least one layer")
    out = []
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise ValueError(f"layers must be integers, got {layer!r}")
        if not -depth <= layer < depth:
            raise ValueError(f"layer {layer} is out of range for depth {depth}")
        out.append(layer % depth)
    if len(set(out)) != len(out):
        raise ValueError(f"layers {list(layers)} name the same layer twice (depth {depth})")
    return tuple(out)
