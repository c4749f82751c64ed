"""A job's first step, and all that a dry run does: scan a data root into units, refuse those a device must
not take, and plan the rest (entries valid / to compute, bytes, free space). A job under torchrun plans the
whole root at once (`plan_work`: its ranks share the units out); a service's job plans it a piece at a time
while it computes the pieces before (`plan_pieces`), and a dry run plans it so too, keeping only the sums
(`plan_root`)."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass

from vggt_cache.client.safeopen import OutsideRoots
from vggt_cache.client.spec import FeatureSpec
from vggt_cache.client.wire import EntryStatus
from vggt_cache.service.frametable import FrameTable
from vggt_cache.service.jobs.options import JobLimits, JobOptions
from vggt_cache.service.jobs.plan import Plan, PlanBuilder
from vggt_cache.service.jobs.records import TargetResult
from vggt_cache.service.paths import AllowedRoots
from vggt_cache.service.samples import SampleStream
from vggt_cache.service.sources import ScanResult, UnitPlanner, scan_data_root, scan_pieces, shard
from vggt_cache.service.units import Unit

# Samples a streamed job reads and plans before it hands them on: an episode folder holds ~35, so a piece is
# ~100 folders or a few thousand lines of a sample file; its units start computing while the next is planned.
PIECE_SAMPLES = 4096


@dataclass(frozen=True)
class Work:
    """A data root planned into units: this rank's share, those it may not touch, and the plan."""

    scan: ScanResult
    units: list[Unit]
    refused: dict[int, str]  # unit index -> why (a frame outside the roots, too many frames): failed before any decode
    plan: Plan
    # Units whose every target held a valid entry when planned (skip_existing): skipped without a second read.
    valid: list[int]


@dataclass(frozen=True)
class Piece:
    """A stretch of a streamed plan: the units it adds (as `Work` has them), and the plan of all so far."""

    units: list[Unit]
    refused: dict[int, str]
    valid: list[int]
    problems: list[tuple[str, str]]  # met reading its samples (the walk's unlisted folders with the first)
    samples: int  # samples read to its end: where a resumed plan goes on (`plan_pieces`' `skip_samples`)
    plan: Plan  # of this piece and those before it in this process; the whole plan once `last`
    last: bool  # the plan is complete with this piece


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
    builder = PlanBuilder(
        spec, data_root, options.skip_existing, world_size, allowed.real, limits.max_image_bytes, table
    )
    refused, valid = _check(units, builder, table, options, limits)
    return Work(scan, units, refused, builder.plan(scan.samples, len(refused)), valid)


def plan_root(
    data_root: str, spec: FeatureSpec, allowed: AllowedRoots, options: JobOptions, limits: JobLimits = JobLimits()
) -> Plan:
    """The plan of the whole root (a dry run): `plan_work`'s, planned a piece at a time and the pieces let go,
    so that what it holds does not grow with the root's units."""
    (last,) = deque(plan_pieces(data_root, spec, allowed, options, limits), maxlen=1)
    return last.plan


def plan_pieces(
    data_root: str,
    spec: FeatureSpec,
    allowed: AllowedRoots,
    options: JobOptions,
    limits: JobLimits = JobLimits(),
    skip_samples: int = 0,
    piece_samples: int = PIECE_SAMPLES,
    stop: threading.Event | None = None,
    recorded: Collection[bytes] = frozenset(),
) -> Iterator[Piece]:
    """Plan `data_root` a piece of `piece_samples` samples at a time, the rest in the last piece.

    A resumed job's plan: `recorded`, the keys (`Unit.key`) of the units its pieces recorded before, and
    `skip_samples`, the samples those pieces covered. The root is read again from its start (for the units later
    samples share), and a recorded unit is neither checked nor given again; what the root gained since (a folder
    added before the cursor) is. Problems within the first `skip_samples` samples were recorded then and are not
    given. `stop` set: no more pieces (checked at every sample read).
    """
    options.contain(data_root, allowed)
    table = FrameTable(allowed)
    stream = SampleStream(
        data_root,
        options.max_history_images,
        options.data_path,
        options.data_files,
        allowed=allowed,
        max_sample_bytes=limits.max_sample_bytes,
        table=table,
    )
    builder = PlanBuilder(spec, data_root, options.skip_existing, 1, allowed.real, limits.max_image_bytes, table)
    refused_total = 0
    for units, last in scan_pieces(stream, UnitPlanner(spec.attention), piece_samples, stop):
        problems = stream.new_problems()
        if recorded:
            units = [u for u in units if u.key not in recorded]
        # Within the samples recorded before (the last piece never is: the job would be planned): only what the
        # root gained since is new, its problems were recorded then.
        if skip_samples and stream.count <= skip_samples and not last:
            if not units:
                continue
            problems = []
        refused, valid = _check(units, builder, table, options, limits)
        refused_total += len(refused)
        plan = builder.plan(stream.sample_set(), refused_total, 1.0 if last else stream.read_fraction())
        yield Piece(units, refused, valid, problems, stream.count, plan, last)


def known_results(units: Sequence[Unit], refused: dict[int, str], valid: list[int]) -> list[TargetResult]:
    """What a plan knows of its units before any decode: the refused fail untouched, the valid are skipped."""
    known = [TargetResult(i, EntryStatus.FAILED, why, t) for i, why in refused.items() for t in units[i].targets]
    return known + [TargetResult(i, EntryStatus.CACHED, None, t) for i in valid for t in units[i].targets]


def _check(
    units: Sequence[Unit], builder: PlanBuilder, table: FrameTable, options: JobOptions, limits: JobLimits
) -> tuple[dict[int, str], list[int]]:
    """The units refused (index -> why) and those found valid; the rest checked into `builder`'s plan."""
    max_frames = limits.max_frames_per_sample
    refused: dict[int, str] = {}
    outside: dict[str, str] = {}  # frame -> why it is refused; each frame of the stretch contained once
    for frame in set().union(*(u.frames for u in units if len(u.frames) <= max_frames)):
        try:
            table.contain(frame)
        except (OutsideRoots, ValueError) as exc:
            outside[frame] = str(exc)
    for idx, unit in enumerate(units):
        if len(unit.frames) > max_frames:
            refused[idx] = (
                f"a sample of {len(unit.frames)} frames; the limit is {max_frames} per sample (--max-frames-per-sample)"
            )
        elif outside:
            why = next((outside[f] for f in unit.frames if f in outside), None)
            if why is not None:
                refused[idx] = why
    valid_targets = builder.check([u for i, u in enumerate(units) if i not in refused] if refused else units)
    valid = []
    if options.skip_existing:
        valid = [
            i for i, u in enumerate(units) if i not in refused and u.targets and valid_targets.issuperset(u.targets)
        ]
    return refused, valid
