"""Command-line arguments of ``training.train`` (dataclasses for ``transformers.HfArgumentParser``).

Model, data and VGGT-feature arguments; the rest are ``transformers.TrainingArguments``.
Where a field is None by default, the environment variable named in its help fills it
(the seed's ``USE_VGGT_CACHE=true``), so the H800 launch scripts and a plain command
line behave the same.

**Feature spec.** Training owns it: the model needs one (``Qwen25VLWithVGGT`` computes
missing features online with exactly these settings), so it is built from these
arguments and the loaded VGGT weights (:func:`feature_spec`) and handed to the
``FeatureCache`` explicitly. ``--vggt_preset`` (default ``newjanusvln``: causal, pad,
644, reference frame last, layer -2) sets every field; each ``--vggt_*``/``--image_*``
argument given overrides it. A cached entry or a service answer made with any other
spec is never used: it counts as a miss (and at start-up the run compares each
service's ``/status`` spec with its own and names the fields that differ).
Start the service with the same spec (``service.specflags.serve_flags`` spells its flags).

**Image geometry.** VGGT sees the preprocessed frame whole; Qwen2.5-VL sees it cut at
the bottom/right to whole 2x2 token blocks, and the VGGT grid is cut the same way before
the 2x2 merge (JanusVLN's arithmetic; ``training/model.py``). With ``pad`` at 644 both
grids are 46x46 patches (23x23 = 529 Qwen tokens).

**Fusion.** ``--vggt_fusion janusvln`` is JanusVLN's recipe (RMSNorm merger, hidden 4096,
weight 0.2, the merged features added to every frame of the sample); ``default`` adds
them to the current frame only. ``--vggt_weight``, ``--merger_hidden_dim``,
``--vggt_merger_norm`` and ``--vggt_add_to`` override either.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from vggt_cache.client.cache import FALLBACKS
from vggt_cache.client.spec import PRESETS, FeatureSpec, resolve_options
from vggt_cache.service.model import LoadedModel
from vggt_cache.service.model.features import model_spec
from vggt_cache.service.samples import DEFAULT_MAX_HISTORY, check_history, file_list
from vggt_cache.service.settings import env_flag
from vggt_cache.service.specflags import train_field, train_options
from vggt_cache.training.merger import NORMS
from vggt_cache.training.model import ADD_TO, FUSIONS, Fusion

QWEN_IMAGES = ("all", "current")


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"--{name} must be one of {'|'.join(allowed)}, got {value!r}")


@dataclass
class ModelArguments:
    _argument_group_name = "models: Qwen2.5-VL, VGGT and their fusion"  # HfArgumentParser's --help group
    model_name_or_path: str = field(
        default="Qwen/Qwen2.5-VL-3B-Instruct", metadata={"help": "Qwen2.5-VL checkpoint (HF id or folder)"}
    )
    vggt_model_path: str | None = field(
        default=None,
        metadata={
            "help": "VGGT weights: tiny, HF id, folder or file (default facebook/VGGT-1B; "
            "with --tiny, the built-in tiny model)"
        },
    )
    vggt_fusion: str = field(
        default="default",
        metadata={
            "help": f"fusion recipe: {' | '.join(FUSIONS)} (janusvln: RMSNorm merger, hidden 4096, weight 0.2, "
            "all frames)"
        },
    )
    vggt_weight: float | None = field(
        default=None, metadata={"help": "scale of the merged VGGT tokens added to Qwen's (default: the recipe's)"}
    )
    merger_hidden_dim: int | None = field(
        default=None,
        metadata={"help": "VGGT merger MLP width (default: the recipe's; default recipe: its input width)"},
    )
    vggt_merger_norm: str | None = field(
        default=None, metadata={"help": f"{' | '.join(NORMS)} on each VGGT token (default: the recipe's)"}
    )
    vggt_add_to: str | None = field(
        default=None,
        metadata={"help": f"{' | '.join(ADD_TO)}: the frames the merged tokens are added to (default: the recipe's)"},
    )
    attn_implementation: str | None = field(
        default=None, metadata={"help": "Qwen attention kernel, e.g. flash_attention_2 or sdpa"}
    )
    tiny: bool | None = field(
        default=None,
        metadata={
            "help": "try it on a CPU (tests, benchmarks): a tiny random Qwen2.5-VL built in-process and the "
            "built-in tiny VGGT, no downloads; default from $VGGT_TRAIN_TINY",
            "nargs": "?",
            "const": True,
        },
    )

    def __post_init__(self) -> None:
        if self.tiny is None:
            self.tiny = env_flag("VGGT_TRAIN_TINY")
        _check_choice("vggt_fusion", self.vggt_fusion, tuple(FUSIONS))
        self.fusion  # noqa: B018 -- fail while parsing, not after the models have loaded

    @property
    def fusion(self) -> Fusion:
        """The recipe with every argument given on top of it."""
        given = {
            "vggt_weight": self.vggt_weight,
            "merger_hidden_dim": self.merger_hidden_dim,
            "merger_norm": self.vggt_merger_norm,
            "add_to": self.vggt_add_to,
        }
        return dataclasses.replace(FUSIONS[self.vggt_fusion], **{k: v for k, v in given.items() if v is not None})


@dataclass
class DataArguments:
    _argument_group_name = "data: samples, images and VGGT's preprocessing"
    data_root: str | None = field(default=None, metadata={"help": "the data root (default $DATA_ROOT)"})
    data_files: str | None = field(
        default=None,
        metadata={
            "help": "comma-separated JSONL sample files, relative to data_root unless absolute "
            "(default: every *.jsonl under data_root, as `vggt-cache precompute` scans it)"
        },
    )
    data_path: str | None = field(
        default=None,
        metadata={
            "help": "folder (relative to data_root) that relative image paths are joined to; "
            "the same as `vggt-cache precompute --data_path`"
        },
    )
    image_preprocess: str | None = train_field("preprocess")
    image_size: int | None = train_field("size")
    image_align: int | None = train_field("align")
    max_history_images: int = field(
        default=DEFAULT_MAX_HISTORY,
        metadata={
            "help": "episode folders (step_<n>_<ACTION>.png): history frames per sample, as "
            "`vggt-cache precompute --max_history_images`"
        },
    )
    qwen_images: str = field(
        default="all",
        metadata={
            "help": "images Qwen sees: all (the clip's frames) | current (the last frame only); "
            "VGGT features are always added to the current frame"
        },
    )
    system_prompt: str = field(default="You are a helpful assistant.")

    def __post_init__(self) -> None:
        if self.data_root is None:
            self.data_root = os.environ.get("DATA_ROOT")
        train_options(self)  # fail while parsing, not after the models have loaded
        _check_choice("qwen_images", self.qwen_images, QWEN_IMAGES)
        check_history(self.max_history_images)

    @property
    def sample_files(self) -> list[str] | None:
        if not self.data_files:
            return None
        return file_list(self.data_files)


@dataclass
class CacheArguments:
    """How VGGT features are made (the spec) and where they come from (cache, service, online)."""

    _argument_group_name = "VGGT features: the spec, the cache and the service"

    use_vggt_cache: bool | None = field(
        default=None,
        metadata={
            "help": "read features from <image>.vggt_cache.pt and ask the service for misses; "
            "default from $USE_VGGT_CACHE (true|1|yes)",
            "nargs": "?",
            "const": True,
        },
    )
    vggt_service_url: str | None = field(
        default=None,
        metadata={
            "help": "feature service URL(s), comma-separated (default $VGGT_SERVICE_URL); "
            "without one the cache is read-only"
        },
    )
    vggt_cache_fallback: str = field(
        default="online",
        metadata={
            "help": "features neither cached nor served: online (the model computes them) | "
            "error (stop the run) | service (error only when a service is configured)"
        },
    )
    vggt_preset: str = field(
        default="newjanusvln",
        metadata={
            "help": f"the feature spec to start from: {' | '.join(PRESETS)} | none (FeatureSpec's defaults); "
            "the arguments below override it"
        },
    )
    vggt_attention: str | None = train_field("attention")
    vggt_layers: str | None = train_field("layers")
    vggt_tokens: str | None = train_field("tokens")
    vggt_dtype: str | None = train_field("dtype")
    vggt_reference_frame: str | None = train_field("reference_frame")
    vggt_storage: str | None = train_field("storage")

    def __post_init__(self) -> None:
        if self.use_vggt_cache is None:
            self.use_vggt_cache = env_flag("USE_VGGT_CACHE")
        if self.vggt_service_url is None:
            self.vggt_service_url = os.environ.get("VGGT_SERVICE_URL") or None
        _check_choice("vggt_cache_fallback", self.vggt_cache_fallback, FALLBACKS)
        _check_choice("vggt_preset", self.vggt_preset, (*PRESETS, "none"))
        train_options(self)  # fail while parsing, not after the models have loaded

    @property
    def service_urls(self) -> list[str]:
        return [u.strip() for u in (self.vggt_service_url or "").split(",") if u.strip()]


def feature_spec(vggt: LoadedModel, data: DataArguments, cache: CacheArguments) -> FeatureSpec:
    """The spec of this run's features: the loaded weights, the preset, and the arguments given on top of it."""
    preset = None if cache.vggt_preset == "none" else cache.vggt_preset
    return model_spec(vggt, **resolve_options(preset, **train_options(data, cache)))
