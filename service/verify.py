"""`vggt-cache verify`: read every entry a data root's samples need and count what is wrong."""

from __future__ import annotations

from vggt_cache.client.cachefile import Outcome
from vggt_cache.client.spec import FeatureSpec
from vggt_cache.service.frametable import FrameTable
from vggt_cache.service.samples import DEFAULT_MAX_HISTORY, MAX_SAMPLE_BYTES
from vggt_cache.service.sources import scan_data_root


def verify_data_root(
    data_root: str,
    spec: FeatureSpec,
    data_path: str | None = None,
    max_history_images: int = DEFAULT_MAX_HISTORY,
    files: list[str] | None = None,
    max_sample_bytes: int = MAX_SAMPLE_BYTES,
) -> dict:
    """Counts per outcome (hit / missing / stale / corrupt / spec_mismatch / unreadable) and the problems found
    (malformed samples, missing images, and `unlisted`: what the walk could not read)."""
    table = FrameTable()  # a frame is in up to nine clips: stat-ed once for all of them
    scan = scan_data_root(
        data_root, spec.attention, data_path, max_history_images, files, max_sample_bytes=max_sample_bytes, table=table
    )
    counts = {o.value: 0 for o in Outcome}
    problems = []
    for unit in scan.units:
        context = spec.context_of(unit.frames)
        for target in unit.targets:
            result = table.read_entry(target, spec, context, tensor=True, check_crc=True)
            counts[result.outcome.value] += 1
            if not result.hit:
                problems.append({"image": target, "outcome": result.outcome.value, "reason": result.reason})
    problems += [
        {"image": where, "outcome": "malformed_sample", "reason": why}
        for where, why in scan.samples.malformed + scan.samples.missing
    ]
    problems += [{"image": where, "outcome": "unlisted", "reason": why} for where, why in scan.samples.unlisted]
    return {
        "data_root": data_root,
        "spec_digest": spec.digest,
        "counts": counts,
        "problems": problems,
        "ok": not problems,
    }
