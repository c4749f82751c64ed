"""The feature spec on command lines: one table for `vggt-cache serve`/`precompute` flags and training's arguments.

Each row names a FeatureSpec field, its `vggt-cache` flag, its `training.train` argument,
how its text parses and its help. From it come the argparse group (`add_spec_flags`), the
resolution of flags, variables and presets (`spec_options`), the flags that make a service
compute a given spec (`serve_flags`), and the training fields (`train_field`).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vggt_cache.client.service import ENV_PREFIX
from vggt_cache.client.spec import (
    ATTENTION,
    DTYPES,
    PREPROCESS,
    PRESETS,
    REFERENCE_FRAMES,
    STORAGES,
    TOKENS,
    FeatureSpec,
    matching_preset,
    resolve_options,
)
from vggt_cache.service.settings import read_variable


def parse_layers(text: str) -> tuple[int, ...]:
    """`-2` or `4,11,17,23` -> layer indices (negative from the end); ValueError naming the format."""
    try:
        layers = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        layers = ()
    if not layers:
        raise ValueError(f"takes comma-separated integers, e.g. -2 or 4,11,17,23; got {text!r}")
    return layers


@dataclass(frozen=True)
class SpecFlag:
    field: str  # FeatureSpec field
    flag: str  # vggt-cache serve/precompute flag
    train_arg: str  # training.train argument
    parse: Callable[[str], Any]
    choices: tuple[str, ...] | None
    help: str

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.field.upper()

    @property
    def default(self) -> Any:
        return FeatureSpec.__dataclass_fields__[self.field].default


SPEC_FLAGS = (
    SpecFlag(
        "attention",
        "--attention",
        "vggt_attention",
        str,
        ATTENTION,
        "frame: each image alone (the seed's behaviour); sequence: bidirectional over a clip; "
        "causal: frame t sees frames <= t",
    ),
    SpecFlag(
        "layers",
        "--layers",
        "vggt_layers",
        parse_layers,
        None,
        "aggregator layer(s), negative from the end (-2: the seed's aggregated_tokens[-2]); several as --layers=-4,-1",
    ),
    SpecFlag(
        "tokens", "--tokens", "vggt_tokens", str, TOKENS, "patch tokens only, or all (camera and register tokens first)"
    ),
    SpecFlag(
        "preprocess",
        "--preprocess",
        "image_preprocess",
        str,
        PREPROCESS,
        "VGGT's reference preprocessing: crop (width to the size) or pad (square)",
    ),
    SpecFlag(
        "size",
        "--size",
        "image_size",
        int,
        None,
        "preprocess target size (a multiple of 14; JanusVLN-family training uses 644)",
    ),
    SpecFlag(
        "align",
        "--align",
        "image_align",
        int,
        None,
        "resize each side down to a multiple of this (28 with pad gives 504x504)",
    ),
    SpecFlag("dtype", "--dtype", "vggt_dtype", str, tuple(DTYPES), "storage dtype of cached features"),
    SpecFlag(
        "reference_frame",
        "--reference-frame",
        "vggt_reference_frame",
        str,
        REFERENCE_FRAMES,
        "first: stream a clip in order; last: reversed, the current view first (NewJanusVLN); causal and "
        "sequence attention only",
    ),
    SpecFlag(
        "storage",
        "--storage",
        "vggt_storage",
        str,
        STORAGES,
        "how entries lie on disk: raw (the seed's torch.load(path)['features']), packed (lossless, ~1.4x "
        "smaller), fp8 (lossy float8 e4m3 with a scale per token, ~2x smaller; see docs/performance.md)",
    ),
)
PRESET_HELP = (
    "the spec a project's training computes: janusvln (causal, crop, 644, reference first) | newjanusvln "
    "(causal, pad, 644, reference last); both layer -2, bfloat16"
)


def _shown(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def argparse_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


def add_spec_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "feature spec (recorded in every cache entry; flags beat VGGT_CACHE_* variables, and spec fields beat a preset)"
    )
    g.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help=f"{PRESET_HELP} (default: ${ENV_PREFIX}PRESET, else none)",
    )
    for row in SPEC_FLAGS:
        spellings = [row.flag] + ([f"--{row.field}"] if f"--{row.field}" != row.flag else [])
        g.add_argument(
            *spellings,
            dest=row.field,
            type=argparse_type(row.parse),
            choices=row.choices,
            default=None,
            help=f"{row.help} (default: ${row.env}, else {_shown(row.default)})",
        )


def spec_options(args: argparse.Namespace) -> dict:
    """The spec flags as FeatureSpec keyword arguments.

    Command-line flags beat `VGGT_CACHE_*` variables, and at each of the two levels the fields
    given beat the preset: `--preset` on the command line ignores spec variables left in the
    environment, and `VGGT_CACHE_PRESET` yields to `VGGT_CACHE_SIZE` and the like.
    """
    flags = {row.field: getattr(args, row.field) for row in SPEC_FLAGS}
    if args.preset is not None:
        return resolve_options(args.preset, **flags)
    variables = {}
    for row in SPEC_FLAGS:
        text = read_variable(row.env)
        if text is not None:
            variables[row.field] = row.parse(text)
    given = {**variables, **{k: v for k, v in flags.items() if v is not None}}
    return resolve_options(read_variable(ENV_PREFIX + "PRESET") or None, **given)


def given_options(args: argparse.Namespace) -> dict:
    """The spec fields the command line itself names (a `--preset`'s and each flag's), variables left aside."""
    return resolve_options(args.preset, **{row.field: getattr(args, row.field) for row in SPEC_FLAGS})


def serve_flags(spec: FeatureSpec) -> str:
    """The `vggt-cache serve` flags that make a service compute features with `spec`."""
    preset = matching_preset(spec)
    if preset is not None:
        return f"--preset {preset}"
    depth = spec.architecture["depth"]
    values = {
        **{row.field: getattr(spec, row.field) for row in SPEC_FLAGS},
        # Negative layer indices read the same for any depth, as the seed's -2 does.
        "layers": ",".join(str(layer - depth) for layer in spec.layers),
    }
    return " ".join(
        f"{row.flag}={values[row.field]}" if row.field == "layers" else f"{row.flag} {values[row.field]}"
        for row in SPEC_FLAGS
    )


def train_field(spec_field: str) -> Any:
    """A training argument for a spec field: None by default (the preset's value), help from the table."""
    row = next(r for r in SPEC_FLAGS if r.field == spec_field)
    choices = f" ({' | '.join(row.choices)})" if row.choices else ""
    return dataclasses.field(default=None, metadata={"help": f"{row.help}{choices}; default: the preset's"})


def train_options(*args: object) -> dict:
    """The spec fields given as training arguments in any of `args` (None: the preset decides), parsed and checked."""
    options = {}
    for row in SPEC_FLAGS:
        value = next((getattr(a, row.train_arg) for a in args if getattr(a, row.train_arg, None) is not None), None)
        if value is None:
            continue
        if isinstance(value, str) and row.parse is not str:
            try:
                value = row.parse(value)
            except ValueError as exc:
                raise ValueError(f"--{row.train_arg} {exc}") from None
        if row.choices and value not in row.choices:
            raise ValueError(f"--{row.train_arg} must be one of {'|'.join(row.choices)}, got {value!r}")
        options[row.field] = value
    return options
