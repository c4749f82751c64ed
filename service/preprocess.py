"""Image decoding and the VGGT reference preprocessing (`crop` and `pad` modes).

Matches the reference `load_and_preprocess_images` bit for bit: RGBA is
composited on white, the uint8 RGB image is resized with PIL bicubic, and the
result is cropped (`crop`) or padded with white (`pad`) before scaling to
[0, 1]. Like the reference, EXIF orientation is ignored (no transpose), so
features match those computed by reference-based training code.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFile, UnidentifiedImageError

from vggt_cache.client.safeopen import open_regular
from vggt_cache.client.text import error_text
from vggt_cache.service.settings import ServiceSettings

PATCH_SIZE = 14
MODES = ("crop", "pad")
# Images above this many pixels are refused before decoding (decompression bombs).
MAX_PIXELS = 64_000_000


# The formats decoded; anything else (PostScript, whose plugin runs Ghostscript, ...) is refused unread.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")
MAX_IMAGE_BYTES = ServiceSettings.max_image_bytes


class ImageError(ValueError):
    """An image that cannot be used; the message names the file."""


def open_image(
    path: str | os.PathLike, max_bytes: int | None = MAX_IMAGE_BYTES, roots: Sequence[str] | None = None
) -> Image.Image:
    """The image at `path`, its header read and its pixels not yet decoded, or `ImageError` naming it.

    The file must be a regular file of at most `max_bytes` (inside `roots`, real paths, when
    given: see `client.safeopen`) in one of IMAGE_FORMATS; it is read into memory whole, once.
    """
    name = os.fspath(path)
    try:
        with open_regular(name, max_bytes, roots) as f:
            data = f.read()
    except OSError as e:
        raise ImageError(f"cannot read image {name}: {e.strerror or e}") from e
    if not data:
        raise ImageError(f"cannot decode image {name}: the file is empty")
    try:
        img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except UnidentifiedImageError:  # its message names the BytesIO object, not the file
        raise ImageError(
            f"cannot decode image {name}: not an image in an accepted format ({', '.join(IMAGE_FORMATS)})"
        ) from None
    except Exception as e:  # PIL raises OSError, SyntaxError, DecompressionBombError, ...
        raise ImageError(f"cannot decode image {name}: {error_text(e)}") from e
    img.filename = name  # what preprocess's errors name
    return img


def image_size(
    path: str | os.PathLike,
    max_bytes: int | None = MAX_IMAGE_BYTES,
    roots: Sequence[str] | None = None,
    dir_fd: int | None = None,
) -> tuple[int, int]:
    """(width, height) from the header alone, under `open_image`'s rules; raises OSError or PIL's errors.

    `dir_fd`: `path` is a name in that (checked) folder, and a symlink there is refused (`open_regular`).
    """
    # Buffered: PIL walks a JPEG's markers a few bytes a read, a system call each on the bare descriptor.
    with (
        io.BufferedReader(
            open_regular(os.fspath(path), max_bytes, roots, follow_symlinks=dir_fd is None, dir_fd=dir_fd)
        ) as f,
        Image.open(f, formats=IMAGE_FORMATS) as img,
    ):
        return img.size


def load_image(
    path: str | os.PathLike,
    max_pixels: int | None = None,
    max_bytes: int | None = MAX_IMAGE_BYTES,
    roots: Sequence[str] | None = None,
) -> Image.Image:
    """Read and fully decode an image file (see `open_image`), or raise `ImageError` naming it."""
    name = os.fspath(path)
    limit = MAX_PIXELS if max_pixels is None else max_pixels
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise ImageError(
            f"cannot decode image {name}: PIL.ImageFile.LOAD_TRUNCATED_IMAGES is on in this process, "
            "so truncated data would decode as grey; turn it off"
        )
    img = open_image(name, max_bytes, roots)
    width, height = img.size
    if width * height > limit:
        raise ImageError(
            f"refusing image {name}: {width}x{height} = {width * height} pixels "
            f"exceeds the limit of {limit} (possible decompression bomb)"
        )
    try:
        # PIL decodes lazily; force it here so truncated data fails now, with the name.
        img.load()
    except Exception as e:
        raise ImageError(f"cannot decode image {name}: {error_text(e)}") from e
    return img


def preprocess(
    image: Image.Image | str | os.PathLike,
    mode: str = "crop",
    size: int = 518,
    align: int = PATCH_SIZE,
) -> torch.Tensor:
    """Return the model input for one image: float32 `[3, H, W]` in [0, 1].

    `align`: when a side is not a multiple of it, the image is resized
    (bilinear) down to the largest multiple; the default 14 changes nothing.
    """
    return as_float(preprocess_pixels(image, mode, size, align))


def preprocess_pixels(
    image: Image.Image | str | os.PathLike,
    mode: str = "crop",
    size: int = 518,
    align: int = PATCH_SIZE,
) -> torch.Tensor:
    """`preprocess`'s result before its scaling to [0, 1]: uint8 `[3, H, W]`, a quarter of the bytes.

    An image that `align` resizes is interpolated in float, so it comes back float32 in [0, 1]
    already. `as_float` (or `UNIT_VALUES` on a device) of the result is `preprocess`'s, bit for bit.
    """
    if mode not in MODES:
        raise ValueError(f"preprocess mode must be one of {MODES}, got {mode!r}")
    if not isinstance(size, int) or size <= 0 or size % PATCH_SIZE:
        raise ValueError(f"size must be a positive multiple of {PATCH_SIZE}, got {size!r}")
    if not isinstance(align, int) or align <= 0:
        raise ValueError(f"align must be a positive integer, got {align!r}")
    if not isinstance(image, Image.Image):
        image = load_image(image)
    filename = getattr(image, "filename", "")  # set on images read from a file
    label = f"image {filename}" if filename else "image"

    rgb = _to_rgb(image)
    width, height = rgb.size
    new_width, new_height = _resized_size(width, height, mode, size)
    if new_width == 0 or new_height == 0:
        raise ImageError(f"{label}: aspect ratio {width}x{height} is too extreme for size {size}")
    rgb = rgb.resize((new_width, new_height), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1)  # [3, H, W] uint8

    if mode == "crop" and new_height > size:
        top = (new_height - size) // 2
        pixels = pixels[:, top : top + size]
    elif mode == "pad":
        pad_h, pad_w = size - new_height, size - new_width
        # Odd differences put the extra pixel at the bottom/right, as the reference does.
        pixels = F.pad(pixels, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=255)
    pixels = pixels.contiguous()
    target = output_size(width, height, mode, size, align)
    if target == tuple(pixels.shape[-2:]):
        return pixels
    return _align(as_float(pixels), target)


def as_float(pixels: torch.Tensor) -> torch.Tensor:
    """`preprocess_pixels`'s result as the model input: uint8 scaled to float32 [0, 1] as the reference does
    (a float result is that already)."""
    return pixels if pixels.is_floating_point() else pixels.to(torch.float32).div(255)


# as_float of each byte value: a device converts uint8 pixels by looking them up here, so its result is
# this CPU division's bit for bit (CUDA divides by a scalar as a multiplication by its reciprocal).
UNIT_VALUES = as_float(torch.arange(256, dtype=torch.uint8))


def output_size(
    width: int, height: int, mode: str = "crop", size: int = 518, align: int = PATCH_SIZE
) -> tuple[int, int]:
    """(H, W) of the model input `preprocess` makes from a `width` x `height` image (no pixels read)."""
    new_width, new_height = _resized_size(width, height, mode, size)
    if mode == "pad":
        new_width = new_height = size
    elif new_height > size:
        new_height = size
    return new_height // align * align, new_width // align * align


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGBA":
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image)
    return image.convert("RGB")


def _resized_size(width: int, height: int, mode: str, size: int) -> tuple[int, int]:
    # Same arithmetic (and Python's round-half-even) as the reference, so sizes agree.
    if mode == "crop" or width >= height:
        return size, round(height * (size / width) / PATCH_SIZE) * PATCH_SIZE
    return round(width * (size / height) / PATCH_SIZE) * PATCH_SIZE, size


def _align(image: torch.Tensor, target: tuple[int, int]) -> torch.Tensor:
    """Resize (bilinear) down to `target` (H, W): sides cut to multiples of the alignment."""
    if target == tuple(image.shape[-2:]):
        return image
    if 0 in target:
        raise ValueError(f"cannot align a {image.shape[-2]}x{image.shape[-1]} image to {target}")
    resized = F.interpolate(
        image[None], size=target, mode="bilinear", align_corners=False, antialias=False
    )  # [1, 3, H', W']
    return resized[0]
