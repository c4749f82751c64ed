"""VGGT-1B's aggregator in plain PyTorch: model, streaming key/value cache, checkpoint loader."""

from .aggregator import VGGTAggregator
from .config import AggregatorConfig, PatchEmbedConfig
from .fingerprint import file_fingerprint
from .kv_cache import KVCache
from .loader import DEFAULT_SOURCE, TINY_SOURCE, LoadedModel, ModelIdentity, identify_model, load_aggregator

__all__ = [
    "AggregatorConfig",
    "DEFAULT_SOURCE",
    "KVCache",
    "LoadedModel",
    "ModelIdentity",
    "PatchEmbedConfig",
    "TINY_SOURCE",
    "VGGTAggregator",
    "file_fingerprint",
    "identify_model",
    "load_aggregator",
]
