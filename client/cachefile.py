"""Sibling cache files `<image>.vggt_cache.pt`: atomic writes and validated reads.

A file is `torch.save({"features": Tensor, "meta": dict})`, so the seed's
`torch.load(path, map_location="cpu")["features"]` (weights_only by default) keeps working. `features`
is `[P, C]` for one layer or `[L, P, C]` for several, in the spec's dtype;
`meta` holds only plain JSON values (see `write_entry`). A spec whose `storage` is not `raw`
stores `{"payload": uint8 Tensor, "meta": dict}` instead (`client/storage.py`): `read_entry`
decodes it to the same `features`, and the seed's loader finds no `"features"` and misses.

Reading never unpickles arbitrary objects and never raises for a bad file:
the outcome says what is wrong. Files in the layout `write_entry` produces are
loaded by a fast path (`client/fastload.py`); anything else goes to
`torch.load(weights_only=True)`; what was loaded is checked by `client/entryformat.py`. The order of checks is
missing -> unreadable (permission denied) -> corrupt -> spec mismatch -> stale (source, then context).
Context rules: a caller that passes `context_frames` to an entry without
context (a `frame`-mode entry) gets SPEC_MISMATCH; one that passes none to an
entry with context gets the recorded frames re-checked on disk (STALE if any
changed), so tools that do not know the clip can still verify an entry.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import overload

import torch

from vggt_cache.client.entryformat import FORMAT_VERSION, context_problem, max_entry_bytes, parse_entry, shape_problem
from vggt_cache.client.fastload import MAX_OVERHEAD_BYTES, load_file
from vggt_cache.client.safeopen import (
    DEFAULT_FILE_MODE,
    OutsideRoots,
    absolute,
    atomic_write,
    existing_kind,
    kind_of,
    temp_of,
)
from vggt_cache.client.spec import FeatureSpec, short_digest
from vggt_cache.client.storage import encode
from vggt_cache.client.text import error_text

CACHE_SUFFIX = ".vggt_cache.pt"

PathLike = str | os.PathLike


class Outcome(str, Enum):
    HIT = "hit"
    MISSING = "missing"
    STALE = "stale"
    CORRUPT = "corrupt"
    SPEC_MISMATCH = "spec_mismatch"
    UNREADABLE = "unreadable"  # a file this process may not read (another user's umask): not damaged


# Read once: an Enum member's read costs ~0.2 us on Python 3.11 (EnumType.__getattr__), and a plan reads an entry
# (or learns it has none) for every sample.
_HIT, _MISSING = Outcome.HIT, Outcome.MISSING


@dataclass
class ReadResult:
    """`features` (unless read with `tensor=False`) and `meta` are set on HIT; `meta` also if the file was readable."""

    outcome: Outcome
    features: torch.Tensor | None
    meta: dict | None
    reason: str
    path: str

    @property
    def hit(self) -> bool:
        return self.outcome is _HIT


def cache_path(image_path: PathLike) -> str:
    return os.fspath(image_path) + CACHE_SUFFIX


def source_record(image_path: PathLike) -> dict:
    """`{"size", "mtime_ns"}` of the image; take it before decoding the image."""
    st = os.stat(image_path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


@overload
def context_record(target: PathLike, frames: None, sources: Mapping[str, dict] | None = None) -> None: ...
@overload
def context_record(target: PathLike, frames: Sequence[PathLike], sources: Mapping[str, dict] | None = None) -> dict: ...
def context_record(
    target: PathLike, frames: Sequence[PathLike] | None, sources: Mapping[str, dict] | None = None
) -> dict | None:
    """The clip a `sequence`/`causal` entry was computed with (None for `frame` mode).

    Paths are relative to the target's folder, so a dataset tree can move as a whole.
    `sources`: the frames' `source_record`s already taken, by path (else each frame is stat-ed).
    """
    if frames is None:
        return None
    records = _frame_records(target, frames, sources)
    return {"frames": records, "digest": short_digest(records)}


def _frame_records(target: PathLike, frames: Sequence[PathLike], sources: Mapping[str, dict] | None) -> list[dict]:
    """A context record's frames (see `context_record`)."""
    if isinstance(frames, (str, bytes, os.PathLike)) or not frames:
        raise ValueError("context frames must be a non-empty sequence of paths")
    folder = os.path.dirname(absolute(target))
    return [
        {
            "path": _relative(absolute(frame), folder),
            **(sources[os.fspath(frame)] if sources is not None else source_record(frame)),
        }
        for frame in frames
    ]


def _relative(path: str, folder: str) -> str:
    """`os.path.relpath(path, folder)` for normalised absolute paths; a frame beside its target (the usual
    clip: an episode's) is its name, without relpath's walk of both."""
    if path.startswith(folder) and path[len(folder) : len(folder) + 1] == "/" and "/" not in path[len(folder) + 1 :]:
        return path[len(folder) + 1 :]
    return os.path.relpath(path, folder)


def write_entry(
    image_path: PathLike,
    features: torch.Tensor,
    spec: FeatureSpec,
    grid: Sequence[int],
    source: dict,
    context: dict | None = None,
    roots: Sequence[str] | None = None,
    mode: int = DEFAULT_FILE_MODE,
) -> str:
    """Atomically write the entry for `image_path` and return its cache path.

    `source` comes from `source_record` taken before the image was decoded, so an
    image rewritten meanwhile leaves an entry that is already stale. `roots` (real
    paths): the folder written must lie inside one when it is opened. What is at the
    cache path is replaced only if it may be an entry (see `may_be_entry`), else ValueError.
    `mode`: the file's permissions, whatever the writer's umask.
    """
    grid = [int(g) for g in grid]
    features = _storable(features, spec.torch_dtype)
    problem = shape_problem(tuple(features.shape), spec, grid) or context_problem(spec, context)
    if problem:
        raise ValueError(f"cannot write cache entry for {os.fspath(image_path)}: {problem}")
    meta = {
        "format_version": FORMAT_VERSION,
        "spec": spec.to_dict(),
        "spec_digest": spec.digest,
        "grid": grid,
        "source": {"size": int(source["size"]), "mtime_ns": int(source["mtime_ns"])},
        "context": context,
        "shape": list(features.shape),
        "dtype": spec.dtype,
        "created": time.time(),
    }
    path = cache_path(image_path)
    record = {"features": features} if spec.storage == "raw" else {"payload": encode(features, spec.storage)}
    atomic_write(path, lambda f: torch.save({**record, "meta": meta}, f), roots, may_be_entry, mode)
    return path


def may_be_entry(dfd: int, name: str) -> str | None:
    """Why what is at `name` (in folder `dfd`) must not be replaced by an entry, or None.

    Nothing, an empty file, a zip (torch.save's format) or a pickle (its legacy one) may be
    an entry, damaged or stale; anything else (a symlink, a FIFO, a user's file) is not ours.
    """
    found = existing_kind(dfd, name)
    if found is None:
        return None
    mode, head = found
    if not stat.S_ISREG(mode):
        return f"is {kind_of(mode)}, not a cache entry"
    if head and not head.startswith(b"PK\x03\x04") and head[0] != 0x80:
        return "exists and is not a cache entry"
    return None


def no_entry(image_path: PathLike) -> ReadResult:
    """What `read_entry` says of an image without a cache file."""
    return ReadResult(_MISSING, None, None, "no cache file", cache_path(image_path))


def read_entry(
    image_path: PathLike,
    spec: FeatureSpec | None = None,
    context_frames: Sequence[PathLike] | None = None,
    mmap: bool = True,
    tensor: bool = True,
    roots: Sequence[str] | None = None,
    check_crc: bool = False,
    sources: Mapping[str, dict] | None = None,
    dir_fd: int | None = None,
) -> ReadResult:
    """Read and validate the entry of `image_path`; never raises for a bad file.

    `tensor=False` reads and checks the metadata alone (the zip directory and the small
    pickle, a few KB) and returns no features: enough to know whether an entry is valid for
    `skip_existing` and dry runs, without reading megabytes per entry.

    `mmap=True` maps the file (pages are read when the tensor is used) and the
    mapping outlives a concurrent `os.replace` on a local file system. Prefer
    `mmap=False`, which reads the file in one call and is as fast for a tensor
    that is used whole, on NFS (another host's replace can invalidate mapped
    pages) and for tensors kept for long (before Python 3.13 each mapped tensor
    holds a file descriptor).

    The cache file must be a regular file (not a symlink) inside `roots` (real paths) when
    given, and, with a `spec`, no larger than an entry of that spec can be: else CORRUPT
    without reading it. `check_crc`: the tensor's bytes must match the zip's CRC-32. A `packed`
    or `fp8` entry's payload is decoded into a fresh tensor (`mmap` then only maps the payload).
    `sources`: the `source_record`s of the image and its context frames already taken, by path (a plan's
    frame table: each file stat-ed once for every entry that names it); a lookup may raise OSError.
    `dir_fd`: the image's folder, opened and checked inside `roots` (a plan's, once for all its entries): the
    entry is opened in it by name, which a symlink cannot lead out of.
    """
    path = cache_path(image_path)
    max_bytes = None if spec is None else max_entry_bytes(spec) + MAX_OVERHEAD_BYTES

    def result(outcome: Outcome, reason: str, meta: dict | None = None) -> ReadResult:
        return ReadResult(outcome, None, meta, reason, path)

    try:
        data = load_file(
            path if dir_fd is None else os.path.basename(path),
            mmap,
            meta_only=not tensor,
            max_bytes=max_bytes,
            roots=roots if dir_fd is None else None,
            check_crc=check_crc,
            dir_fd=dir_fd,
        )
    except FileNotFoundError:
        return no_entry(image_path)
    except PermissionError as e:
        if not isinstance(e, OutsideRoots):  # a symlink out of the roots is a planted file, not a permission
            return result(Outcome.UNREADABLE, "unreadable: permission denied")
        return result(Outcome.CORRUPT, f"unreadable: {error_text(e)}")
    except Exception as e:  # truncated zip, foreign pickle, refused globals, I/O errors
        return result(Outcome.CORRUPT, f"unreadable: {error_text(e)}")

    try:
        parsed = parse_entry(data, spec)
    except Exception as e:  # odd values in a foreign file must not escape as errors
        parsed = f"invalid structure: {error_text(e)}"
    if isinstance(parsed, str):
        return result(Outcome.CORRUPT, parsed)
    features, meta, file_spec = parsed

    if spec is not None and spec.digest != file_spec.digest:
        fields = ", ".join(spec.differences(file_spec)) or "?"
        return result(Outcome.SPEC_MISMATCH, f"spec differs in: {fields}", meta)

    try:
        current = source_record(image_path) if sources is None else sources[os.fspath(image_path)]
    except OSError as e:
        return result(Outcome.STALE, f"image not readable: {e.strerror or e}", meta)
    if current != meta["source"]:
        return result(Outcome.STALE, f"image changed: was {meta['source']}, now {current}", meta)

    stored = meta["context"]
    if context_frames is not None:
        if stored is None:
            return result(Outcome.SPEC_MISMATCH, "entry has no context (frame mode) but a clip was given", meta)
        try:
            expected = _frame_records(image_path, context_frames, sources)
        except OSError as e:
            return result(Outcome.STALE, f"context frame not readable: {e.filename}", meta)
        # The stored digest was checked against its frames (parse_entry): equal frames, equal digests.
        if expected != stored["frames"]:
            return result(Outcome.STALE, "context frames differ from the clip given", meta)
    elif stored is not None:
        changed = _changed_context_frame(image_path, stored["frames"])
        if changed:
            return result(Outcome.STALE, f"context frame changed: {changed}", meta)

    return ReadResult(_HIT, features if tensor else None, meta, "", path)


def holds_other_context(
    image_path: PathLike, spec: FeatureSpec, frames: Sequence[PathLike] | None, roots: Sequence[str] | None = None
) -> bool:
    """True when `image_path`'s entry is valid for `spec` but computed with a clip other than `frames`.

    Such an entry is someone's work (a bulk job's 9-frame history, say), not a stale file: a writer of
    another clip keeps it unless told to overwrite. Reads the metadata alone (a few KB).
    """
    if frames is None:  # frame mode: an entry has no context to differ in
        return False
    read = read_entry(image_path, spec, tensor=False, roots=roots)
    if not read.hit or read.meta is None:
        return False
    folder = os.path.dirname(os.path.abspath(image_path))
    ours = [os.path.relpath(os.path.abspath(frame), folder) for frame in frames]
    return [record["path"] for record in read.meta["context"]["frames"]] != ours


def _storable(features: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"features must be a tensor, got {type(features).__name__}")
    out = features.detach().to("cpu", dtype).contiguous()
    # torch.save writes a view's whole storage: a slice of a batch would drag the batch along.
    if out.storage_offset() != 0 or out.untyped_storage().nbytes() != out.nbytes:
        out = out.clone()
    return out


def _changed_context_frame(target: PathLike, frames: list) -> str | None:
    folder = os.path.dirname(os.path.abspath(target))
    for record in frames:
        frame = os.path.join(folder, record["path"])
        try:
            current = source_record(frame)
        except (OSError, ValueError):
            return f"{frame} (not readable)"
        if current != {"size": record["size"], "mtime_ns": record["mtime_ns"]}:
            return frame
    return None


def is_temp_file(name: str) -> bool:
    """True for the name of a temporary file `write_entry` makes (and removes, unless its process was killed)."""
    base = temp_of(name)
    return base is not None and base.endswith(CACHE_SUFFIX)
