"""A job's first step, and all that a dry run does: scan a data root into units, refuse those a device must
not take, and plan the rest (entries valid / to compute, bytes, free space)."""

from __future__ import annotations

from dataclasses import dataclass

from vggt_cache.client.safeopen import OutsideRoots
from vggt_cache.client.spec import FeatureSpec
from vggt_cache.service.frametable import FrameTable
from vggt_cache.service.jobs.options import JobLimits, JobOptions
from vggt_cache.service.jobs.plan import Plan, plan_job
from vggt_cache.service.paths import AllowedRoots
from vggt_cache.service.sources import ScanResult, scan_data_root, shard
from vggt_cache.service.units import Unit


@dataclass(frozen=True)
class Work:
    """A data root planned into units: this rank's share, those it may not touch, and the plan."""

    scan: ScanResult
    units: list[Unit]
    refused: dict[int, str]  # unit index -> why (a frame outside the roots, too many frames): failed before any decode
    plan: Plan
    # Units whose every target held a valid entry when planned (skip_existing): skipped without a second read.
    valid: list[int]


def plan_work(
    data_root: str,
    spec: FeatureSpec,
    allowed: AllowedRoots,
    options: JobOptions,
    limits: JobLimits = JobLimits(),
    rank: int = 0,
    world_size: int = 1,
) -> Work:
    """Scan `data_root` and plan this rank's share of it. A unit of more than `limits.max_frames_per_sample`
    frames is refused: one sample must not hold the device for everyone."""
    options.contain(data_root, allowed)
    table = FrameTable(allowed)  # each frame looked at once, however many samples name it
    scan = scan_data_root(
        data_root,
        spec.attention,
        options.data_path,
        options.max_history_images,
        options.data_files,
        allowed,
        limits.max_sample_bytes,
        table,
    )
    units = shard(scan.units, rank, world_size)
    max_frames = limits.max_frames_per_sample
    refused: dict[int, str] = {}
    for idx, unit in enumerate(units):
        if len(unit.frames) > max_frames:
            refused[idx] = (
                f"a sample of {len(unit.frames)} frames; the limit is {max_frames} per sample (--max-frames-per-sample)"
            )
            continue
        try:
            for frame in unit.frames:
                table.contain(frame)
        except (OutsideRoots, ValueError) as exc:
            refused[idx] = str(exc)
    admitted = [u for i, u in enumerate(units) if i not in refused]
    plan, valid_targets = plan_job(
        scan,
        spec,
        data_root,
        options.skip_existing,
        admitted,
        len(refused),
        world_size,
        allowed.real,
        limits.max_image_bytes,
        table,
    )
    valid = []
    if options.skip_existing:
        valid = [
            i
            for i, u in enumerate(units)
            if i not in refused and u.targets and all(t in valid_targets for t in u.targets)
        ]
    return Work(scan, units, refused, plan, valid)
