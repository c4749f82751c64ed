"""What a bulk job would do before it does it: entries already valid, entries to compute, bytes, free space.

`vggt-cache precompute --dry-run` and `POST /precompute {"dry_run": true}` print it; every
job checks it as it plans (a piece at a time, `PlanBuilder`) and fails once its new entries would
not fit (unless forced). Nothing here loads the model: existing entries are checked by their
metadata alone (`read_entry(..., tensor=False)`), and the size of a new entry follows from
the image's header (its pixel size), the spec (its storage too) and the grid. An entry replacing an existing
file only needs the difference. Entries go next to their images, so the bytes are counted per
file system; under torchrun each of N ranks plans its own share and must fit in 1/N of the
free space.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

from vggt_cache.client.cachefile import Outcome, cache_path
from vggt_cache.client.entryformat import stored_entry_bytes
from vggt_cache.client.safeopen import FileTooLarge, NotRegularFile, open_folder
from vggt_cache.client.spec import FeatureSpec
from vggt_cache.client.text import bounded
from vggt_cache.service.frametable import FrameTable
from vggt_cache.service.imageheader import size_at
from vggt_cache.service.preprocess import IMAGE_FORMATS, MAX_IMAGE_BYTES, image_size, output_size
from vggt_cache.service.samples import SampleSet
from vggt_cache.service.units import Unit

log = logging.getLogger("vggt_cache")

# What a cache file holds beside its tensor: zip records, the metadata pickle (spec, source,
# a context of up to ~9 frames) and alignment. Measured 1.5-3 KiB; rounded up so a plan errs large.
ENTRY_OVERHEAD_BYTES = 4096
# Folder checks run at once: as many as keep one core busy while the others wait on the file system. On NFS a
# check waits on round trips most of its time and needs many beside it; on a local disk with its pages cached it
# waits on nothing, and a second thread only takes the GIL from the first at every system call (16 threads
# there doubled the plan's CPU). `PLAN_THREADS` is the most; a check run alone now and then says how many.
PLAN_THREADS = 16
MEASURED_TARGETS = 32  # checked alone, on the planning thread, to tell how long a check waits
MEASURE_EVERY = 256  # folders, between two such measures: a root on two file systems, a cache grown cold
PROGRESS_EVERY_S = 30.0
PROBLEMS_SHOWN = 5  # a plan names its first problems (a job's failures and verify list them all)
_MISSING = Outcome.MISSING  # read once: an Enum member's read costs ~0.2 us on Python 3.11, and this is read a target


@dataclass
class Plan:
    data_root: str
    source: dict  # SampleSet.describe(): where the samples came from and how many there are
    units: int  # forward passes planned (clips; images in frame mode)
    entries: int  # cache entries the samples need
    valid: int  # of which already hold a valid entry
    to_compute: int  # what the job computes: the entries not valid with skip_existing, else all
    unreadable: int  # targets whose image header could not be read (they will fail)
    problems: int  # malformed samples, missing images
    refused: int  # units with a frame outside the allowed roots (they will fail, untouched)
    bytes_to_write: int  # new bytes on disk: new entries, less the files they replace
    free_bytes: int  # on the file system of the data root
    ranks: int = 1  # torchrun: this plan is one rank's share and must fit in 1/ranks of the free space
    tightest: dict | None = None  # the file system with the least room to spare: path, bytes_to_write, free_bytes
    entry_bytes: int = 0  # the size of one new entry (the mean over those to compute)
    replaced_bytes: int = 0  # of the files those entries replace (bytes_to_write is net of them)
    unlisted: int = 0  # of the problems: folders (or entries) the walk could not read, whose samples are unknown
    first_problems: list[dict] = field(default_factory=list)  # the first PROBLEMS_SHOWN, {"where", "reason"}
    read_fraction: float = 1.0  # of the root's samples read, about (a sample file by its bytes): 1 once planned

    @property
    def fits(self) -> bool:
        fs = self.tightest or {"bytes_to_write": self.bytes_to_write, "free_bytes": self.free_bytes}
        return fs["bytes_to_write"] * self.ranks <= fs["free_bytes"]

    def to_dict(self) -> dict:
        return {**asdict(self), "fits": self.fits}

    def summary(self) -> str:
        """One paragraph with the arithmetic, for logs and refusals."""
        fs = self.tightest or {
            "path": self.data_root,
            "bytes_to_write": self.bytes_to_write,
            "free_bytes": self.free_bytes,
        }
        share = f" (this rank's share of {self.ranks})" if self.ranks > 1 else ""
        where = f" ({human_bytes(fs['bytes_to_write'])} of it)" if fs["bytes_to_write"] != self.bytes_to_write else ""
        # The entry's own size, then the net bytes: recomputed entries replace files of about their size.
        net = f" (net of the {human_bytes(self.replaced_bytes)} they replace)" if self.replaced_bytes else ""
        return (
            f"{self.source['samples']} samples ({self.source['source']}) -> {self.entries} entries: "
            f"{self.valid} valid, {self.to_compute} to compute of {human_bytes(self.entry_bytes)} each; "
            f"{human_bytes(self.bytes_to_write)} to write{net}{share}; "
            f"{human_bytes(fs['free_bytes'])} free on the file system of {fs['path']}{where}"
        )


def human_bytes(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def free_bytes(path: str) -> int:
    """Bytes an unprivileged writer may still use on the file system holding `path`."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def lanes_for(wall: float, cpu: float, most: int = PLAN_THREADS) -> int:
    """Checks to run at once when one, run alone, took `wall` seconds, `cpu` of them on the CPU: the rest is
    waiting, which that many others fill."""
    if cpu <= 0:
        return most
    return max(1, min(most, round(wall / cpu)))


@dataclass
class _Target:
    valid: bool
    compute: bool
    nbytes: int  # new bytes on disk if computed (can be negative: a larger file is replaced)
    size: int  # the new entry's size
    unreadable: bool
    device: int  # st_dev of the folder the entry goes into
    folder: str


_Folder = list[tuple[str, Sequence[str] | None]]  # a folder's targets, each with its context frames


@dataclass(frozen=True)
class _Checks:
    """What every target's check shares."""

    spec: FeatureSpec
    skip_existing: bool
    sizes: dict[tuple[int, int], int]  # pixels -> entry bytes
    table: FrameTable
    roots: Sequence[str] | None
    max_image_bytes: int


def _folder_of(work: tuple[str, Sequence[str] | None]) -> str:
    """`os.path.dirname` of a target (a normalised absolute path), in one call: asked for every target."""
    return work[0].rpartition("/")[0] or "/"


def _check_folder(folder: str, work: _Folder, checks: _Checks) -> list[_Target]:
    """The targets of one folder, its descriptor opened (and checked inside the roots) once for all their headers."""
    with contextlib.ExitStack() as stack:
        try:
            dfd = stack.enter_context(open_folder(folder, checks.roots))
        except OSError:  # each header is then opened by its path, and fails as the engine will
            dfd = None
        device = checks.table.device(folder)
        return [_check(target, context, checks, dfd, device, folder) for target, context in work]


def _check(
    target: str, context: Sequence[str] | None, checks: _Checks, dfd: int | None, device: int, folder: str
) -> _Target:
    spec, sizes, table = checks.spec, checks.sizes, checks.table
    if table.entry_listed(target) is False:  # a fresh root's every target: no entry, and no ReadResult made
        valid, missing = False, True
    else:
        read = table.read_entry(target, spec, context, tensor=False, roots=checks.roots, dir_fd=dfd)
        valid, missing = read.hit, read.outcome is _MISSING
    if valid and checks.skip_existing:
        return _Target(True, False, 0, 0, False, device, folder)
    try:
        file_size, _, link, regular, _ = table.look(target)
        if dfd is not None and not link:  # a symlink is followed, and checked, by path
            pixels = _pixels_in(dfd, target, file_size if regular else None, checks)
        else:
            pixels = image_size(target, checks.max_image_bytes, checks.roots)
    except Exception:  # PIL raises OSError, SyntaxError, DecompressionBombError, ...: the job fails it
        return _Target(valid, True, 0, 0, True, device, folder)
    size = sizes.get(pixels)
    if size is None:  # a benign race between threads: both compute the same number
        patch = spec.architecture.get("patch_size", 14)
        height, width = output_size(*pixels, spec.preprocess, spec.size, spec.align)
        size = sizes[pixels] = stored_entry_bytes(spec, (height // patch, width // patch)) + ENTRY_OVERHEAD_BYTES
    try:
        replaced = 0 if missing else os.lstat(cache_path(target)).st_size
    except OSError:
        replaced = 0
    return _Target(valid, True, size - replaced, size, False, device, folder)


def _pixels_in(dfd: int, target: str, file_size: int | None, checks: _Checks) -> tuple[int, int]:
    """(width, height) of `target` in its checked folder `dfd`, `file_size` as the table's `lstat` said (None: not
    a regular file): one open and read of its start say its size, and PIL opens the file whose header `size_at`
    could not read."""
    if file_size is None:
        raise NotRegularFile(f"{target} is not a regular file")
    if file_size > checks.max_image_bytes:
        raise FileTooLarge(f"{target} is over the limit of {checks.max_image_bytes} bytes")
    name = target.rpartition("/")[2]
    return size_at(dfd, name, IMAGE_FORMATS) or image_size(name, checks.max_image_bytes, dir_fd=dfd)


class PlanBuilder:
    """A plan made a stretch of units at a time (a streamed job plans as it computes): `check` each stretch,
    `plan` says the sum so far."""

    def __init__(
        self,
        spec: FeatureSpec,
        data_root: str,
        skip_existing: bool = True,
        ranks: int = 1,
        roots: Sequence[str] | None = None,
        max_image_bytes: int = MAX_IMAGE_BYTES,
        table: FrameTable | None = None,
    ) -> None:
        """`roots` (real paths): files that open outside them, and images over `max_image_bytes`, are counted
        unreadable, as the engine will fail them. `table`: the frames already looked at (`plan_work`'s
        containment), so each file is stat-ed once however many entries name it."""
        self.spec, self.data_root, self.ranks = spec, data_root, ranks
        self._checks = _Checks(
            spec, skip_existing, {}, FrameTable() if table is None else table, roots, max_image_bytes
        )
        self.units = self.entries = self.valid = self.to_compute = self.unreadable = 0
        self._bytes = self._new = self._new_bytes = self._replaced = 0
        self._per_device: dict[int, list] = {}  # st_dev -> [a folder on it, bytes]
        # Free space as first seen: a streamed job's own entries use it up while it plans, and must not count twice.
        self._free: dict[str, int] = {}
        self._started = self._last_report = time.monotonic()
        self.lanes = 1  # folder checks run at once, as last measured

    def check(self, units: Sequence[Unit]) -> frozenset[str]:
        """Check the targets of `units` (headers and metadata only); returns those holding a valid entry."""
        work: _Folder = [(t, self.spec.context_of(u.frames)) for u in units for t in u.targets]
        folders = [(folder, list(group)) for folder, group in itertools.groupby(work, _folder_of)]
        checked: list[_Target] = []
        start = 0
        while start < len(folders):
            wall, cpu, measured = time.perf_counter(), time.thread_time(), 0
            while start < len(folders) and measured < MEASURED_TARGETS:
                checked.extend(_check_folder(*folders[start], self._checks))
                measured += len(folders[start][1])
                start += 1
            self.lanes = lanes_for(time.perf_counter() - wall, time.thread_time() - cpu)
            batch = folders[start : start + MEASURE_EVERY]
            start += len(batch)
            for targets in self._run(batch):
                checked.extend(targets)
                if time.monotonic() - self._last_report > PROGRESS_EVERY_S:
                    self._last_report = time.monotonic()
                    log.info(
                        "Planning %s: %d entries checked (%.0f s)",
                        self.data_root,
                        self.entries + len(checked),
                        self._last_report - self._started,
                    )
        self.units += len(units)
        self.entries += len(work)
        for t in checked:
            self.valid += t.valid
            self.unreadable += t.unreadable
            if not t.compute:
                continue
            self.to_compute += 1
            self._bytes += t.nbytes
            if not t.unreadable:
                self._new += 1
                self._new_bytes += t.size
                self._replaced += t.size - t.nbytes
                self._per_device.setdefault(t.device, [t.folder, 0])[1] += t.nbytes
        return frozenset(target for (target, _), t in zip(work, checked, strict=True) if t.valid)

    def _run(self, folders: list[tuple[str, _Folder]]) -> Iterator[list[_Target]]:
        """The checks of `folders`, in order, `self.lanes` at once (one: on this thread, nothing handed over)."""
        if self.lanes == 1:
            yield from (_check_folder(folder, work, self._checks) for folder, work in folders)
            return
        with ThreadPoolExecutor(self.lanes, thread_name_prefix="vggt-plan") as pool:
            yield from pool.map(lambda group: _check_folder(group[0], group[1], self._checks), folders)

    def _free_bytes(self, path: str) -> int:
        if path not in self._free:
            self._free[path] = free_bytes(path)
        return self._free[path]

    def plan(self, samples: SampleSet, refused: int, read_fraction: float = 1.0) -> Plan:
        """The plan of what was checked, the samples being `samples` (as far as they were read: `read_fraction`
        of the root's)."""
        ranks = self.ranks
        file_systems = [
            {"path": folder, "bytes_to_write": max(0, nbytes), "free_bytes": self._free_bytes(folder)}
            for device, (folder, nbytes) in self._per_device.items()
            if device != -1
        ]
        tightest = min(file_systems, key=lambda fs: fs["free_bytes"] - fs["bytes_to_write"] * ranks, default=None)
        if tightest is not None and len(file_systems) == 1 and os.stat(self.data_root).st_dev in self._per_device:
            tightest = None  # one file system, the data root's: the top-level figures say it all
        return Plan(
            self.data_root,
            samples.describe(),
            self.units,
            self.entries,
            self.valid,
            self.to_compute,
            self.unreadable,
            samples.problem_count,
            refused,
            max(0, self._bytes),
            self._free_bytes(self.data_root),
            ranks,
            tightest,
            round(self._new_bytes / self._new) if self._new else 0,
            self._replaced,
            len(samples.unlisted),
            [
                {"where": bounded(where), "reason": bounded(why)}
                for where, why in samples.first_problems(PROBLEMS_SHOWN)
            ],
            read_fraction,
        )


# A plan's counts that add up over pieces planned by two processes (a job resumed while it was planning).
_ADDED = ("units", "entries", "valid", "to_compute", "unreadable", "refused", "bytes_to_write", "replaced_bytes")


def resumed(earlier: dict | None, plan: Plan) -> dict:
    """`plan.to_dict()` with the counts of `earlier`, the plan a process recorded before this one went on with
    it, added; `fits` (and the free space) stays this process's, as it checks only what it plans."""
    d = plan.to_dict()
    if earlier:
        for name in _ADDED:
            d[name] += earlier.get(name, 0)
        d["entry_bytes"] = d["entry_bytes"] or earlier.get("entry_bytes", 0)
    return d
