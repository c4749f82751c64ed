"""Load the aggregator from a Hugging Face cache, a folder or a weights file, tensor by tensor."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub import try_to_load_from_cache
from safetensors import safe_open
from torch import Tensor

from vggt_cache.service.model.aggregator import VGGTAggregator
from vggt_cache.service.model.config import AggregatorConfig
from vggt_cache.service.model.fingerprint import file_fingerprint

DEFAULT_SOURCE = "facebook/VGGT-1B"
# The built-in tiny model: VGGT's structure, 2 layers, fixed weights shipped in the package (~1.4 MB), so
# serve, precompute, the demo and training run on any machine without a download. The name always means it
# (a local folder called `tiny` is `./tiny`).
TINY_SOURCE = "tiny"
TINY_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny")
PREFIX = "aggregator."
HEAD_PREFIXES = ("camera_head.", "depth_head.", "point_head.", "track_head.")
FOLDER_WEIGHTS = ("model.safetensors", "model.pt", "state_dict.safetensors")
HUB_WEIGHTS = ("model.safetensors", "model.pt")
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_SHOWN = 5  # keys named per category when refusing a checkpoint

Shapes = dict[str, tuple[int, ...]]


@dataclass
class LoadedModel:
    model: VGGTAggregator
    config: AggregatorConfig
    fingerprint: str  # "sha256:<hex>" of the weights file
    source: str  # absolute path of the weights file that was loaded
    num_params: int


@dataclass(frozen=True)
class ModelIdentity:
    """What names a model's features (its spec's fingerprint and architecture), known without loading it."""

    config: AggregatorConfig
    fingerprint: str
    source: str


def identify_model(source: str | os.PathLike = DEFAULT_SOURCE) -> ModelIdentity:
    """The config and weights fingerprint of `source` (hashed once per file), without building the model."""
    weights, config_path = resolve_source(source)
    return ModelIdentity(_read_config(config_path), file_fingerprint(weights), weights)


def _read_config(config_path: str | None) -> AggregatorConfig:
    if config_path is None:
        return AggregatorConfig()
    with open(config_path, encoding="utf-8") as f:
        return AggregatorConfig.from_dict(json.load(f))


def load_aggregator(
    source: str | os.PathLike = DEFAULT_SOURCE,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> LoadedModel:
    """Frozen, eval-mode aggregator on `device` in `dtype`; head weights in the checkpoint are ignored.

    `source`: `tiny` (the built-in tiny model), a Hugging Face repo id (offline, from the local cache), a folder
    (`config.json` plus `model.safetensors` | `model.pt` | `state_dict.safetensors`) or a
    `.safetensors`/`.pt`/`.pth` file (config from a sibling `config.json`, else VGGT-1B). Raises ValueError if the
    weights do not fit.
    """
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point type, got {dtype}")
    device = torch.device(device)
    weights, config_path = resolve_source(source)
    config = _read_config(config_path)

    # Built without memory, then every parameter is materialised once, on the target device.
    with torch.device("meta"):
        model = VGGTAggregator(config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    with _open_weights(weights, device) as (shapes, read):
        names = _aggregator_names(shapes)
        _check_keys(weights, expected, {name: shapes[key] for name, key in names.items()})
        state = {name: _cast(read(key), dtype) for name, key in names.items()}
    model.load_state_dict(state, strict=True, assign=True)
    model.reset_buffers(device, dtype)
    model.eval().requires_grad_(False)
    return LoadedModel(
        model=model,
        config=config,
        fingerprint=file_fingerprint(weights),
        source=weights,
        num_params=sum(p.numel() for p in model.parameters()),
    )


def resolve_source(source: str | os.PathLike) -> tuple[str, str | None]:
    """(weights file, config.json or None) for `tiny`, a repo id, folder or file."""
    path = os.path.expanduser(os.fspath(source))
    if path == TINY_SOURCE:
        path = TINY_DIR
    if os.path.isdir(path):
        candidates = (os.path.join(path, name) for name in FOLDER_WEIGHTS)
        weights = next((c for c in candidates if os.path.isfile(c)), None)
        if weights is None:
            raise FileNotFoundError(f"no weights in folder {path}: expected one of {', '.join(FOLDER_WEIGHTS)}")
        return os.path.abspath(weights), _sibling_config(weights)
    if os.path.isfile(path):
        return os.path.abspath(path), _sibling_config(path)
    if _REPO_ID.match(path):
        return _resolve_hub(path)
    raise FileNotFoundError(f"model source {path!r} is neither a file, a folder nor a Hugging Face repo id")


def is_hub_id(source: str | os.PathLike) -> bool:
    """True when `source` names a Hugging Face repo (not a file or folder here, not `tiny`)."""
    path = os.path.expanduser(os.fspath(source))
    return path != TINY_SOURCE and not os.path.exists(path) and bool(_REPO_ID.match(path))


def _resolve_hub(repo_id: str) -> tuple[str, str | None]:
    """Files of `repo_id` from the local Hugging Face cache; never touches the network."""
    for name in HUB_WEIGHTS:
        weights = try_to_load_from_cache(repo_id, name)
        if isinstance(weights, str):
            config = try_to_load_from_cache(repo_id, "config.json")
            return os.path.abspath(weights), config if isinstance(config, str) else None
    raise FileNotFoundError(
        f"{repo_id!r} is not a file or folder and its weights ({' or '.join(HUB_WEIGHTS)}) are not in the "
        f"local Hugging Face cache ({hf_constants.HF_HUB_CACHE}); fetch them with "
        f"`hf download {repo_id}` (huggingface_hub's CLI), pass a folder or weights file, or try the built-in "
        f"`{TINY_SOURCE}` model on a CPU"
    )


def _sibling_config(weights: str) -> str | None:
    config = os.path.join(os.path.dirname(os.path.abspath(weights)), "config.json")
    return config if os.path.isfile(config) else None


@contextmanager
def _open_weights(path: str, device: torch.device) -> Iterator[tuple[Shapes, Callable[[str], Tensor]]]:
    """(shapes of every tensor, reader of one tensor onto `device`) without loading the file."""
    if path.endswith(".safetensors"):
        with safe_open(path, framework="pt", device=str(device)) as f:
            yield {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}, f.get_tensor  # noqa: SIM118 (safe_open has no __iter__)
        return
    # mmap: tensors are paged in from the file one at a time (on CPU, like safetensors, they stay
    # file-backed rather than being copied).
    state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a state dict of tensors")
    yield {key: tuple(t.shape) for key, t in state.items()}, lambda key: state[key].to(device)


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t.to(dtype) if t.is_floating_point() else t


def _aggregator_names(keys: Shapes) -> dict[str, str]:
    """Model name -> checkpoint key: `aggregator.` stripped, head keys dropped."""
    names: dict[str, str] = {}
    for key in keys:
        if key.startswith(HEAD_PREFIXES):
            continue
        name = key[len(PREFIX) :] if key.startswith(PREFIX) else key
        if name in names:
            raise ValueError(f"checkpoint holds both {names[name]!r} and {key!r}")
        names[name] = key
    return names


def _check_keys(path: str, expected: Shapes, found: Shapes) -> None:
    """Refuse, naming the first offending keys, unless `found` has exactly the expected names and shapes."""
    problems = []
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    misshaped = [
        f"{k} (checkpoint {list(found[k])}, model {list(shape)})"
        for k, shape in expected.items()
        if k in found and found[k] != shape
    ]
    for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if items:
            more = f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
            problems.append(f"{len(items)} {label} key(s): {', '.join(items[:_SHOWN])}{more}")
    if problems:
        raise ValueError(f"{path} does not fit the aggregator: " + "; ".join(problems))
