"""Storage kinds (`raw`, `packed`, `fp8`): round trips on every read path, bounded loss, hostile payloads, tools."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
import zstandard

from vggt_cache.client import FeatureCache
from vggt_cache.client.cachefile import Outcome, cache_path, read_entry, source_record, write_entry
from vggt_cache.client.entryformat import PACKED_PLAN_RATIO
from vggt_cache.client.logs import LOGGER
from vggt_cache.client.spec import FeatureSpec
from vggt_cache.client.wire import decode_features
from vggt_cache.service.cli import main
from vggt_cache.service.jobs.plan import ENTRY_OVERHEAD_BYTES
from vggt_cache.service.verify import verify_data_root

from helpers.service import REPO, TINY_MODEL, RunningService, service_spec, wait_job, write_images

ARCH = {"patch_size": 14, "embed_dim": 64, "depth": 4, "num_register_tokens": 4}
GRID = [3, 5]  # 15 patch tokens of 128 channels
SHAPE = (15, 128)


def make_spec(**kw) -> FeatureSpec:
    return FeatureSpec(**{"fingerprint": "sha256:" + "0f" * 32, "architecture": ARCH, **kw})


def activations(dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> torch.Tensor:
    """Activation-like values: a few large channels over a heavy-tailed bulk, as transformer tokens have."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=g) * torch.rand(SHAPE[0], 1, generator=g) * 3
    x[:, :4] *= 40
    return x.to(dtype)


def entry_for(
    tmp_path: Path, storage: str, features: torch.Tensor | None = None, dtype: str = "bfloat16"
) -> tuple[Path, FeatureSpec, torch.Tensor]:
    tmp_path.mkdir(exist_ok=True)
    image = tmp_path / "img.png"
    image.write_bytes(b"pixels")
    spec = make_spec(storage=storage, dtype=dtype)
    features = activations(spec.torch_dtype) if features is None else features
    write_entry(image, features, spec, GRID, source_record(image))
    return image, spec, features


def replace_payload(image: Path, payload: torch.Tensor) -> None:
    """Rewrite an entry with another payload and its metadata untouched (as a buggy or hostile writer would)."""
    path = cache_path(image)
    data = torch.load(path, weights_only=True)
    data["payload"] = payload
    torch.save(data, path)


def packed_payload(frames: list[bytes]) -> torch.Tensor:
    """A packed payload of these zstd frames, one per byte plane, after the header of their lengths."""
    header = b"".join(len(f).to_bytes(8, "little") for f in frames)
    return torch.frombuffer(bytearray(header + b"".join(frames)), dtype=torch.uint8)


def read_paths(image: Path, spec: FeatureSpec) -> dict[str, object]:
    """Every way the client reads one entry, each giving a ReadResult."""
    return {
        f"mmap={m},crc={c}": read_entry(image, spec, mmap=m, check_crc=c) for m in (True, False) for c in (False, True)
    }


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_packed_entries_read_back_bit_exact_on_every_read_path(tmp_path: Path, dtype: str) -> None:
    image, spec, features = entry_for(tmp_path, "packed", dtype=dtype)
    for how, result in read_paths(image, spec).items():
        assert result.outcome is Outcome.HIT, (how, result.reason)
        assert result.features.dtype == spec.torch_dtype and torch.equal(result.features, features), how
    assert read_entry(image, spec, tensor=False).outcome is Outcome.HIT
    assert torch.equal(read_entry(image).features, features)  # no spec given: the file's own


def test_packed_entries_of_activations_are_smaller_than_raw(tmp_path: Path) -> None:
    raw_image, _, features = entry_for(tmp_path / "raw", "raw")
    packed_image, _, _ = entry_for(tmp_path / "packed", "packed", features)
    assert os.path.getsize(cache_path(packed_image)) < 0.9 * os.path.getsize(cache_path(raw_image))


def test_fp8_entries_are_half_the_bytes_with_a_bounded_error(tmp_path: Path) -> None:
    image, spec, features = entry_for(tmp_path, "fp8")
    for how, result in read_paths(image, spec).items():
        assert result.outcome is Outcome.HIT, (how, result.reason)
        x, y = features.float(), result.features.float()
        scale = x.abs().amax(dim=1, keepdim=True) / 448
        # e4m3 keeps 3 mantissa bits (relative error <= 1/16), its subnormals an absolute 2^-10 x scale;
        # the bfloat16 output adds its own rounding (2^-8 relative).
        assert ((y - x).abs() <= x.abs() / 16 + scale / 1024 + y.abs() / 256).all(), how
        assert torch.nn.functional.cosine_similarity(x, y, dim=1).min() > 0.998
    payload = torch.load(cache_path(image), weights_only=True)["payload"]
    assert payload.numel() == features.numel() + 4 * SHAPE[0]  # a byte a value, a float32 scale a token


@pytest.mark.parametrize("storage", ["packed", "fp8"])
def test_a_loader_that_knows_only_raw_misses_instead_of_reading_a_wrong_tensor(tmp_path: Path, storage: str) -> None:
    image, _spec, _ = entry_for(tmp_path, storage)
    with pytest.raises(KeyError):  # the seed's loader: try torch.load(path)["features"], warn on failure
        # The seed's plain call; on torch >= 2.6 its default is weights_only=True, said here explicitly.
        torch.load(cache_path(image), map_location="cpu", weights_only=True)["features"]
    result = read_entry(image, make_spec())  # a raw spec's reader
    assert result.outcome is Outcome.SPEC_MISMATCH and "storage" in result.reason


def test_raw_specs_keep_their_digest_and_storage_kinds_differ() -> None:
    assert "storage" not in make_spec().to_dict()
    digests = {make_spec(storage=s).digest for s in ("raw", "packed", "fp8")}
    assert len(digests) == 3
    with pytest.raises(ValueError, match="storage"):
        make_spec(storage="zip")


def test_a_packed_payload_that_claims_more_than_its_entry_is_corrupt_before_inflating(tmp_path: Path) -> None:
    image, spec, features = entry_for(tmp_path, "packed")
    bomb = zstandard.ZstdCompressor(write_checksum=True).compress(bytes(1 << 24))  # 16 MiB of zeros in 500 bytes
    assert 2 * len(bomb) < features.nbytes  # small enough to pass the payload's size bound
    replace_payload(image, packed_payload([bomb, bomb]))
    for how, result in read_paths(image, spec).items():
        assert result.outcome is Outcome.CORRUPT and f"declares {1 << 24} bytes" in result.reason, how


def test_a_packed_payload_without_a_declared_size_or_checksum_is_corrupt(tmp_path: Path) -> None:
    image, spec, features = entry_for(tmp_path, "packed")
    planes = features.view(-1).view(torch.uint8).view(-1, 2).t().contiguous().numpy()
    good = zstandard.ZstdCompressor(write_checksum=True)
    replace_payload(image, packed_payload([good.compress(plane.tobytes()) for plane in planes]))
    assert read_entry(image, spec).outcome is Outcome.HIT  # the layout the test builds is the writer's
    for compressor in (
        zstandard.ZstdCompressor(write_checksum=True, write_content_size=False),
        zstandard.ZstdCompressor(write_checksum=False),
    ):
        replace_payload(image, packed_payload([compressor.compress(plane.tobytes()) for plane in planes]))
        assert read_entry(image, spec).outcome is Outcome.CORRUPT


def test_truncated_flipped_or_padded_packed_payloads_are_corrupt_without_a_crc_check(tmp_path: Path) -> None:
    image, spec, _ = entry_for(tmp_path, "packed")
    good = torch.load(cache_path(image), weights_only=True)["payload"]
    flipped = good.clone()
    flipped[len(flipped) // 2] ^= 0x10
    padded = torch.cat([good, torch.zeros(3, dtype=torch.uint8)])
    for bad in (good[:-7].clone(), flipped, torch.cat([good, good]), padded):
        replace_payload(image, bad)
        result = read_entry(image, spec, check_crc=False)
        assert result.outcome is Outcome.CORRUPT and "payload" in result.reason


def test_fp8_payloads_of_another_length_or_with_nan_codes_or_bad_scales_are_corrupt(tmp_path: Path) -> None:
    image, spec, _ = entry_for(tmp_path, "fp8")
    good = torch.load(cache_path(image), weights_only=True)["payload"]
    nan_code, zero_scale = good.clone(), good.clone()
    nan_code[-1] = 0x7F
    zero_scale[:4] = 0
    for bad in (good[:-1].clone(), torch.cat([good, good[:1]]), nan_code, zero_scale):
        replace_payload(image, bad)
        for how, result in read_paths(image, spec).items():
            assert result.outcome is Outcome.CORRUPT, how
    replace_payload(image, good[:-1].clone())
    assert read_entry(image, spec, tensor=False).outcome is Outcome.CORRUPT  # the length alone tells


@pytest.mark.parametrize("storage", ["raw", "packed", "fp8"])
def test_a_truncated_file_of_each_storage_is_corrupt(tmp_path: Path, storage: str) -> None:
    image, spec, _ = entry_for(tmp_path, storage)
    path = cache_path(image)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    for how, result in read_paths(image, spec).items():
        assert result.outcome is Outcome.CORRUPT, how


@pytest.mark.parametrize("storage", ["packed", "fp8"])
def test_a_payload_and_features_together_are_corrupt(tmp_path: Path, storage: str) -> None:
    image, spec, features = entry_for(tmp_path, storage)
    path = cache_path(image)
    data = torch.load(path, weights_only=True)
    data["features"] = features  # a raw reader would take this tensor, ours the payload: neither may
    torch.save(data, path)
    assert read_entry(image, spec).outcome is Outcome.CORRUPT


@pytest.mark.parametrize("storage", ["packed", "fp8"])
def test_the_service_writes_each_storage_and_every_reader_reads_it_back(
    service_server, tmp_path: Path, storage: str
) -> None:
    root = tmp_path / "root"
    first, second = write_images(root, ["a.png", "b.png"])
    server: RunningService = service_server(root, "--storage", storage)
    with FeatureCache(server.url) as cache:
        answered = cache.get(first)  # a miss: the service computes, writes and answers
        assert cache.spec.storage == storage
        assert torch.equal(cache.get(first), answered)  # now read from the file: what the service answered
        assert cache.stats["hits"] == 1
    assert "payload" in torch.load(cache_path(first), weights_only=True)
    with httpx.Client(base_url=server.url, timeout=60) as http:
        spec = service_spec(http)
        job_id = http.post("/precompute", json={"data_root": str(root), "verify": True}).raise_for_status().json()
        view = wait_job(http, job_id["job_id"])
        assert (view["state"], view["computed"], view["skipped"], view["failed"]) == ("finished", 1, 1, 0)
        items, tensors = decode_features(http.post("/features", json={"images": [second]}).raise_for_status().content)
    assert items[0]["status"] == "cached"
    assert torch.equal(tensors[items[0]["tensor"]], read_entry(second, spec).features)  # the service read it
    report = verify_data_root(str(root), spec)  # `vggt-cache verify`, CRC checked
    assert report["counts"]["hit"] == 2 and report["ok"], report


def vggt_cache(*args: str) -> tuple[int, str]:
    """`vggt-cache ARGS` in this process (the commands the fixture's subprocess does not need): (exit code, stdout).

    The CLI sets up our logger for a terminal; it is put back after, for the tests that capture logs.
    """
    log = logging.getLogger(LOGGER)
    saved = (log.handlers[:], log.propagate, log.level)
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            code = main(list(args))
    finally:
        log.handlers[:], log.propagate, log.level = saved[0], saved[1], saved[2]
    return code, out.getvalue()


@pytest.fixture(scope="module")
def raw_root(tmp_path_factory) -> Path:
    """A data root of three images with raw entries from an in-process precompute (copy it before changing it)."""
    root = tmp_path_factory.mktemp("raw") / "root"
    write_images(root, ["a.png", "b.png", "c.png"])
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "vggt_cache.service.cli",
            "precompute",
            "--data_root",
            str(root),
            "--vggt_model_path",
            str(TINY_MODEL),
            "--size",
            "56",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return root


def copy_root(root: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "root"
    shutil.copytree(root, copy)  # copy2 keeps mtime_ns: the entries stay valid
    return copy


def test_convert_rewrites_valid_raw_entries_as_packed_without_recomputing_and_counts_the_bytes_saved(
    raw_root: Path, tmp_path: Path
) -> None:
    root = copy_root(raw_root, tmp_path)
    images = sorted(str(p) for p in root.glob("*.png"))
    before = {image: read_entry(image).features for image in images}
    stale = write_images(root, ["d.png"], seed=5)[0]
    shutil.copy(cache_path(images[0]), cache_path(stale))  # another image's entry: not valid for d.png
    sizes = sum(os.path.getsize(cache_path(image)) for image in images)

    code, out = vggt_cache("convert", str(root), "--storage", "packed", "--json")
    assert code == 0, out
    report = json.loads(out)
    assert (report["converted"], report["invalid"], report["failed"]) == (3, 1, 0)
    after = sum(os.path.getsize(cache_path(image)) for image in images)
    assert (report["bytes_before"], report["bytes_after"], report["bytes_saved"]) == (sizes, after, sizes - after)
    for image in images:
        result = read_entry(image, check_crc=True)
        assert result.meta["spec"]["storage"] == "packed" and torch.equal(result.features, before[image])
    checked = json.loads(vggt_cache("verify", str(root), "--json")[1])  # the manifest names packed now
    assert checked["counts"]["hit"] == 3 and [p["image"] for p in checked["problems"]] == [stale]
    again = json.loads(vggt_cache("convert", str(root), "--json")[1])
    assert (again["converted"], again["already"]) == (0, 3)


def test_estimate_storage_prices_every_storage_and_its_packed_bytes_match_a_conversion(
    raw_root: Path, tmp_path: Path
) -> None:
    root = copy_root(raw_root, tmp_path)
    code, out = vggt_cache("verify", str(root), "--estimate-storage", "--json")
    assert code == 0, out
    report = json.loads(out)
    rows = report["storages"]
    assert (report["entries"], report["sampled"]) == (3, 3)
    assert rows["raw"]["bytes"] == report["bytes_now"] and rows["raw"]["ratio"] == 1.0
    assert rows["fp8"]["bytes"] < rows["packed"]["bytes"] < rows["raw"]["bytes"]
    assert rows["fp8"]["error"]["min_cosine"] > 0.99 and 0 < rows["fp8"]["error"]["max_rel"] < 0.07
    assert vggt_cache("convert", str(root))[0] == 0
    actual = sum(os.path.getsize(p) for p in root.glob("*.vggt_cache.pt"))
    assert abs(rows["packed"]["bytes"] - actual) <= 0.02 * actual  # only the metadata's few bytes differ


def test_what_the_walk_cannot_read_is_reported_by_convert_and_the_estimate(raw_root: Path, tmp_path: Path) -> None:
    root = copy_root(raw_root, tmp_path)
    os.symlink("loop", root / "loop")  # a symlink to itself: its kind cannot be told, as a folder one cannot list

    estimate = json.loads(vggt_cache("verify", str(root), "--estimate-storage", "--json")[1])
    code, out = vggt_cache("convert", str(root), "--storage", "packed")

    assert estimate["entries"] == 3 and estimate["unlisted"] == 1
    assert estimate["unlisted_paths"][0]["path"] == str(root / "loop")
    assert code == 1 and "3 entries converted" in out and "1 folders or files could not be read" in out
    assert f"unlisted {root / 'loop'}: cannot tell what this is" in out


def test_a_dry_run_counts_the_bytes_of_the_chosen_storage(tmp_path: Path) -> None:
    folder = tmp_path / "new"
    write_images(folder, ["a.png", "b.png"])
    written = {}
    for storage in ("raw", "packed", "fp8"):
        code, out = vggt_cache(
            "precompute",
            "--data_root",
            str(folder),
            "--vggt_model_path",
            str(TINY_MODEL),
            "--size",
            "56",
            "--dry-run",
            "--storage",
            storage,
        )
        assert code == 0, out
        written[storage] = int(re.search(r"to write\s+([\d,]+) bytes", out).group(1).replace(",", ""))
    tokens, values = 16, 16 * 128  # a 56x56 image: 4x4 patches of 2 x 64 channels
    per_entry = {"raw": 2 * values, "packed": math.ceil(2 * values / PACKED_PLAN_RATIO), "fp8": values + 4 * tokens}
    assert written == {storage: 2 * (n + ENTRY_OVERHEAD_BYTES) for storage, n in per_entry.items()}
