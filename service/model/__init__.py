"""VGGT-1B's aggregator in plain PyTorch: model, streaming key/value cache, checkpoint loader."""

from vggt_cache.service.model.aggregator import VGGTAggregator
from vggt_cache.service.model.config import AggregatorConfig, PatchEmbedConfig
from vggt_cache.service.model.fingerprint import file_fingerprint
from vggt_cache.service.model.kv_cache import KVCache
from vggt_cache.service.model.loader import (
    DEFAULT_SOURCE,
    TINY_SOURCE,
    LoadedModel,
    ModelIdentity,
    identify_model,
    load_aggregator,
)

__all__ = [
    "DEFAULT_SOURCE",
    "TINY_SOURCE",
    "AggregatorConfig",
    "KVCache",
    "LoadedModel",
    "ModelIdentity",
    "PatchEmbedConfig",
    "VGGTAggregator",
    "file_fingerprint",
    "identify_model",
    "load_aggregator",
]
