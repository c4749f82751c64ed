"""Opening files that someone else may have swapped: regular files only, bounded, checked where they really are.

Containment checked on a path when a request arrives does not hold when the file is opened
later: a folder can have become a symlink meanwhile. So the check is made on the descriptor
actually opened (its real path, from `/proc/self/fd`), and writes go through one descriptor
of the folder (temporary file, fsync, rename, all relative to it). A FIFO, socket or device
where a file is expected is refused at once: it is opened non-blocking and checked with
`fstat` before any read.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import secrets
import stat
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer


class NotRegularFile(OSError):
    """A FIFO, socket, device or folder where a regular file is expected."""


class FileTooLarge(OSError):
    """A file over the size its reader allows; refused before it is read."""


class OutsideRoots(PermissionError):
    """A path, or what was opened (a folder swapped for a symlink, say), lies outside every allowed root.

    The one error for it: raised here when a descriptor is checked, and by the service's
    `AllowedRoots.contain` when a request names a path (the API answers 403).
    """


def inside(path: str, roots: Sequence[str]) -> bool:
    """True when `path` (normalised, absolute) is one of `roots` or below one."""
    return any(path == r or path.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


def absolute(path: str | os.PathLike[str]) -> str:
    """`os.path.abspath(path)`. A plan's paths are already absolute and normal (no `//`, `.`, `..` or trailing
    `/`), and are taken as they are: a context record makes one for each of its frames."""
    if type(path) is str and path[:1] == "/" and "//" not in path and "/." not in path and path[-1] != "/":
        return path
    return os.path.abspath(path)


def nameable(name: str) -> bool:
    """Whether a file can have this name: no NUL, and no lone surrogate (no file name decodes to one)."""
    if "\x00" in name:
        return False
    if not name.isascii():
        try:
            os.fsencode(name)
        except UnicodeEncodeError:
            return False
    return True


def kind_of(mode: int) -> str:
    """`a FIFO`, `a socket`, ... for an `st_mode` that is not a regular file's."""
    for test, name in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISLNK, "a symlink"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def real_path(fd: int) -> str:
    """Where an open descriptor really is, whatever names led to it (Linux: needs /proc)."""
    return os.readlink(f"/proc/self/fd/{fd}")


def check_contained(fd: int, roots: Sequence[str], name: str) -> None:
    """Raise OutsideRoots unless descriptor `fd` (opened as `name`) lies inside one of the real `roots`."""
    if not inside(real_path(fd), roots):
        raise OutsideRoots(f"{name} resolves outside the allowed roots when opened (a symlink?); not used")


def open_regular(
    path: str,
    max_bytes: int | None = None,
    roots: Sequence[str] | None = None,
    follow_symlinks: bool = True,
    dir_fd: int | None = None,
) -> io.FileIO:
    """An unbuffered binary reader of `path` if it is a regular file of at most `max_bytes` bytes.

    Opened non-blocking, so a FIFO without a writer cannot hang the caller; `roots` (real
    paths): the opened file must lie inside one; `follow_symlinks=False`: a symlink as the last
    component is refused (ELOOP). `dir_fd`: `path` is a name in that folder's descriptor (one
    checked once for all its files: with `follow_symlinks=False` what opens lies in it, so no
    `roots` check per file is needed). Raises NotRegularFile, FileTooLarge, OutsideRoots or OSError.
    """
    fd, _ = open_regular_fd(path, max_bytes, roots, follow_symlinks, dir_fd)
    try:
        return io.FileIO(fd, "rb", closefd=True)  # O_NONBLOCK changes nothing for a regular file
    except BaseException:
        os.close(fd)
        raise


def open_regular_fd(
    path: str,
    max_bytes: int | None = None,
    roots: Sequence[str] | None = None,
    follow_symlinks: bool = True,
    dir_fd: int | None = None,
) -> tuple[int, int]:
    """`open_regular`'s (descriptor, size), for a reader that needs no file object: the object's own `fstat`
    is one more call per file (a plan or `verify` reads 612k)."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC | (0 if follow_symlinks else os.O_NOFOLLOW)
    fd = os.open(path, flags, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(f"{path} is {kind_of(st.st_mode)}, not a regular file")
        if roots is not None:
            check_contained(fd, roots, path)
        if max_bytes is not None and st.st_size > max_bytes:
            raise FileTooLarge(f"{path} is {st.st_size} bytes, over the limit of {max_bytes}; not read")
        return fd, st.st_size
    except BaseException:
        os.close(fd)
        raise


def temp_name(name: str) -> str:
    """The hidden temporary name a write of `name` goes through (unique per process and write)."""
    return f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


_TEMP_NAME = re.compile(r"\.(.+)\.[0-9]+\.[0-9a-f]{8}\.tmp", re.DOTALL)


def temp_of(name: str) -> str | None:
    """The name whose write `name` is the temporary file of (see `temp_name`), or None if it is not one."""
    found = _TEMP_NAME.fullmatch(name)
    return None if found is None else found.group(1)


# Entries and manifests are read by every user's dataloader: readable by all, whatever the writer's umask.
DEFAULT_FILE_MODE = 0o644

Replaceable = Callable[[int, str], "str | None"]  # (folder descriptor, name) -> why it must not be replaced


def atomic_write(
    path: str,
    write: Callable[[BinaryIO], object],
    roots: Sequence[str] | None = None,
    replaceable: Replaceable | None = None,
    mode: int = DEFAULT_FILE_MODE,
) -> None:
    """Write `path` atomically: a temporary file in its folder, flushed, fsynced and renamed over it.

    Every step is relative to one descriptor of the folder, so the folder checked (`roots`:
    it must lie inside one) is the folder written, whatever is renamed or swapped meanwhile.
    `replaceable`: says why what is at `path` must not be replaced (then ValueError), or None.
    `mode`: the file's permissions, set on the descriptor before the rename (the umask does not apply).
    """
    folder, name = os.path.split(path)
    with open_folder(folder or ".", roots) as dfd:
        problem = replaceable(dfd, name) if replaceable is not None else None
        if problem:
            raise ValueError(f"{path} {problem}; not replaced")
        tmp = temp_name(name)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666, dir_fd=dfd)
        try:
            try:
                raw = _ErrorKeepingFile(fd)
            except BaseException:
                os.close(fd)
                raise
            with io.BufferedWriter(raw) as f:
                try:
                    write(f)
                except Exception as e:
                    # torch.save turns a short write (a disk filling up) into "unexpected pos":
                    # the disk's own error is the one that says what happened.
                    if raw.error is not None and not isinstance(e, OSError):
                        raise raw.error from e
                    raise
                f.flush()
                os.fchmod(fd, mode)
                os.fsync(fd)
            os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dfd)
            raise
        # Makes the rename durable; some file systems refuse fsync on directories.
        with contextlib.suppress(OSError):
            os.fsync(dfd)


class _ErrorKeepingFile(io.FileIO):
    """A file that remembers the first OSError a write raised, for callers whose writer masks it."""

    def __init__(self, fd: int) -> None:
        super().__init__(fd, "wb")
        self.error: OSError | None = None

    def write(self, b: ReadableBuffer, /) -> int:
        try:
            return super().write(b)
        except OSError as e:
            self.error = self.error or e
            raise


@contextlib.contextmanager
def open_folder(folder: str, roots: Sequence[str] | None = None) -> Iterator[int]:
    """A descriptor of `folder`, checked inside `roots` (real paths) when given: what is done relative
    to it happens in the folder checked, whatever is renamed or swapped meanwhile. Raises OSError
    (OutsideRoots among them)."""
    dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if roots is not None:
            check_contained(dfd, roots, folder)
        yield dfd
    finally:
        os.close(dfd)


def existing_kind(dfd: int, name: str) -> tuple[int, bytes] | None:
    """(st_mode, first 4 bytes, or b"" unless a regular file) of what is at `name` in folder `dfd`; None if nothing."""
    try:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return st.st_mode, b""
    fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
    try:
        return st.st_mode, os.pread(fd, 4, 0)
    finally:
        os.close(fd)
