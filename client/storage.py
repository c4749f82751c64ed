"""How an entry's features lie on disk: `raw` (the tensor itself), `packed` (lossless), `fp8` (lossy).

`raw` keeps the seed's `torch.load(path)["features"]`. The other kinds store a flat uint8
`payload` instead of `features`, so a reader that only knows `raw` finds no `"features"` and
misses, never reads a wrong tensor:

- `packed`: the tensor's bytes split into byte planes (plane i holds byte i of every value),
  each one zstd frame with its content size and checksum, after a header of the frames'
  lengths (uint64 each). The high plane of bfloat16 activations (sign and exponent) compresses
  about 2.8x, the low one not at all: a frame per plane keeps them apart (1.46x for the whole
  entry on the JanusVLN fixture's activations, 1.37x as one frame). Bit-exact for every dtype.
- `fp8`: per token (the last dimension is the channels) a float32 scale, then every value
  divided by it as float8 e4m3: one byte a value, decoded to the spec's dtype.

Decoding knows the decoded size from the spec and grid before it inflates a byte: a payload
that claims or yields any other size, or fails its checksum, raises `BadPayload`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import zstandard

_ZSTD_LEVEL = 3  # ~the ratio of level 19 on activations (the low plane is noise), at a fraction of the time
_FP8 = torch.float8_e4m3fn
_FP8_MAX = torch.finfo(_FP8).max  # 448
_SCALE_BYTES = 4  # float32
_LENGTH_BYTES = 8  # a packed payload's header: each plane's frame length, uint64
_FP8_VALUES = torch.arange(256, dtype=torch.uint8).view(_FP8).float().numpy()  # code -> value


class BadPayload(ValueError):
    """A payload that does not decode to the entry its metadata describes."""


def encode(features: torch.Tensor, storage: str) -> torch.Tensor:
    """The flat uint8 payload of `features` (contiguous, CPU, in the spec's dtype) for a non-raw storage."""
    if storage == "packed":
        compressor = zstandard.ZstdCompressor(level=_ZSTD_LEVEL, write_checksum=True)
        frames = [compressor.compress(plane) for plane in _planes(features)]
        lengths = np.array([len(f) for f in frames], dtype="<u8").tobytes()
        return _bytes_tensor(b"".join([lengths, *frames]))
    if storage == "fp8":
        scales, codes = _quantise(features)
        return torch.cat([scales.view(torch.uint8), codes.view(-1).view(torch.uint8)])
    raise ValueError(f"storage {storage!r} has no payload")


def decode(payload: torch.Tensor, storage: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The features a payload holds; BadPayload unless it decodes to exactly `shape` x `dtype`."""
    check_payload_size(payload, storage, shape, dtype)
    if storage == "packed":
        return _unpack(payload, shape, dtype)
    return _dequantise(payload, shape, dtype)


def check_payload_size(payload: torch.Tensor, storage: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """BadPayload unless `payload` is flat uint8 of a length an entry of `shape` x `dtype` may have."""
    if payload.dtype != torch.uint8 or payload.dim() != 1:
        raise BadPayload(f"payload must be flat uint8, got {payload.dtype} {list(payload.shape)}")
    if storage not in ("packed", "fp8"):
        raise BadPayload(f"storage {storage!r} has no payload")
    limit = max_payload_bytes(storage, shape, dtype)
    if len(payload) > limit or (storage == "fp8" and len(payload) != limit):  # fp8's length is exact
        raise BadPayload(f"payload of {len(payload)} bytes does not fit a {storage} entry of {list(shape)}")


def as_stored(features: torch.Tensor, storage: str) -> torch.Tensor:
    """What a reader will get back for `features` (on any device): themselves, except for the lossy `fp8`.

    The same float32 products as `decode`, so bit for bit what a read of the entry gives.
    """
    if storage != "fp8":
        return features
    scales, codes = _quantise(features)
    return (codes.float() * scales[:, None]).to(features.dtype).view(features.shape)


def max_payload_bytes(storage: str, shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """The largest payload an entry of `shape` x `dtype` may have (zstd's bound for incompressible bytes)."""
    nbytes = math.prod(shape) * dtype.itemsize
    if storage == "fp8":
        return _fp8_bytes(shape)
    return nbytes + (nbytes >> 7) + dtype.itemsize * ((1 << 10) + _LENGTH_BYTES)


def stored_nbytes(storage: str, shape: tuple[int, ...], dtype: torch.dtype, packed_ratio: float) -> int:
    """The bytes an entry's tensor or payload takes: exact for raw and fp8, `nbytes / packed_ratio` for packed."""
    nbytes = math.prod(shape) * dtype.itemsize
    if storage == "fp8":
        return _fp8_bytes(shape)
    if storage == "packed":
        return math.ceil(nbytes / packed_ratio)
    return nbytes


def _fp8_bytes(shape: tuple[int, ...]) -> int:
    numel = math.prod(shape)
    return numel + _SCALE_BYTES * (numel // shape[-1] if shape and shape[-1] else 0)


def _bytes_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)


def _planes(features: torch.Tensor) -> np.ndarray:
    """[itemsize, numel] uint8: plane i holds byte i of every value."""
    values = features.reshape(-1).view(torch.uint8).view(-1, features.dtype.itemsize).numpy()
    planes = np.empty(values.shape[::-1], dtype=np.uint8)
    for i, plane in enumerate(planes):  # a column at a time: several times faster than one transposing copy
        plane[:] = values[:, i]
    return planes


def _unpack(payload: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    width, numel = dtype.itemsize, math.prod(shape)
    data = payload.numpy()
    header = width * _LENGTH_BYTES
    lengths = np.frombuffer(data[:header], dtype="<u8") if len(data) >= header else np.zeros(0)
    if len(lengths) != width or int(lengths.sum()) + header != len(data):
        raise BadPayload(f"the frame lengths {lengths.tolist()} do not add up to the payload's {len(data)} bytes")
    out = torch.empty(shape, dtype=dtype)
    values = out.view(-1).view(torch.uint8).view(numel, width).numpy()
    offset = header
    for i, length in enumerate(lengths.tolist()):
        values[:, i] = np.frombuffer(_inflate(data[offset : offset + length], numel), dtype=np.uint8)
        offset += length
    return out


def _inflate(frame: np.ndarray, size: int) -> bytes:
    """One zstd frame that must declare and hold exactly `size` bytes, with its checksum."""
    try:
        params = zstandard.get_frame_parameters(frame.data)
        if params.content_size != size or not params.has_checksum:
            raise BadPayload(
                f"zstd frame declares {params.content_size} bytes (checksum: {params.has_checksum}), "
                f"the plane holds {size}"
            )
        # max_output_size bounds what is inflated whatever the frame says; data after the frame is refused.
        raw = zstandard.ZstdDecompressor().decompress(frame.data, max_output_size=size, allow_extra_data=False)
    except zstandard.ZstdError as e:
        raise BadPayload(f"zstd: {e}") from None
    if len(raw) != size:
        raise BadPayload(f"a plane decodes to {len(raw)} bytes, not {size}")
    return raw


def _quantise(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 scale per token, e4m3 codes): each token's largest magnitude maps to e4m3's largest value."""
    rows = features.reshape(-1, features.shape[-1]).float()
    if not torch.isfinite(rows).all():
        raise ValueError("fp8 storage needs finite features")
    amax = rows.abs().amax(dim=1)
    scales = torch.where(amax > 0, amax / _FP8_MAX, torch.ones_like(amax))
    codes = (rows / scales[:, None]).clamp(-_FP8_MAX, _FP8_MAX).to(_FP8)
    return scales, codes


def _dequantise(payload: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    tokens = math.prod(shape) // shape[-1]
    split = tokens * _SCALE_BYTES
    scales = payload[:split].clone().view(torch.float32)
    if not (torch.isfinite(scales).all() and (scales > 0).all()):
        raise BadPayload("fp8 scales must be finite and positive")
    codes = payload[split:].numpy()
    if np.count_nonzero((codes & 0x7F) == 0x7F):  # e4m3fn's NaN codes: the encoder never writes them
        raise BadPayload("fp8 payload holds NaN codes")
    values = _FP8_VALUES.take(codes).reshape(tokens, shape[-1])  # a table look-up: faster than torch's cast
    values *= scales.numpy()[:, None]
    return torch.from_numpy(values).to(dtype).view(shape)
