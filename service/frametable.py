"""What a plan knows of the files its samples name: each file stat-ed once, each folder resolved once.

A data root of 612k samples names every frame in up to nine clips, and on NFS every stat,
open or readlink is a round trip. So a plan (a dry run, a job's plan, `verify`) asks this table:
a folder's real path is resolved once (one `lstat` a folder, its parent's real path carried
down, instead of `realpath` walking every component of every frame), and a file is `lstat`-ed
once; that one call says whether it is a symlink (only those are resolved) and, for a regular
file, is its source record (size, mtime_ns) for every entry whose context names it.

A plan does not open the entry of an image whose folder the walk listed without it (a fresh root:
one call a sample less); an entry written since is found when the unit is computed, as an entry
written after any plan is.

What the table says holds for the plan only. What is opened at compute time is checked again
on its descriptor (`client.safeopen`), so a file replaced by a symlink out of the roots, or
deleted, after the plan fails then, as it always did.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable, Iterator, Mapping, Sequence

from vggt_cache.client.cachefile import CACHE_SUFFIX, ReadResult, no_entry, read_entry
from vggt_cache.client.safeopen import OutsideRoots, inside, nameable
from vggt_cache.client.spec import FeatureSpec
from vggt_cache.client.text import shorten
from vggt_cache.service.paths import AllowedRoots

# What one `lstat` (and a `stat` for a symlink) said of a file: (size, mtime_ns, is a symlink, is (or leads to) a
# regular file, errno of the stat that failed or 0). A plain tuple, not a NamedTuple: the collector stops
# tracking a tuple of numbers, and a plan holds one per file.
Look = tuple[int, int, bool, bool, int]


class FrameTable(Mapping[str, dict]):
    """Source records by path (a Mapping for `read_entry(sources=...)`), and containment of frames.

    A lookup of a file that cannot be stat-ed raises that OSError (FileNotFoundError for a deleted one).
    Safe to share between threads: a race at worst stats a file twice.
    """

    def __init__(self, allowed: AllowedRoots | None = None) -> None:
        self.allowed = allowed
        self._files: dict[str, Look] = {}
        self._folders: dict[str, str] = {}  # folder as named -> its real path
        self._contained: dict[str, str] = {}  # path -> its normalised form, inside the roots
        self._refused: dict[str, str] = {}  # path -> why it is not allowed
        self._devices: dict[str, int] = {}  # folder -> st_dev (-1: cannot stat)
        # A normalised folder whose name and real path are inside the roots -> its real path: a file named in it
        # that is not a symlink is inside too, told by its name and the table's `lstat`.
        self._inside: dict[str, str] = {}
        self._entries: dict[str, frozenset[str]] = {}  # folder the walk listed -> its files that have an entry

    def look(self, path: str) -> Look:
        """What `path` is, from its one `lstat` (made now if it is the first look)."""
        look = self._files.get(path)
        if look is None:
            link = False
            try:
                st = os.lstat(path)
                link = stat.S_ISLNK(st.st_mode)
                if link:
                    st = os.stat(path)
                look = (st.st_size, st.st_mtime_ns, link, stat.S_ISREG(st.st_mode), 0)
            except OSError as e:
                look = (0, 0, link, False, e.errno or errno.EIO)
            self._files[path] = look
        return look

    def __getitem__(self, path: str) -> dict:
        size, mtime_ns, _, _, err = self.look(path)
        if err:
            raise OSError(err, os.strerror(err), path)  # FileNotFoundError for ENOENT
        return {"size": size, "mtime_ns": mtime_ns}

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._files))

    def __len__(self) -> int:
        return len(self._files)

    def is_symlink(self, path: str) -> bool:
        return self.look(path)[2]

    def is_file(self, path: str) -> bool:
        """`os.path.isfile(path)`, from the table."""
        return self.look(path)[3]

    def listed(self, folder: str, names: Iterable[str]) -> None:
        """The walk listed `folder` as holding `names`: a file there whose entry is not among them has none."""
        self._entries[folder] = frozenset(n[: -len(CACHE_SUFFIX)] for n in names if n.endswith(CACHE_SUFFIX))

    def entry_listed(self, path: str) -> bool | None:
        """Whether the walk saw the cache entry of file `path`; None if it did not list the folder."""
        folder, _, name = path.rpartition("/")
        names = self._entries.get(folder)
        return None if names is None else name in names

    def read_entry(
        self,
        image: str,
        spec: FeatureSpec,
        context: Sequence[str] | None,
        tensor: bool,
        check_crc: bool = False,
        roots: Sequence[str] | None = None,
        dir_fd: int | None = None,
    ) -> ReadResult:
        """`read_entry` of `image` (mapped), the table its `sources`; not opened if the walk listed its folder
        without it (an entry written since is found when its unit is decoded)."""
        if self.entry_listed(image) is False:
            return no_entry(image)
        return read_entry(
            image,
            spec,
            context_frames=context,
            tensor=tensor,
            check_crc=check_crc,
            roots=roots,
            sources=self,
            dir_fd=dir_fd,
        )

    def real_folder(self, folder: str) -> str:
        """`os.path.realpath(folder)` for a normalised absolute `folder`, one `lstat` per folder ever asked."""
        real = self._folders.get(folder)
        if real is not None:
            return real
        parent, name = os.path.split(folder)
        if not name or parent == folder:
            real = os.path.realpath(folder)
        else:
            parent_real = self.real_folder(parent)
            try:
                link = stat.S_ISLNK(os.lstat(folder).st_mode)
            except OSError:
                link = False  # realpath keeps a missing component as it is
            real = os.path.realpath(folder) if link else os.path.join(parent_real, name)
        self._folders[folder] = real
        return real

    def contain(self, path: str) -> str:
        """`AllowedRoots.contain(path)` from the table: the name, its real location and its folder's real
        location inside the roots, else OutsideRoots (or InvalidPath); the normalised path if so."""
        if self.allowed is None:
            raise ValueError("a frame table without roots contains nothing")
        norm = self._contained.get(path)
        if norm is not None:
            return norm
        why = self._refused.get(path)
        if why is not None:
            raise OutsideRoots(why)
        folder, _, name = path.rpartition("/")
        if folder in self._inside and _plain_name(name) and not self.is_symlink(path):
            self._contained[path] = path  # normalised: a normalised folder and a plain name
            return path
        try:
            norm = self.allowed.named(path)
            folder, name = os.path.split(norm)
            real_folder = self.real_folder(folder)
            real = os.path.realpath(norm) if self.is_symlink(norm) else os.path.join(real_folder, name)
            if not inside(real, self.allowed.real):
                raise OutsideRoots(f"path resolves (through a symlink) outside the allowed roots: {shorten(path)}")
            if not inside(real_folder, self.allowed.real):
                raise OutsideRoots(f"folder of {shorten(path)} resolves outside the allowed roots")
        except OutsideRoots as exc:
            self._refused[path] = str(exc)
            raise
        self._contained[path] = norm
        # Not `//...`: POSIX keeps two leading slashes where a name with three loses them all but one.
        if (
            folder not in self._inside
            and not folder.startswith("//")
            and inside(folder, self.allowed.given + self.allowed.real)
        ):
            self._inside[folder] = real_folder
        return norm

    def device(self, folder: str) -> int:
        """st_dev of `folder` (-1 if it cannot be stat-ed), one stat per folder."""
        dev = self._devices.get(folder)
        if dev is None:
            try:
                dev = os.stat(folder).st_dev
            except OSError:
                dev = -1
            self._devices[folder] = dev
        return dev


def _plain_name(name: str) -> bool:
    """A file name `AllowedRoots.named` would take as it is, after a folder it took: no `.` or `..`, nameable."""
    return name not in ("", ".", "..") and nameable(name)
