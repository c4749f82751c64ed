"""Entries on disk in another storage: `vggt-cache convert` rewrites them, `verify --estimate-storage` prices it.

Both walk a data root's cache files (`<image>.vggt_cache.pt`) whatever the spec that wrote them,
and read each through `read_entry` (bounded, validated): only valid entries are used. A
conversion keeps the entry's spec but its storage, and its source and context records, so it
stays valid exactly as long as the entry it replaces would have; it is written atomically by
`write_entry`. An `fp8` entry is never converted: its loss cannot be undone.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from vggt_cache.client.cachefile import (
    CACHE_SUFFIX,
    Outcome,
    ReadResult,
    cache_path,
    is_temp_file,
    read_entry,
    write_entry,
)
from vggt_cache.client.manifest import MAX_FAILURES, manifest_path, read_manifest, write_manifest
from vggt_cache.client.spec import STORAGES, FeatureSpec
from vggt_cache.client.storage import decode, encode
from vggt_cache.client.text import bounded
from vggt_cache.service.paths import AllowedRoots
from vggt_cache.service.walk import walk_files

ESTIMATE_SAMPLES = 32


def entry_images(data_root: str, allowed: AllowedRoots, unlisted: list[tuple[str, str]]) -> Iterator[str]:
    """The image path of every cache file under `data_root` (the image itself need not exist); what the
    walk cannot read (a folder of another user's, say) is appended to `unlisted` as (path, reason)."""
    for folder, names in walk_files(data_root, allowed, unlisted):
        for name in names:
            if name.endswith(CACHE_SUFFIX) and not is_temp_file(name):
                yield os.path.join(folder, name[: -len(CACHE_SUFFIX)])


def read_valid(image: str, allowed: AllowedRoots, check_crc: bool = False) -> ReadResult:
    """The entry of `image` read with its own spec: its metadata first, so the file is bounded by that spec's size."""
    result = read_entry(image, tensor=False, roots=allowed.real)
    if result.outcome is not Outcome.HIT:
        return result
    assert result.meta is not None  # set on HIT
    spec = FeatureSpec.from_dict(result.meta["spec"])
    return read_entry(image, spec, mmap=False, roots=allowed.real, check_crc=check_crc)


def convert_entries(data_root: str, storage: str) -> dict:
    """Rewrite every valid entry under `data_root` whose storage differs as `storage`; counts and bytes saved."""
    if storage not in STORAGES:
        raise ValueError(f"storage must be one of {'|'.join(STORAGES)}, got {storage!r}")
    allowed = AllowedRoots.of([data_root])
    counts: dict[str, Any] = {"converted": 0, "already": 0, "invalid": 0, "lossy_source": 0, "failed": 0}
    before = after = 0
    converted_specs: dict[str, FeatureSpec] = {}
    unlisted: list[tuple[str, str]] = []
    for image in entry_images(data_root, allowed, unlisted):
        result = read_valid(image, allowed, check_crc=True)
        if result.outcome is not Outcome.HIT:
            counts["invalid"] += 1
            continue
        meta, features = result.meta, result.features
        assert meta is not None and features is not None  # set on HIT of a tensor read
        spec = FeatureSpec.from_dict(meta["spec"])
        if spec.storage == storage:
            counts["already"] += 1
            continue
        if spec.storage == "fp8":
            counts["lossy_source"] += 1
            continue
        st = os.stat(cache_path(image))
        target = dataclasses.replace(spec, storage=storage)
        try:
            write_entry(
                image,
                features,
                target,
                meta["grid"],
                meta["source"],
                meta["context"],
                roots=allowed.real,
                mode=_kept_mode(st.st_mode),
            )
        except (OSError, ValueError) as e:
            counts["failed"] += 1
            if len(counts.setdefault("failures", [])) < MAX_FAILURES:
                counts["failures"].append({"image": bounded(image), "reason": bounded(str(e))})
            continue
        counts["converted"] += 1
        before += st.st_size
        after += os.path.getsize(cache_path(image))
        converted_specs[spec.digest] = target
    _update_manifest(data_root, converted_specs, allowed)
    return {
        "data_root": data_root,
        "storage": storage,
        **counts,
        **_unlisted_report(unlisted),
        "bytes_before": before,
        "bytes_after": after,
        "bytes_saved": before - after,
    }


def _unlisted_report(unlisted: list[tuple[str, str]]) -> dict[str, Any]:
    """What the walk could not read: its entries are neither converted nor counted."""
    shown = [{"path": bounded(path), "reason": bounded(why)} for path, why in unlisted[:MAX_FAILURES]]
    return {"unlisted": len(unlisted), "unlisted_paths": shown}


def _update_manifest(data_root: str, converted: dict[str, FeatureSpec], allowed: AllowedRoots) -> None:
    """The manifest names the storage its entries now have, so `verify` and clients expect it."""
    manifest = read_manifest(data_root)
    if manifest is None or manifest.get("spec_digest") not in converted:
        return
    target = converted[manifest["spec_digest"]]
    mode = _kept_mode(os.stat(manifest_path(data_root)).st_mode)
    write_manifest(data_root, {**manifest, "spec": target.to_dict(), "spec_digest": target.digest}, allowed.real, mode)


def _kept_mode(st_mode: int) -> int:
    """A rewritten file keeps the permissions its writer gave it (`--file-mode`), the owner's read-write at least."""
    return (st_mode & 0o666) | 0o600


@dataclass(frozen=True)
class _Sampled:
    file_bytes: int
    now_bytes: int  # of the tensor or payload the file holds
    stored_bytes: dict[str, int]  # storage -> bytes of the tensor or payload it would hold
    fp8_error: tuple[float, float, float]  # max |y-x| / max |x|, mean |y-x| / mean |x|, lowest token cosine

    def file_bytes_in(self, storage: str) -> int:
        return self.file_bytes - self.now_bytes + self.stored_bytes[storage]


def estimate_storage(data_root: str, samples: int = ESTIMATE_SAMPLES, seed: int = 0) -> dict:
    """Bytes of the root's entries in each storage, from up to `samples` valid entries chosen at random.

    Each sampled entry is encoded in every storage; the root's total in a storage is the bytes
    its cache files take now times the sampled files' ratio of that storage's bytes to theirs.
    """
    allowed = AllowedRoots.of([data_root])
    unlisted: list[tuple[str, str]] = []
    images = list(entry_images(data_root, allowed, unlisted))
    total = sum(_size(cache_path(image)) for image in images)
    random.Random(seed).shuffle(images)
    sampled: list[_Sampled] = []
    for image in images:
        if len(sampled) == samples:
            break
        result = read_valid(image, allowed)
        if result.outcome is Outcome.HIT:
            assert result.features is not None and result.meta is not None  # set on HIT of a tensor read
            sampled.append(_sample(cache_path(image), result.features, result.meta))
    report: dict[str, Any] = {
        "data_root": data_root,
        "entries": len(images),
        "bytes_now": total,
        "sampled": len(sampled),
        "storages": {},
        **_unlisted_report(unlisted),
    }
    if not sampled:
        return report
    now = sum(s.file_bytes for s in sampled)
    as_raw = sum(s.file_bytes_in("raw") for s in sampled)
    for storage in STORAGES:
        stored = sum(s.file_bytes_in(storage) for s in sampled)
        report["storages"][storage] = {"bytes": math.ceil(total * stored / now), "ratio": round(as_raw / stored, 3)}
    errors = [s.fp8_error for s in sampled]
    report["storages"]["fp8"]["error"] = {
        "max_rel": max(e[0] for e in errors),
        "mean_rel": sum(e[1] for e in errors) / len(errors),
        "min_cosine": min(e[2] for e in errors),
    }
    return report


def _size(path: str) -> int:
    try:
        return os.lstat(path).st_size
    except OSError:
        return 0


def _sample(path: str, features: torch.Tensor, meta: dict) -> _Sampled:
    payloads = {storage: encode(features, storage) for storage in STORAGES if storage != "raw"}
    stored = {"raw": features.nbytes, **{storage: p.numel() for storage, p in payloads.items()}}
    x = features.float()
    y = decode(payloads["fp8"], "fp8", tuple(features.shape), features.dtype).float()
    diff, size = (y - x).abs(), x.abs()
    channels = x.shape[-1]
    cosine = torch.nn.functional.cosine_similarity(x.reshape(-1, channels), y.reshape(-1, channels), dim=1)
    error = (
        (diff.max() / size.max().clamp_min(1e-30)).item(),
        (diff.mean() / size.mean().clamp_min(1e-30)).item(),
        cosine.min().item(),
    )
    current = FeatureSpec.from_dict(meta["spec"]).storage
    return _Sampled(_size(path), stored[current], stored, error)
