import errno
import io
import os
import random
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from vggt_cache.service.imageheader import FIRST_READ_BYTES, PREFIX_BYTES, _JpegHeaders, header_size, size_at
from vggt_cache.service.preprocess import IMAGE_FORMATS as FORMATS


def encoded(fmt: str, mode: str, size: tuple[int, int], **save) -> bytes:
    img = Image.new(mode, size, 0 if mode in ("1", "L", "P", "I;16") else (30,) * len(mode))
    buf = io.BytesIO()
    img.save(buf, fmt, **save)
    return buf.getvalue()


def pil_size(data: bytes) -> tuple[int, int] | None:
    try:
        with Image.open(io.BytesIO(data), formats=("JPEG", "PNG")) as img:
            return img.size
    except Exception:
        return None


EXIF = Image.Exif()
EXIF[0x010F] = "camera" * 1000  # a 6 kB APP1 segment before the frame header

CORPUS = {
    "jpeg rgb": encoded("JPEG", "RGB", (644, 483)),
    "jpeg grey": encoded("JPEG", "L", (17, 3)),
    "jpeg cmyk": encoded("JPEG", "CMYK", (40, 30)),
    "jpeg progressive": encoded("JPEG", "RGB", (320, 240), progressive=True),
    "jpeg optimized": encoded("JPEG", "RGB", (100, 77), optimize=True, quality=40),
    "jpeg exif": encoded("JPEG", "RGB", (64, 48), exif=EXIF),
    "jpeg icc": encoded("JPEG", "RGB", (64, 48), icc_profile=b"\0" * 50_000),
    "png rgb": encoded("PNG", "RGB", (644, 483)),
    "png rgba": encoded("PNG", "RGBA", (5, 900)),
    "png palette": encoded("PNG", "P", (33, 44)),
    "png bilevel": encoded("PNG", "1", (9, 9)),
    "png 16-bit": encoded("PNG", "I;16", (12, 10)),
    "png interlaced": encoded("PNG", "RGB", (30, 20), interlace=1),
}


@pytest.mark.parametrize("name", CORPUS)
def test_a_well_formed_header_gives_pils_size(name: str) -> None:
    data = CORPUS[name]
    assert header_size(data[:PREFIX_BYTES]) == pil_size(data) is not None


@pytest.mark.parametrize("fmt,mode", [("WEBP", "RGB"), ("BMP", "RGB"), ("GIF", "P"), ("TIFF", "RGB")])
def test_other_formats_are_left_to_pil(fmt: str, mode: str) -> None:
    assert header_size(encoded(fmt, mode, (8, 8))) is None


def test_damaged_headers_never_give_a_size_pil_would_not() -> None:
    rng = random.Random(7)
    given = 0
    for data in CORPUS.values():
        head = data[:2048]
        cases = [head[:n] for n in range(0, len(head), 7)]
        for _ in range(300):
            damaged = bytearray(head)
            for _ in range(rng.randint(1, 4)):
                damaged[rng.randrange(len(damaged))] = rng.randrange(256)
            cases.append(bytes(damaged))
        for case in cases:
            ours = header_size(case)
            if ours is not None:
                given += 1
                assert pil_size(case + data[len(case) :]) in (ours, None), case[:64]
    assert given > 1000  # the damage mostly spares the header: the fast path was exercised


def test_a_header_read_before_is_known_and_one_that_differs_is_read_anew() -> None:
    known = _JpegHeaders()
    rgb = CORPUS["jpeg rgb"]
    scan = rgb.index(b"\xff\xda")
    header_end = scan + 2 + int.from_bytes(rgb[scan + 2 : scan + 4], "big")
    assert known.size(rgb) == (644, 483) and known._known == ((rgb[:header_end], (644, 483)),)
    # The same header before other pixels: known. The header's frame size changed: read anew, another size.
    assert known.size(rgb[:header_end] + b"\x00" * 10) == (644, 483) and len(known._known) == 1
    at = rgb.index(b"\xff\xc0")
    resized = rgb[: at + 5] + struct.pack(">HH", 100, 200) + rgb[at + 9 :]
    assert known.size(resized) == (200, 100) == pil_size(resized) and len(known._known) == 2
    assert known.size(rgb[: header_end - 1]) is None  # the known header cut short: no scan, left to PIL
    for height in range(1, 20):  # headers of their own: the latest few are kept
        assert known.size(rgb[: at + 5] + struct.pack(">HH", height, 200) + rgb[at + 9 :]) == (200, height)
    assert len(known._known) == _JpegHeaders.MOST and known._known[0][1] == (200, 19)
    # Warm or cold, the same answers for damaged headers (the fuzz below checks those against PIL).
    rng = random.Random(3)
    for data in (v for v in CORPUS.values() if v.startswith(b"\xff\xd8")):
        for _ in range(200):
            damaged = bytearray(data[:4096])
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
            assert known.size(bytes(damaged)) == _JpegHeaders().size(bytes(damaged))


def png_sized(width: int, height: int, crc_right: bool = True) -> bytes:
    data = bytearray(CORPUS["png rgb"])
    data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    data[29:33] = (zlib.crc32(bytes(data[12:29])) ^ (0 if crc_right else 1)).to_bytes(4, "big")
    return bytes(data)


def test_pils_pixel_limit_and_crc_are_pils_to_apply() -> None:
    assert header_size(png_sized(1000, 2000)) == pil_size(png_sized(1000, 2000)) == (1000, 2000)
    assert header_size(png_sized(1000, 2000, crc_right=False)) is None  # PIL refuses it
    assert header_size(png_sized(100_000, 100_000)) is None  # PIL's decompression-bomb rule, PIL's to apply


def segment(marker: int, body: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(body) + 2) + body


def frame_header(marker: int, width: int, height: int, extra: bytes = b"") -> bytes:
    return segment(marker, struct.pack(">BHHB", 8, height, width, 3) + bytes.fromhex("012200021101031101") + extra)


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def crafted() -> dict[str, bytes]:
    """Headers PIL 13 reads otherwise than a JPEG or PNG reader going by the standards alone would."""
    jpeg, png = CORPUS["jpeg exif"], CORPUS["png rgb"]
    at = jpeg.index(b"\xff\xc0")
    end = at + 2 + int.from_bytes(jpeg[at + 2 : at + 4], "big")
    scan = jpeg.index(b"\xff\xda")
    return {
        "DHP read as a frame header": jpeg[:end] + frame_header(0xDE, 10, 10) + jpeg[end:],
        "a frame header inside JPG0": jpeg[:end] + segment(0xF0, frame_header(0xC0, 10, 10)) + jpeg[end:],
        "a component list cut short": jpeg[:at] + frame_header(0xC0, 64, 48, extra=b"\0") + jpeg[end:],
        "a scan header cut short": jpeg[: scan + 5],
        "a second IHDR": png[:33] + chunk(b"IHDR", struct.pack(">IIBBBBB", 7, 9, 8, 2, 0, 0, 0)) + png[33:],
        "a later chunk's CRC wrong": png[:33] + chunk(b"tEXt", b"a\0b")[:-1] + b"\x00" + png[33:],
        "no chunk after IHDR": png[:33],
    }


@pytest.mark.parametrize("name", list(crafted()))
def test_a_header_pil_reads_otherwise_is_left_to_pil(name: str) -> None:
    data = crafted()[name]
    first_frame_header = (64, 48) if data.startswith(b"\xff\xd8") else (644, 483)
    assert pil_size(data) != first_frame_header  # PIL gives another size, or refuses the file
    assert header_size(data) is None


def test_size_at_reads_the_file_in_the_folder_and_refuses_a_symlink_or_fifo(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(CORPUS["jpeg rgb"])
    (tmp_path / "link.jpg").symlink_to(tmp_path / "a.jpg")
    os.mkfifo(tmp_path / "pipe.jpg")
    dfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert size_at(dfd, "a.jpg", FORMATS) == (644, 483)
        with pytest.raises(OSError) as link:
            size_at(dfd, "link.jpg", FORMATS)
        assert link.value.errno == errno.ELOOP
        with pytest.raises(OSError) as pipe:  # no writer: the open does not wait, the read fails
            size_at(dfd, "pipe.jpg", FORMATS)
        assert pipe.value.errno == errno.ESPIPE
    finally:
        os.close(dfd)


class Reads:
    """Counts the opens and reads `size_at` makes through `os`."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.opens, self.reads = 0, []
        real_open, real_pread = os.open, os.pread

        def counted_open(*args, **kwargs):
            self.opens += 1
            return real_open(*args, **kwargs)

        def counted_pread(fd, n, offset):
            self.reads.append(n)
            return real_pread(fd, n, offset)

        monkeypatch.setattr(os, "open", counted_open)
        monkeypatch.setattr(os, "pread", counted_pread)


@pytest.fixture
def folder(tmp_path: Path):
    """The test's folder as a descriptor, what `size_at` reads in."""
    dfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    yield dfd
    os.close(dfd)


@pytest.mark.parametrize(
    "name,reads",
    [
        ("jpeg rgb", 1),  # its header in the first read
        ("jpeg exif", 2),  # a 6 kB EXIF segment before the frame header: the rest of the prefix read
        ("jpeg icc", 2),
        ("png rgb", 1),
    ],
)
def test_size_at_reads_past_the_first_read_only_for_a_header_beyond_it(tmp_path, folder, monkeypatch, name, reads):
    (tmp_path / "a.img").write_bytes(CORPUS[name])
    counted = Reads(monkeypatch)
    assert size_at(folder, "a.img", FORMATS) == pil_size(CORPUS[name]) is not None
    assert counted.opens == 1 and len(counted.reads) == reads
    assert sum(counted.reads) <= PREFIX_BYTES and counted.reads[0] == FIRST_READ_BYTES


@pytest.mark.parametrize(
    "fmt,mode,size",
    [("WEBP", "RGB", (70, 50)), ("BMP", "RGB", (100, 80)), ("GIF", "P", (31, 17)), ("TIFF", "RGB", (40, 30))],
)
def test_size_at_gives_pils_size_of_another_format_from_the_same_open(tmp_path, folder, monkeypatch, fmt, mode, size):
    (tmp_path / "a.img").write_bytes(encoded(fmt, mode, size))
    counted = Reads(monkeypatch)
    assert size_at(folder, "a.img", FORMATS) == size  # PIL read the whole file from the bytes read: no second open
    assert counted.opens == 1
    assert size_at(folder, "a.img", ("JPEG",)) is None  # a format not allowed: the caller's open refuses it


@pytest.mark.parametrize(
    "data",
    [
        encoded("BMP", "RGB", (300, 200)),  # its header first, but 180 kB: PIL is not given a part of a file
        encoded("JPEG", "RGB", (64, 48), icc_profile=b"\0" * 100_000),  # its frame header past 100 kB of ICC
    ],
    ids=["another format, larger than the prefix", "a header past the prefix"],
)
def test_size_at_leaves_what_its_prefix_cannot_tell_to_the_caller(tmp_path, folder, data):
    assert len(data) > PREFIX_BYTES
    (tmp_path / "a.img").write_bytes(data)
    assert size_at(folder, "a.img", FORMATS) is None
    with Image.open(io.BytesIO(data)) as whole:  # which the caller's open of the whole file gives
        assert whole.size in ((300, 200), (64, 48))
