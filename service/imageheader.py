"""Image sizes from the first bytes of an image file, for plans that read 612k headers.

PIL's header parser costs ~30 us an image in Python, and its file wraps the descriptor (one
more `fstat`, a round trip on NFS). This reads one prefix and understands only well-formed,
common headers: 8-bit JPEGs of 1, 3 or 4 components, their markers read as PIL 13 reads them
(every frame header up to the scan, the last one winning), and PNGs whose chunks up to the
first IDAT are whole, their CRCs right and their IHDR valid. Anything else (another format,
an unusual, crafted or damaged header, an image over PIL's pixel limit) gives None, and the
caller asks PIL. Where this gives a size PIL gives the same one, or refuses the file for damage
past what is read here (a bad table, say), which the engine then finds as it finds damaged pixels.
`size_at` gives PIL the bytes it read when they are the whole file (another format's small frame),
so only a larger file of another format, or a header past the prefix, costs a second open.
"""

from __future__ import annotations

import io
import os
import struct
import zlib

from PIL import Image

PREFIX_BYTES = 64 * 1024  # a JPEG's APP segments (EXIF, ICC) are at most 64 kB each; usually far less
FIRST_READ_BYTES = 4096  # a rendered frame's header is a few hundred bytes: the rest is read only when it is not

# A symlink is refused (ELOOP), a FIFO does not block the open.
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}  # colour type -> depths
# How the byte after 0xFF is read, as PIL 13 reads it: a fill byte; RST0-7, without a length; a segment,
# skipped by its length; a frame header (SOF0-SOF15 less DHT, JPG and DAC), the last before the scan winning;
# the scan; and otherwise PIL reads it in another way (SOI/EOI, JPG and JPG0-13 as markers without a length,
# DHP as a frame header; below 0xC0 it finds "no marker"), and `_jpeg_size` leaves it to PIL.
_UNSURE, _FILL, _RESTART, _SEGMENT, _FRAME, _SCAN = range(6)
_JPEG_KINDS = bytes(
    _FILL
    if m == 0xFF
    else _RESTART
    if 0xD0 <= m <= 0xD7
    else _UNSURE
    if m < 0xC0 or m in (0xC8, 0xD8, 0xD9, 0xDE) or 0xF0 <= m <= 0xFD
    else _SCAN
    if m == 0xDA
    else _FRAME
    if 0xC0 <= m <= 0xCF and m not in (0xC4, 0xC8, 0xCC)
    else _SEGMENT
    for m in range(256)
)
_FRAME_HEADER = struct.Struct(">BHHB")  # precision, height, width, components


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) that PIL would give for an image starting with `data`, or None if unsure."""
    if data.startswith(b"\xff\xd8"):
        size = _JPEG_HEADERS.size(data)
    elif data.startswith(_PNG_SIGNATURE):
        size = _png_size(data)
    else:
        return None
    if size is None or not 0 < size[0] * size[1] <= (Image.MAX_IMAGE_PIXELS or 0):
        return None  # PIL warns or refuses a decompression bomb; let it
    return size


def size_at(dfd: int, name: str, formats: tuple[str, ...]) -> tuple[int, int] | None:
    """(width, height) of the file `name` in the folder `dfd`, from its first `PREFIX_BYTES` at most: our
    reader's, else PIL's (of `formats`) if that is the whole file; None if neither can tell.

    A symlink there is refused (ELOOP), and the open cannot block (a FIFO fails the read); the
    caller has checked the folder inside the roots and the file's size. Raises OSError.
    """
    fd = os.open(name, _OPEN_FLAGS, dir_fd=dfd)
    try:
        data = os.pread(fd, FIRST_READ_BYTES, 0)
        whole = len(data) < FIRST_READ_BYTES
        size = header_size(data)
        if size is None and not whole:
            rest = os.pread(fd, PREFIX_BYTES - FIRST_READ_BYTES, FIRST_READ_BYTES)
            whole = len(rest) < PREFIX_BYTES - FIRST_READ_BYTES
            data += rest
            size = header_size(data)
    finally:
        os.close(fd)
    # PIL is given the bytes only when they are the whole file: on a prefix, some readers (TIFF's) drop
    # what they cannot read where the whole file's reading would fail.
    return size or (_pil_size(data, formats) if whole else None)


def _pil_size(data: bytes, formats: tuple[str, ...]) -> tuple[int, int] | None:
    """PIL's size of the image file `data`; None when PIL refuses it (the caller then opens the file, and PIL
    says why)."""
    try:
        with Image.open(io.BytesIO(data), formats=formats) as img:
            return img.size
    except Exception:
        return None


def _jpeg_size(data: bytes) -> tuple[tuple[int, int] | None, int]:
    """The size a JPEG's header gives, and where the header ends (its scan's start): nothing past it is read."""
    size = None
    pos, end, kinds = 2, len(data), _JPEG_KINDS
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None, 0
        kind = kinds[data[pos + 1]]
        if kind >= _SEGMENT:  # a marker with a length: most are
            length = data[pos + 2] << 8 | data[pos + 3]
            if length < 2 or pos + 2 + length > end:
                return None, 0
            if kind == _SCAN:
                return size, pos + 2 + length
            if kind == _FRAME:
                if length < 8 or (length - 8) % 3:  # PIL refuses a component list cut short
                    return None, 0
                precision, height, width, components = _FRAME_HEADER.unpack_from(data, pos + 4)
                if precision != 8 or components not in (1, 3, 4) or height == 0:
                    return None, 0
                size = (width, height)
            pos += 2 + length
        elif kind == _FILL:
            pos += 1
        elif kind == _RESTART:
            pos += 2
        else:
            return None, 0
    return None, 0


class _JpegHeaders:
    """JPEG headers read before, and their sizes. The frames one encoder writes at one quality (a simulator's
    renders, standard Huffman tables) share their header byte for byte, so it is parsed once: a file that starts
    with a known header reads as that header did, as the parse looks at nothing past it. A root of photos, each
    header its own, pays a few failed comparisons. Shared by the plan's threads: a race at worst parses twice."""

    MOST = 8  # headers kept, the latest first

    def __init__(self) -> None:
        self._known: tuple[tuple[bytes, tuple[int, int]], ...] = ()

    def size(self, data: bytes) -> tuple[int, int] | None:
        for header, size in self._known:
            if data.startswith(header):
                return size
        found, end = _jpeg_size(data)
        if found is not None:
            self._known = ((data[:end], found), *self._known[: self.MOST - 1])
        return found


_JPEG_HEADERS = _JpegHeaders()


def _png_size(data: bytes) -> tuple[int, int] | None:
    if len(data) < 33 or data[8:16] != b"\x00\x00\x00\rIHDR":
        return None
    width, height, depth, colour, compression, filtering, interlace = struct.unpack_from(">IIBBBBB", data, 16)
    if depth not in _PNG_DEPTHS.get(colour, ()) or compression or filtering or interlace > 1:
        return None
    if width >= 2**31 or height >= 2**31:
        return None
    # PIL reads every chunk up to the first IDAT as it opens the file: each must be whole, named and
    # its CRC right, and a second IHDR would set another size.
    pos = 8
    while pos + 12 <= len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        kind, end = data[pos + 4 : pos + 8], pos + 12 + length
        if not kind.isalpha() or end > len(data) or (kind == b"IHDR" and pos != 8):
            return None
        if zlib.crc32(data[pos + 4 : end - 4]) != int.from_bytes(data[end - 4 : end], "big"):
            return None
        if kind == b"IDAT":
            return width, height
        pos = end
    return None
