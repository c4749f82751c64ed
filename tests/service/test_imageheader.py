import errno
import io
import os
import random
import zlib
from pathlib import Path

import pytest
from PIL import Image

from vggt_cache.service.imageheader import PREFIX_BYTES, header_size, size_at


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


def png_sized(width: int, height: int, crc_right: bool = True) -> bytes:
    data = bytearray(CORPUS["png rgb"])
    data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    data[29:33] = (zlib.crc32(bytes(data[12:29])) ^ (0 if crc_right else 1)).to_bytes(4, "big")
    return bytes(data)


def test_pils_pixel_limit_and_crc_are_pils_to_apply() -> None:
    assert header_size(png_sized(1000, 2000)) == pil_size(png_sized(1000, 2000)) == (1000, 2000)
    assert header_size(png_sized(1000, 2000, crc_right=False)) is None  # PIL refuses it
    assert header_size(png_sized(100_000, 100_000)) is None  # PIL's decompression-bomb rule, PIL's to apply


def test_size_at_reads_the_file_in_the_folder_and_refuses_a_symlink_or_fifo(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(CORPUS["jpeg rgb"])
    (tmp_path / "link.jpg").symlink_to(tmp_path / "a.jpg")
    os.mkfifo(tmp_path / "pipe.jpg")
    dfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert size_at(dfd, "a.jpg") == (644, 483)
        with pytest.raises(OSError) as link:
            size_at(dfd, "link.jpg")
        assert link.value.errno == errno.ELOOP
        with pytest.raises(OSError) as pipe:  # no writer: the open does not wait, the read fails
            size_at(dfd, "pipe.jpg")
        assert pipe.value.errno == errno.ESPIPE
    finally:
        os.close(dfd)
