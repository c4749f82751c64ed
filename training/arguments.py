"""Command-line arguments of ``training.train`` (dataclasses for ``transformers.HfArgumentParser``).

Model, data and VGGT-feature arguments; the rest are ``transformers.TrainingArguments``.
Where a field is None by default, the environment variable named in its help fills it
(the seed's ``USE_VGGT_CACHE=true``), so the H800 launch scripts and a plain command
line behave the same.

**Feature spec.** Training owns it: the model needs one (``Qwen25VLWithVGGT`` computes
missing features online with exactly these settings), so it is built from these
arguments and the loaded VGGT weights (:func:`feature_spec`) and handed to the
``FeatureCache`` explicitly. A cached entry or a service answer made with any other
spec is never used: it counts as a miss (and at start-up the run compares each
service's ``/status`` spec with its own and names the fields that differ).
Start the service with the same flags (``vggt-cache serve --attention ... --layers ...
--preprocess pad --size 504 --align 28 --dtype ...``; :func:`serve_flags` spells them).

**Image geometry.** JanusVLN-style ``pad`` to 504 with 28-alignment: Qwen2.5-VL's
image processor then leaves the image as it is (18x18 = 324 tokens) and VGGT's
36x36 patches merge 2x2 onto exactly those tokens (see ``training/model.py``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from client.cache import FALLBACKS
from client.spec import ATTENTION, DTYPES, PREPROCESS, TOKENS, FeatureSpec
from service.model import LoadedModel
from service.model.features import model_spec

TRUE_WORDS = ("true", "1", "yes")
QWEN_IMAGES = ("all", "current")


def env_flag(name: str) -> bool:
    """The seed's convention: ``true``, ``1`` or ``yes`` (any case) switch a feature on."""
    return os.environ.get(name, "").strip().lower() in TRUE_WORDS


def parse_layers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"--vggt_layers takes comma-separated integers, e.g. -2 or 4,11,17,23; got {text!r}") from None


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"--{name} must be one of {'|'.join(allowed)}, got {value!r}")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default="Qwen/Qwen2.5-VL-3B-Instruct", metadata={"help": "Qwen2.5-VL checkpoint (HF id or folder)"}
    )
    vggt_model_path: str | None = field(
        default=None,
        metadata={"help": "VGGT weights: HF id, folder or file (default facebook/VGGT-1B; "
                          "with --tiny, the repository's test fixture)"},
    )
    vggt_weight: float = field(default=1.0, metadata={"help": "scale of the merged VGGT tokens added to Qwen's"})
    merger_hidden_dim: int | None = field(default=None, metadata={"help": "VGGT merger MLP width (default: its input)"})
    attn_implementation: str | None = field(
        default=None, metadata={"help": "Qwen attention kernel, e.g. flash_attention_2 or sdpa"}
    )
    tiny: bool | None = field(
        default=None,
        metadata={"help": "tests and benchmarks: a tiny random Qwen2.5-VL built in-process (no downloads); "
                          "default from $VGGT_TRAIN_TINY", "nargs": "?", "const": True},
    )

    def __post_init__(self) -> None:
        if self.tiny is None:
            self.tiny = env_flag("VGGT_TRAIN_TINY")


@dataclass
class DataArguments:
    data_root: str | None = field(default=None, metadata={"help": "the data root (default $DATA_ROOT)"})
    data_files: str | None = field(
        default=None,
        metadata={"help": "comma-separated JSONL sample files, relative to data_root unless absolute "
                          "(default: every *.jsonl under data_root, as `vggt-cache precompute` scans it)"},
    )
    data_path: str | None = field(
        default=None,
        metadata={"help": "folder (relative to data_root) that relative image paths are joined to; "
                          "the same as `vggt-cache precompute --data_path`"},
    )
    image_preprocess: str = field(default="pad", metadata={"help": "crop | pad (VGGT's reference preprocessing)"})
    image_size: int = field(default=504, metadata={"help": "preprocessed image size (a multiple of 14)"})
    image_align: int = field(default=28, metadata={"help": "sides are resized down to multiples of this"})
    qwen_images: str = field(
        default="all",
        metadata={"help": "images Qwen sees: all (the clip's frames) | current (the last frame only); "
                          "VGGT features are always added to the current frame"},
    )
    system_prompt: str = field(default="You are a helpful assistant.")

    def __post_init__(self) -> None:
        if self.data_root is None:
            self.data_root = os.environ.get("DATA_ROOT")
        _check_choice("image_preprocess", self.image_preprocess, PREPROCESS)
        _check_choice("qwen_images", self.qwen_images, QWEN_IMAGES)
        if self.image_align % 28:
            # Odd VGGT grids cannot be merged 2x2 onto Qwen's tokens.
            raise ValueError(f"--image_align must be a multiple of 28 (14-px patches merged 2x2), "
                             f"got {self.image_align}")

    @property
    def sample_files(self) -> list[str] | None:
        if not self.data_files:
            return None
        return [f.strip() for f in self.data_files.split(",") if f.strip()]


@dataclass
class CacheArguments:
    """How VGGT features are made (the spec) and where they come from (cache, service, online)."""

    use_vggt_cache: bool | None = field(
        default=None,
        metadata={"help": "read features from <image>.vggt_cache.pt and ask the service for misses; "
                          "default from $USE_VGGT_CACHE (true|1|yes)", "nargs": "?", "const": True},
    )
    vggt_service_url: str | None = field(
        default=None,
        metadata={"help": "feature service URL(s), comma-separated (default $VGGT_SERVICE_URL); "
                          "without one the cache is read-only"},
    )
    vggt_cache_fallback: str = field(
        default="online",
        metadata={"help": "features neither cached nor served: online (the model computes them) | "
                          "error (stop the run) | service (error only when a service is configured)"},
    )
    vggt_attention: str = field(default="frame", metadata={"help": "frame | sequence | causal"})
    vggt_layers: str = field(
        default="-2", metadata={"help": "aggregator layer(s), comma-separated, negative from the end"}
    )
    vggt_tokens: str = field(default="patch", metadata={"help": "patch | all"})
    vggt_dtype: str = field(default="bfloat16", metadata={"help": "storage dtype of cached features"})

    def __post_init__(self) -> None:
        if self.use_vggt_cache is None:
            self.use_vggt_cache = env_flag("USE_VGGT_CACHE")
        if self.vggt_service_url is None:
            self.vggt_service_url = os.environ.get("VGGT_SERVICE_URL") or None
        _check_choice("vggt_cache_fallback", self.vggt_cache_fallback, FALLBACKS)
        _check_choice("vggt_attention", self.vggt_attention, ATTENTION)
        _check_choice("vggt_tokens", self.vggt_tokens, TOKENS)
        _check_choice("vggt_dtype", self.vggt_dtype, tuple(DTYPES))
        parse_layers(self.vggt_layers)  # fail while parsing, not after the models have loaded

    @property
    def layers(self) -> tuple[int, ...]:
        return parse_layers(self.vggt_layers)

    @property
    def service_urls(self) -> list[str]:
        return [u.strip() for u in (self.vggt_service_url or "").split(",") if u.strip()]


def feature_spec(vggt: LoadedModel, data: DataArguments, cache: CacheArguments) -> FeatureSpec:
    """The spec of this run's features: the loaded weights plus the data and cache arguments."""
    return model_spec(
        vggt,
        layers=cache.layers,
        tokens=cache.vggt_tokens,
        preprocess=data.image_preprocess,
        size=data.image_size,
        align=data.image_align,
        dtype=cache.vggt_dtype,
        attention=cache.vggt_attention,
    )


def serve_flags(spec: FeatureSpec) -> str:
    """The ``vggt-cache serve`` flags that make a service compute features with ``spec``."""
    depth = spec.architecture["depth"]
    # Negative layer indices read the same for any depth, as the seed's -2 does.
    layers = ",".join(str(layer - depth) for layer in spec.layers)
    return (f"--attention {spec.attention} --layers={layers} --tokens {spec.tokens} --preprocess {spec.preprocess} "
            f"--size {spec.size} --align {spec.align} --dtype {spec.dtype}")
