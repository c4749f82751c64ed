"""vggt-cache client: the light side (feature spec, cache-file format, wire format).

Imports neither FastAPI nor uvicorn, so training dataloaders can use it.
"""

from vggt_cache.client.cache import AsyncFeatureCache, CacheUnavailable, FeatureCache, read_cached

__all__ = ["AsyncFeatureCache", "CacheUnavailable", "FeatureCache", "read_cached"]
