"""What a bulk job would do before it does it: entries already valid, entries to compute, bytes, free space.

`vggt-cache precompute --dry-run` and `POST /precompute {"dry_run": true}` print it; every
job checks it before computing anything and refuses to start when its new entries would not
fit on the data root's file system (unless forced). Nothing here loads the model: existing
entries are checked by their metadata alone (`read_entry(..., tensor=False)`), and the size
of a new entry follows from the image's header (its pixel size), the spec and the grid.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from PIL import Image

from client.cachefile import Outcome, entry_nbytes, read_entry
from client.spec import FeatureSpec
from service.preprocess import output_size
from service.sources import ScanResult
from service.units import Unit

# What a cache file holds beside its tensor: zip records, the metadata pickle (spec, source,
# a context of up to ~9 frames) and alignment. Measured 1.5-3 KiB; rounded up so a plan errs large.
ENTRY_OVERHEAD_BYTES = 4096
GIB = 1 << 30


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
    bytes_to_write: int
    free_bytes: int

    @property
    def fits(self) -> bool:
        return self.bytes_to_write <= self.free_bytes

    def to_dict(self) -> dict:
        return {**asdict(self), "fits": self.fits}

    def summary(self) -> str:
        """One paragraph with the arithmetic, for logs and refusals."""
        each = self.bytes_to_write / self.to_compute if self.to_compute else 0
        return (f"{self.source['samples']} samples ({self.source['source']}) -> {self.entries} entries: "
                f"{self.valid} valid, {self.to_compute} to compute x {_size(each)} each = "
                f"{_size(self.bytes_to_write)} to write; {_size(self.free_bytes)} free on the file system of "
                f"{self.data_root}")


def _size(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def free_bytes(path: str) -> int:
    """Bytes an unprivileged writer may still use on the file system holding `path`."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def plan_job(scan: ScanResult, spec: FeatureSpec, data_root: str, skip_existing: bool = True,
             units: Sequence[Unit] | None = None, refused: int = 0) -> Plan:
    """The plan of a job over `scan`, or over `units` (one rank's shard of it), reading headers and metadata only."""
    units = scan.units if units is None else units
    patch = spec.architecture.get("patch_size", 14)
    valid = to_compute = unreadable = 0
    nbytes = 0
    sizes: dict[tuple[int, int], int] = {}
    for unit in units:
        context = None if spec.attention == "frame" else unit.frames
        for target in unit.targets:
            if read_entry(target, spec, context_frames=context, tensor=False).outcome is Outcome.HIT:
                valid += 1
                if skip_existing:
                    continue
            to_compute += 1
            try:
                with Image.open(target) as image:  # the header only
                    pixels = image.size
            except Exception:  # PIL raises OSError, SyntaxError, DecompressionBombError, ...: the job fails it
                unreadable += 1
                continue
            if pixels not in sizes:
                height, width = output_size(*pixels, spec.preprocess, spec.size, spec.align)
                sizes[pixels] = entry_nbytes(spec, (height // patch, width // patch)) + ENTRY_OVERHEAD_BYTES
            nbytes += sizes[pixels]
    entries = sum(len(u.targets) for u in units)
    return Plan(data_root, scan.samples.describe(), len(units), entries, valid, to_compute, unreadable,
                len(scan.problems), refused, nbytes, free_bytes(data_root))
