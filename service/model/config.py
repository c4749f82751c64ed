"""Hyper-parameters of the VGGT aggregator (fixture schema; defaults are VGGT-1B)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass(frozen=True)
class PatchEmbedConfig:
    """The DINOv2 ViT (with registers) that turns each frame into patch tokens."""

    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    init_values: float = 1.0
    interpolate_antialias: bool = True
    interpolate_offset: float = 0.0


@dataclass(frozen=True)
class AggregatorConfig:
    """Aggregator hyper-parameters; `from_dict` accepts our schema and the official config.json."""

    img_size: int = 518
    patch_size: int = 14
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_register_tokens: int = 4
    qk_norm: bool = True
    rope_freq: float = 100.0
    init_values: float = 0.01
    patch_embed: PatchEmbedConfig = field(default_factory=PatchEmbedConfig)

    def __post_init__(self) -> None:
        if self.patch_embed.embed_dim != self.embed_dim:
            raise ValueError(
                f"patch_embed.embed_dim ({self.patch_embed.embed_dim}) must equal embed_dim ({self.embed_dim})"
            )
        for name, dim, heads in (
            ("", self.embed_dim, self.num_heads),
            ("patch_embed.", self.patch_embed.embed_dim, self.patch_embed.num_heads),
        ):
            if dim % heads:
                raise ValueError(f"{name}embed_dim ({dim}) is not a multiple of {name}num_heads ({heads})")
        if self.rope_freq > 0 and (self.embed_dim // self.num_heads) % 4:
            raise ValueError("2D RoPE needs a head dimension that is a multiple of 4")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size ({self.img_size}) is not a multiple of patch_size ({self.patch_size})")

    @property
    def patch_start_idx(self) -> int:
        """Index of the first patch token: one camera token, then the registers."""
        return 1 + self.num_register_tokens

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AggregatorConfig:
        """Build from a dict; missing keys take the VGGT-1B values, unknown keys are ignored."""
        top = _coerce(cls, d)
        embed = d.get("patch_embed") or {}
        # The ViT must produce tokens of the aggregator's width, so that is its only sensible default.
        embed = {"embed_dim": top.get("embed_dim", cls.embed_dim), **embed}
        return cls(**top, patch_embed=PatchEmbedConfig(**_coerce(PatchEmbedConfig, embed)))

    def to_dict(self) -> dict[str, Any]:
        """Canonical JSON-able dict (every field, fixed types)."""
        return asdict(self)


def _coerce(cls: type, d: dict[str, Any]) -> dict[str, Any]:
    """The scalar fields of dataclass `cls` present in `d`, cast to their declared types."""
    casts = {"int": int, "float": float, "bool": bool}
    out = {}
    for f in fields(cls):
        if f.name in d and f.type in casts:
            value = d[f.name]
            if f.type == "int" and value != int(value):
                raise ValueError(f"{f.name} must be an integer, got {value!r}")
            out[f.name] = casts[f.type](value)
    return out
