import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from safetensors.torch import load_file

from vggt_cache.service import preprocess as pp
from vggt_cache.service.preprocess import ImageError, load_image, output_size, preprocess

from helpers.service import TINY_MODEL

PREPROCESS = TINY_MODEL / "preprocess"
EXPECTED = load_file(str(PREPROCESS / "expected.safetensors"))


@pytest.mark.parametrize("key", sorted(EXPECTED))
def test_matches_reference_exactly(key):
    name, mode = key.rsplit(".", 1)
    out = preprocess(PREPROCESS / name, mode=mode)
    expected = EXPECTED[key]
    assert out.dtype == torch.float32
    assert out.shape == expected.shape
    assert torch.equal(out, expected.to(torch.float32) / 255)


def test_pil_image_and_path_agree():
    path = PREPROCESS / "rgba.png"
    assert torch.equal(preprocess(Image.open(path), mode="pad"), preprocess(str(path), mode="pad"))


@pytest.mark.parametrize("mode", ["L", "P", "RGB", "CMYK"])
def test_other_pixel_modes_become_rgb(mode):
    grey = Image.new("RGB", (140, 140), (100, 100, 100))
    img = grey.quantize() if mode == "P" else grey.convert(mode)
    out = preprocess(img, mode="pad")
    assert out.shape == (3, 518, 518)
    assert torch.allclose(out, torch.full_like(out, 100 / 255), atol=2 / 255)


def test_align_28_resizes_down_to_multiples():
    out = preprocess(PREPROCESS / "landscape.jpg", mode="pad", align=28)
    assert out.shape == (3, 504, 504)
    assert out.min() >= 0.0 and out.max() <= 1.0
    # Crop output 392x518: only the width changes.
    assert preprocess(PREPROCESS / "landscape.jpg", mode="crop", align=28).shape == (3, 392, 504)


def test_align_14_is_a_no_op():
    base = preprocess(PREPROCESS / "portrait.png", mode="crop")
    assert torch.equal(preprocess(PREPROCESS / "portrait.png", mode="crop", align=14), base)


def test_exif_orientation_is_ignored_like_the_reference(tmp_path):
    img = Image.new("RGB", (200, 100), (10, 200, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90": the reference does not apply it
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif)
    assert preprocess(path, mode="crop").shape == (3, 252, 518)


@pytest.mark.parametrize("kwargs", [{"mode": "stretch"}, {"size": 500}, {"size": 0}, {"align": 0}])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        preprocess(PREPROCESS / "rgba.png", **kwargs)


def test_extreme_aspect_ratio_is_an_image_error():
    with pytest.raises(ImageError, match="aspect ratio"):
        preprocess(Image.new("RGB", (4000, 3)))


def test_truncated_images_fail_even_where_pil_would_fill_them_with_grey(tmp_path, monkeypatch):
    data = (PREPROCESS / "landscape.jpg").read_bytes()
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # as some training code sets it
    with pytest.raises(ImageError, match=r"cut\.jpg.*LOAD_TRUNCATED_IMAGES"):
        load_image(path)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.jpg"
    with pytest.raises(ImageError, match=r"nope\.jpg"):
        load_image(path)


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty\.png.*empty"):
        load_image(path)


def test_text_file(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("not an image at all\n")
    with pytest.raises(ImageError, match=r"notes\.jpg"):
        load_image(path)


def test_truncated_jpeg_fails_at_load_not_later(tmp_path):
    data = (PREPROCESS / "landscape.jpg").read_bytes()
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=r"cut\.jpg"):
        load_image(path)
    with pytest.raises(ImageError, match=r"cut\.jpg"):
        preprocess(path)


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims huge dimensions but carries (almost) no pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    "dims, message",
    # 80 Mpx is below PIL's own warning threshold: our limit must still refuse it.
    [((10_000, 8_000), "exceeds the limit"), ((100_000, 100_000), "decompression bomb")],
)
def test_decompression_bomb_is_refused(tmp_path, dims, message):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header(*dims))
    with pytest.raises(ImageError, match=f"bomb.png.*{message}"):
        load_image(path)


def test_pixel_limit_is_configurable(tmp_path, monkeypatch):
    path = PREPROCESS / "rgba.png"  # 200x100
    with pytest.raises(ImageError, match="exceeds the limit of 10000"):
        load_image(path, max_pixels=10_000)
    monkeypatch.setattr(pp, "MAX_PIXELS", 19_999)
    with pytest.raises(ImageError, match=r"rgba\.png"):
        preprocess(path)
    assert load_image(path, max_pixels=20_000).size == (200, 100)


def test_load_image_returns_decoded_pixels():
    img = load_image(PREPROCESS / "landscape.jpg")
    assert img.size == (640, 480)
    assert np.asarray(img).shape == (480, 640, 3)


@pytest.mark.parametrize("width, height", [(640, 480), (480, 640), (160, 120), (1280, 720), (643, 17)])
@pytest.mark.parametrize("mode", ["crop", "pad"])
@pytest.mark.parametrize("size", [518, 644])
def test_output_size_is_what_preprocess_makes_at_any_size(width, height, mode, size):
    image = Image.new("RGB", (width, height), (10, 200, 30))
    assert tuple(preprocess(image, mode, size).shape[1:]) == output_size(width, height, mode, size)


def test_the_reference_float_rounding_at_644():
    # 480 * (644 / 640) / 14 is 34.5 plus a rounding error in float: the reference rounds it up to 35.
    assert output_size(640, 480, "crop", 644) == (490, 644)
    assert output_size(640, 480, "pad", 644) == (644, 644)
    assert tuple(preprocess(Image.new("RGB", (640, 480)), "crop", 644).shape) == (3, 490, 644)


# --- frames as uint8 to the device (issue 23 item 6) ---------------------------------------------------


@pytest.mark.parametrize("key", sorted(EXPECTED))
def test_pixels_are_uint8_and_scale_to_preprocess_bit_for_bit(key):
    name, mode = key.rsplit(".", 1)
    pixels = pp.preprocess_pixels(PREPROCESS / name, mode=mode)
    assert pixels.dtype == torch.uint8 and torch.equal(pixels, EXPECTED[key].to(torch.uint8))
    out = preprocess(PREPROCESS / name, mode=mode)
    assert torch.equal(pp.as_float(pixels), out)
    assert torch.equal(pp.UNIT_VALUES[pixels.int()], out)  # the device's conversion


def test_every_byte_value_scales_as_the_reference():
    values = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(pp.UNIT_VALUES, values.to(torch.float32) / 255)


def test_a_frame_resized_to_its_alignment_comes_back_float():
    pixels = pp.preprocess_pixels(PREPROCESS / "landscape.jpg", mode="crop", align=28)
    assert pixels.dtype == torch.float32
    assert torch.equal(pixels, preprocess(PREPROCESS / "landscape.jpg", mode="crop", align=28))
