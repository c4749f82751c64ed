"""Reading cache files without torch.load's fixed cost, and without unpickling anything but plain data.

torch.load spends ~140 us per call before touching any data (a pure-Python
unpickler, fake-tensor and pytree checks): about what copying a 4 MB entry
costs. The files `client.cachefile.write_entry` makes have one simple layout,
so they are parsed here: the zip directory by hand, `data.pkl` with the C
unpickler restricted to six globals that resolve to inert values (no torch or
user code can run), and the tensor's bytes (`features`, or the uint8 `payload` of a
`packed`/`fp8` entry, which `client.cachefile` decodes) read straight into its own buffer
(or, mapped, a view of the mapping). Anything unexpected raises,
and `load_file` hands the file to torch.load(weights_only=True) instead, except
what no reader may accept (`Corrupt`: compressed records, a storage larger than
its tensor, bytes besides the records, a CRC that does not match), which torch.load
would inflate or keep pinned.
"""

from __future__ import annotations

import contextlib
import copyreg
import io
import math
import mmap as mmap_module
import os
import pickle
import struct
import sys
import zipfile
import zlib
from collections.abc import Callable, Sequence
from typing import Any, BinaryIO, ClassVar, NamedTuple

import torch

from vggt_cache.client.safeopen import open_regular_fd


def load_file(
    path: str,
    use_mmap: bool,
    meta_only: bool = False,
    max_bytes: int | None = None,
    roots: Sequence[str] | None = None,
    check_crc: bool = False,
    dir_fd: int | None = None,
) -> Any:
    """The dict a cache file holds; our own layout is parsed here, any other goes to torch.load(weights_only=True).

    `meta_only`: read the zip directory and `data.pkl` alone (a few KB, not the tensor's
    megabytes); `"features"` is then a meta-device tensor of the stored shape and dtype, whose
    record was checked to hold exactly that many bytes. The file is opened once, as a regular
    file of at most `max_bytes` inside `roots` (see `client.safeopen`), and a symlink is not
    followed; `dir_fd`: `path` is a name in that checked folder's descriptor (`open_regular`).
    `check_crc`: the tensor's bytes must match the CRC-32 the zip records.
    Raises `Corrupt` (never handed to torch.load) for a compressed record, a storage larger
    than its tensor, bytes besides the records, or a CRC that does not match.
    """
    fd, file_size = open_regular_fd(path, max_bytes, roots, follow_symlinks=False, dir_fd=dir_fd)
    try:
        return _load_meta(fd, file_size) if meta_only else _load_fast(fd, file_size, use_mmap, check_crc)
    except Corrupt:
        raise
    except Exception:  # outside the fast path's layout: torch.load decides, on the same descriptor
        with io.FileIO(fd, "rb", closefd=False) as f:
            return _load_torch(f, meta_only, check_crc)
    finally:
        os.close(fd)


_MAX_PICKLE_BYTES = 1 << 20
_WINDOW = 8 << 10
# A file of ours holds, besides the tensor and data.pkl, a few small records, their headers and
# the directory (with 64-byte alignment padding): a few KB.
_MAX_OTHER_BYTES = 64 << 10
MAX_OVERHEAD_BYTES = _MAX_PICKLE_BYTES + _MAX_OTHER_BYTES
_STORAGE_DTYPES = {
    "BFloat16Storage": torch.bfloat16,
    "HalfStorage": torch.float16,
    "FloatStorage": torch.float32,
    "ByteStorage": torch.uint8,  # the payload of a packed or fp8 entry (client/storage.py)
}
# The one tensor of an entry: "features" (raw storage) or "payload" (the other storages).
TENSOR_KEYS = ("features", "payload")
_END = struct.Struct("<4s4H2LH")  # end of central directory
_CENTRAL = struct.Struct("<4s6H3L5H2L")  # central directory entry
_LOCAL = struct.Struct("<4s5H3L2H")  # local file header
# Before Python 3.13 every mapping keeps a duplicate of the file's descriptor open.
_MMAP_OPTIONS = {"trackfd": False} if sys.version_info >= (3, 13) else {}


class _StorageRef(NamedTuple):
    dtype: torch.dtype
    key: str
    numel: int


class _TensorRef(NamedTuple):
    storage: Any
    offset: Any
    size: Any
    stride: Any
    requires_grad: Any
    hooks: Any
    metadata: Any = None


class _Unsupported(Exception):
    """The file is outside the fast path's layout."""


class Corrupt(ValueError):
    """A file no reader may accept: what it holds would cost more than the entry it claims to be."""


class _RebuildTensor:
    """What `torch._utils._rebuild_tensor_v2` names here: it builds a _TensorRef and cannot be changed.

    Handing out the _TensorRef class itself would let a pickle's BUILD set class attributes
    (e.g. `_TensorRef.storage`) for the rest of the process.
    """

    __slots__ = ()

    def __call__(self, *args: Any) -> _TensorRef:
        return _TensorRef(*args)

    def __setstate__(self, state: Any) -> None:
        raise _Unsupported("state applied to a global")


class _RestrictedUnpickler(pickle.Unpickler):
    # Every global resolves to something a pickle cannot alter: a slot-less callable that refuses
    # BUILD, the dict type (immutable), dtypes (not callable, no attributes to set).
    _GLOBALS: ClassVar[dict[tuple[str, str], Any]] = {
        ("torch._utils", "_rebuild_tensor_v2"): _RebuildTensor(),
        ("collections", "OrderedDict"): dict,
        **{("torch", name): dtype for name, dtype in _STORAGE_DTYPES.items()},
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._GLOBALS[(module, name)]
        except KeyError:
            raise _Unsupported(f"global {module}.{name}") from None

    def persistent_load(self, pid: Any) -> _StorageRef:
        if not (
            isinstance(pid, tuple)
            and len(pid) == 5
            and pid[0] == "storage"
            and isinstance(pid[1], torch.dtype)
            and isinstance(pid[2], str)
            and type(pid[4]) is int
        ):
            raise _Unsupported("storage reference")
        return _StorageRef(pid[1], pid[2], pid[4])


class _PickleBytes(io.BufferedReader):
    """`data.pkl` for the C unpickler, which reads a file that cannot `peek` an opcode at a time, each read a
    Python call (3x slower). A read is clamped to the pickle's size: a length a pickle claims is not allocated."""

    def __init__(self, data: bytes | memoryview) -> None:
        super().__init__(io.BytesIO(data), len(data) + 1)
        self._size = len(data)

    def read(self, size: int | None = -1, /) -> bytes:
        return super().read(size if size is None or size < 0 else min(size, self._size))


def _load_fast(fd: int, file_size: int, use_mmap: bool, check_crc: bool) -> dict:
    if use_mmap:
        # A private (copy-on-write) mapping that the tensor keeps alive. Not
        # UntypedStorage.from_file: its tensors cannot cross DataLoader worker queues.
        mapping = mmap_module.mmap(fd, 0, access=mmap_module.ACCESS_COPY, **_MMAP_OPTIONS)
        whole = torch.frombuffer(mapping, dtype=torch.uint8)
        view = whole.numpy().data
        data, key, (start, length, crc), storage, size = _unpickle(
            lambda offset, n: view[offset : offset + n], len(view)
        )
        tensor_bytes = view[start : start + length]
        features = whole[start : start + length].view(storage.dtype).view(size)
    else:
        # The records and data.pkl (a few KB) first, then the tensor's bytes straight into its own
        # buffer: one copy from the page cache, and a tensor that holds nothing else.
        data, key, (start, length, crc), storage, size = _unpickle(_windowed_pread(fd, file_size), file_size)
        features = torch.empty(size, dtype=storage.dtype)
        tensor_bytes = features.view(-1).view(torch.uint8).numpy().data
        _read_exactly(fd, tensor_bytes, start)
    if check_crc and zlib.crc32(tensor_bytes) != crc:
        raise Corrupt("the tensor's bytes do not match their CRC-32")
    data[key] = features
    return data


def _read_exactly(fd: int, buffer: memoryview, offset: int) -> None:
    done = 0
    while done < len(buffer):
        n = os.preadv(fd, [buffer[done:]], offset + done)
        if n == 0:
            raise _Unsupported("file changed while reading")
        done += n


def _windowed_pread(fd: int, file_size: int) -> Reader:
    """A reader that serves the file's first and last `_WINDOW` bytes from two reads.

    In a file of ours, `data.pkl` and the local headers before the tensor lie in the first few
    KB, the small records after it and the zip directory in the last: two system calls
    instead of one per header. Anything else is read where it lies.
    """
    tail_start = max(0, file_size - _WINDOW)
    tail = memoryview(os.pread(fd, file_size - tail_start, tail_start))
    head = memoryview(os.pread(fd, min(_WINDOW, tail_start), 0) if tail_start else b"")

    def read(offset: int, n: int) -> bytes | memoryview:
        if offset + n <= len(head):
            return head[offset : offset + n]
        if offset >= tail_start and offset + n <= tail_start + len(tail):
            return tail[offset - tail_start : offset - tail_start + n]
        return os.pread(fd, n, offset)

    return read


def _load_meta(fd: int, file_size: int) -> dict:
    data, key, _, storage, size = _unpickle(_windowed_pread(fd, file_size), file_size)
    data[key] = torch.empty(size, dtype=storage.dtype, device="meta")
    return data


def _load_torch(f: BinaryIO, meta_only: bool, check_crc: bool) -> Any:
    """torch.load(weights_only=True) of a file outside the fast path, refusing what that path refuses."""
    # BadZipFile: the legacy (non-zip) format, which torch.load decides on.
    with contextlib.suppress(zipfile.BadZipFile), zipfile.ZipFile(f) as archive:
        if any(i.compress_type != zipfile.ZIP_STORED for i in archive.infolist()):
            raise Corrupt("compressed zip record")
        if check_crc and archive.testzip() is not None:
            raise Corrupt("a record does not match its CRC-32")
    f.seek(0)
    data = torch.load(f, map_location="cpu", weights_only=True)
    for key in TENSOR_KEYS if isinstance(data, dict) else ():
        tensor = data.get(key)
        if not isinstance(tensor, torch.Tensor):
            continue
        if tensor.untyped_storage().nbytes() != tensor.nbytes or tensor.storage_offset():
            raise Corrupt(
                f"tensor storage of {tensor.untyped_storage().nbytes()} bytes backs a tensor of {tensor.nbytes}"
            )
        if meta_only:
            data[key] = tensor.to("meta")
    return data


Reader = Callable[[int, int], "bytes | memoryview"]  # (offset, length) -> the file's bytes there


def _unpickle(read: Reader, file_size: int) -> tuple[dict, str, tuple[int, int, int], _StorageRef, tuple[int, ...]]:
    """(data.pkl's dict, the tensor's key, (offset, length, crc32) of its bytes, their storage, the tensor's size)."""
    records = _zip_records(read, file_size)
    if "data.pkl" not in records or copyreg._extension_registry:  # type: ignore[attr-defined]  # not in typeshed
        # Pickle extension codes would resolve globals without find_class.
        raise _Unsupported("data.pkl")
    start, length, crc = _record_start(read, records["data.pkl"])
    if length > _MAX_PICKLE_BYTES:
        raise _Unsupported("data.pkl")
    pickled = read(start, length)
    if len(pickled) != length:
        raise _Unsupported("data.pkl")
    if zlib.crc32(pickled) != crc:
        raise Corrupt("data.pkl does not match its CRC-32")
    data = _RestrictedUnpickler(_PickleBytes(pickled)).load()
    keys = [k for k in TENSOR_KEYS if k in data] if isinstance(data, dict) else []
    ref = data[keys[0]] if len(keys) == 1 else None
    if not (
        isinstance(ref, _TensorRef)
        and isinstance(ref.storage, _StorageRef)
        and ref.offset == 0
        and ref.requires_grad is False
        and ref.hooks == {}
        and ref.metadata is None
        and isinstance(ref.size, tuple)
        and all(type(n) is int and n >= 0 for n in ref.size)
        and ref.stride == _contiguous_strides(ref.size)
    ):
        raise _Unsupported("features layout")
    storage = ref.storage
    if storage.numel != math.prod(ref.size):
        raise Corrupt(f"tensor storage of {storage.numel} elements backs a tensor of {math.prod(ref.size)}")
    record = records.get(f"data/{storage.key}")
    if record is None:
        raise _Unsupported("features record")
    start, length, crc = _record_start(read, record)
    if length != storage.numel * storage.dtype.itemsize or start % storage.dtype.itemsize:
        raise _Unsupported("features record")
    if file_size - length - len(pickled) > _MAX_OTHER_BYTES:
        raise Corrupt(f"{file_size - length - len(pickled)} bytes besides the tensor and its records")
    return data, keys[0], (start, length, crc), storage, ref.size


class _Record(NamedTuple):
    """A stored zip record as the directory gives it: its local header is read only if it is read (`_record_start`)."""

    header: int  # offset of its local header
    size: int
    crc: int
    limit: int  # its data ends before the directory


def _zip_records(read: Reader, file_size: int) -> dict[str, _Record]:
    """Record name (without the archive folder) -> where it is; stored records only."""
    end = file_size - _END.size
    if end < 0:
        raise _Unsupported("too short for a zip file")
    signature, _, _, _, count, directory_size, directory, comment = _END.unpack(read(end, _END.size))
    if signature != b"PK\x05\x06" or comment or directory + directory_size > end:
        raise _Unsupported("zip end record")
    central = read(directory, directory_size)
    records = {}
    pos = 0
    for _ in range(count):
        fields = _CENTRAL.unpack_from(central, pos)
        signature, method, crc, packed, size = fields[0], fields[4], fields[7], fields[8], fields[9]
        name_len, extra_len, comment_len, header = fields[10], fields[11], fields[12], fields[16]
        if signature != b"PK\x01\x02":
            raise _Unsupported("zip directory entry")
        if method != 0 or packed != size:  # torch.save never compresses; inflating could cost any amount
            raise Corrupt("compressed zip record")
        name = bytes(central[pos + _CENTRAL.size : pos + _CENTRAL.size + name_len]).decode()
        pos += _CENTRAL.size + name_len + extra_len + comment_len
        if header + _LOCAL.size + size > directory:
            raise _Unsupported("zip local header")
        records[name.partition("/")[2]] = _Record(header, size, crc, directory)
    return records


def _record_start(read: Reader, record: _Record) -> tuple[int, int, int]:
    """(offset of its data, size, crc32) of `record`, from its local header."""
    local = _LOCAL.unpack(read(record.header, _LOCAL.size))
    start = record.header + _LOCAL.size + local[9] + local[10]
    if local[0] != b"PK\x03\x04" or start + record.size > record.limit:
        raise _Unsupported("zip local header")
    return start, record.size, record.crc


def _contiguous_strides(size: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(size):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))
