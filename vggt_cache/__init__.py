"""vggt-cache: a GPU-resident VGGT-1B feature cache.

One import package over the project's three folders (mapped in pyproject.toml): `vggt_cache.client`
(client/: the light side a dataloader imports), `vggt_cache.service` (service/: model, engine, jobs,
HTTP API, CLI) and `vggt_cache.training` (training/: Qwen2.5-VL fused with VGGT features).
"""

from vggt_cache.client import AsyncFeatureCache, CacheUnavailable, FeatureCache, read_cached

__all__ = ["AsyncFeatureCache", "CacheUnavailable", "FeatureCache", "read_cached"]
