"""`POST /features`: entries for images or clips, read from valid sibling files or computed, in the body."""

from __future__ import annotations

import asyncio

import torch
from fastapi import APIRouter, HTTPException
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response

from vggt_cache.client.spec import FeatureSpec
from vggt_cache.client.wire import encode_features
from vggt_cache.service.api.deps import MetricsDep, Ready, Runtime
from vggt_cache.service.api.schemas import FeaturesRequest
from vggt_cache.service.engine import Priority, UnitResult
from vggt_cache.service.errors import UnusableInput
from vggt_cache.service.paths import AllowedRoots
from vggt_cache.service.units import Unit

MEDIA_TYPE = "application/vnd.vggt-features+safetensors"

router = APIRouter()


@router.post("/features")
async def features(req: FeaturesRequest, c: Ready, runtime: Runtime, metrics: MetricsDep) -> Response:
    limit = runtime.settings.max_items_per_request
    n_frames = len(req.images) + sum(len(clip) for clip in req.clips)
    if not req.images and not req.clips:
        raise UnusableInput("give at least one image in 'images' or one clip in 'clips'")
    if n_frames > limit:
        raise HTTPException(413, f"{n_frames} images in one request; the limit is {limit} (split the request)")
    # realpath() on every frame touches the file system (NFS): off the event loop.
    units = await run_in_threadpool(request_units, req.images, req.clips, runtime.allowed, c.spec)
    if not req.wait:
        # A hint: bulk priority, and refused (429) rather than waited for when the bulk queue is full.
        c.engine.submit(units, Priority.BULK, skip_existing=req.skip_existing, return_features=False, block=False)
        return JSONResponse({"queued": len(units)}, status_code=202)
    futures = c.engine.submit(
        units, Priority.ON_DEMAND, skip_existing=req.skip_existing, max_pending=runtime.settings.max_pending_units
    )
    results = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
    metrics.count_entries(e for r in results for e in r.entries)
    # Copies every tensor into one body (hundreds of MB for VGGT-1B): off the event loop.
    return Response(await run_in_threadpool(features_body, results, c.spec.digest), media_type=MEDIA_TYPE)


def request_units(images: list[str], clips: list[list[str]], allowed: AllowedRoots, spec: FeatureSpec) -> list[Unit]:
    """The request's units in its order (images, then clips), every path contained.

    An image is a clip of one; a clip's entry is computed from the frames its spec needs
    (its last frame alone in frame mode).
    """
    if any(not clip for clip in clips):
        raise UnusableInput("a clip needs at least one frame")
    return [
        Unit.for_clip(spec.attention, spec.frames_of([allowed.contain(p) for p in clip]))
        for clip in [[image] for image in images] + clips
    ]


def features_body(results: list[UnitResult], spec_digest: str) -> bytes:
    """The safetensors body of a /features answer (client/wire.py): results in request order."""
    items: list[dict] = []
    tensors: dict[str, torch.Tensor] = {}
    requests: list[int] = []
    packed: set[int] = set()  # a unit asked for twice was computed once: its waiters share one tensor
    for position, result in enumerate(results):
        for e in result.entries:
            name = None
            if e.features is not None:
                name = str(len(tensors))
                shared = id(e.features) in packed
                tensors[name] = e.features.clone() if shared else e.features  # safetensors refuses aliases
                packed.add(id(e.features))
            items.append(
                {
                    "image": e.image,
                    "status": e.status,
                    "tensor": name,
                    "error": e.error,
                    "grid": list(e.grid) if e.grid else None,
                }
            )
            requests.append(position)
    return encode_features(items, tensors, spec_digest, requests)
