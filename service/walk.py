"""The walk of a data root: every folder's files, symlinks out of the allowed roots left out, and what it found."""

from __future__ import annotations

import errno
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from vggt_cache.client.cachefile import CACHE_SUFFIX
from vggt_cache.client.manifest import MANIFEST_NAME
from vggt_cache.client.safeopen import inside
from vggt_cache.service.frametable import FrameTable
from vggt_cache.service.paths import AllowedRoots

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
STEP_FRAME = re.compile(r"^step_(\d+)_([A-Za-z_]+)\.(png|jpe?g)$", re.IGNORECASE)
# A folder that vanished (or became a file) while the walk went through its parent hides nothing.
_GONE = (errno.ENOENT, errno.ENOTDIR)

log = logging.getLogger("vggt_cache")


def _hidden(name: str) -> bool:
    return name.startswith((".", "~"))


def walk_files(
    root: str,
    allowed: AllowedRoots | None = None,
    unlisted: list[tuple[str, str]] | None = None,
    table: FrameTable | None = None,
) -> Iterator[tuple[str, list[str]]]:
    """(folder, sorted file names) for every non-hidden folder, top-down and sorted, symlink loops cut.

    Symlinks are followed, except (with `allowed`) those leading outside the allowed roots: these
    are neither followed nor listed, so no name from outside reaches a job or its manifest.
    A folder that cannot be listed (permissions, a path past PATH_MAX, out of descriptors) or an
    entry whose kind cannot be told (a symlink loop) is appended to `unlisted` as (path, reason):
    what it holds is unknown, which a job must say rather than finish without it.
    Real paths are carried down the walk: a child that is not a symlink lies in its parent's real
    folder, so only symlinks are resolved (resolving every folder made a deep tree quadratic or worse).
    `table`: told what each folder listed holds (`FrameTable.listed`: the entries it has).
    """
    real_root = os.path.realpath(root)
    seen: set[str] = set()
    pending = [(root, real_root)]
    left_out = 0
    while pending:
        folder, real = pending.pop()
        if real in seen:
            continue
        seen.add(real)
        try:
            entries = list(os.scandir(folder))
        except OSError as e:
            if e.errno not in _GONE and unlisted is not None:
                unlisted.append((folder, f"cannot list folder: {e.strerror or e}"))
            continue
        if table is not None:
            table.listed(folder, [entry.name for entry in entries])
        folders: list[tuple[str, str]] = []
        files: list[str] = []
        for entry in entries:
            name = entry.name
            if _hidden(name):
                continue
            try:
                entry_real = None  # a file's real path is not needed, a folder's is its parent's and its name
                if entry.is_symlink():
                    entry_real = os.path.realpath(entry.path)
                    if allowed is not None and not inside(entry_real, allowed.real):
                        left_out += 1
                        continue
                if entry.is_dir():
                    folders.append((name, entry_real or os.path.join(real, name)))
                else:
                    files.append(name)
            except OSError as e:  # a symlink loop, a name past PATH_MAX, ...
                if unlisted is not None:
                    unlisted.append((entry.path, f"cannot tell what this is: {e.strerror or e}"))
        files.sort()
        yield folder, files
        pending.extend((os.path.join(folder, name), child) for name, child in sorted(folders, reverse=True))
    if left_out:
        log.warning("%s: %d symlink(s) leading outside the allowed roots were not followed", root, left_out)


def is_image(name: str) -> bool:
    return CACHE_SUFFIX not in name and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


@dataclass
class Found:
    """What the walk saw: sample files, episode folders with their step frames, loose images (until an episode
    folder is seen: then they are never read)."""

    jsonl: list[str] = field(default_factory=list)
    json: list[str] = field(default_factory=list)
    episodes: list[tuple[str, list[str]]] = field(default_factory=list)
    images: list[tuple[str, list[str]]] = field(default_factory=list)  # (folder, its files: `is_image` says which)
    unlisted: list[tuple[str, str]] = field(default_factory=list)


def walk_root(root: str, allowed: AllowedRoots | None, table: FrameTable | None = None) -> Found:
    found = Found()
    for folder, names in walk_files(root, allowed, found.unlisted, table):
        steps = [n for n in names if STEP_FRAME.match(n)]
        if steps:
            found.episodes.append((folder, steps))
            found.images.clear()
        found.jsonl += [os.path.join(folder, n) for n in names if n.endswith(".jsonl")]
        if not steps:
            found.json += [os.path.join(folder, n) for n in names if n.endswith(".json") and n != MANIFEST_NAME]
        if not found.episodes and names:
            found.images.append((folder, names))  # its images picked out only if they are read
    return found
