"""Cache-hit read throughput: the client's hit path vs the seed's `torch.load` vs a raw read of the same bytes.

    python benchmarks/loader.py [--n 200] [--dir DIR] [--rounds 5] [--threads 1] [--allocator both]

Writes N realistic entries (bf16 patch tokens of VGGT-1B layer -2: [1036, 2048]
for a 518x392 crop and [1369, 2048] for 518x518, alternating) next to small
dummy images, warms the page cache, then times, on the same files, each way
followed by the same consumer touch (`.float().sum()`, as a model's first use
of the features reads every element):

  ours      FeatureCache(spec=...).get(image), as a training dataloader calls it without a
            service: every check of the entry, a stat of the image, the tensor read
            straight into its own buffer; also read_entry(image, spec, mmap=True), and
            read_entry(..., check_crc=True) (the tensor's CRC-32, as the service checks it)
            against the same read_entry without it
  seed      torch.load(path, map_location="cpu")["features"]  (the seed's call; weights_only=True by default)
  raw       the file's bytes read into a preallocated buffer, torch.frombuffer of the tensor's
            bytes (the physical limit: one copy from the page cache, no checks)
  packed    read_entry(image, spec) of the same features stored `packed` (byte planes + zstd,
            lossless), and `fp8` (float8 e4m3, a scale per token), each in files of its own
            (bytes on disk per entry printed for each storage)

Methods alternate every few files, in a shuffled order; ratios are medians over those chunks.
Goals: ours/raw >= 0.8, ours/seed >= 1.0.

Under glibc's default policy, the allocator hands freed multi-MB buffers back to the
system and page-faults fresh ones in, at a cost (here up to half of a hit's time) that
depends on what the previous calls allocated, not on the reader. So every method runs
twice, under `default` and under `keep` (freed memory kept for reuse: mallopt
M_MMAP_THRESHOLD 32 MiB and M_TRIM_THRESHOLD 256 MiB, as the environment variables
MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=268435456 would set them);
`--allocator` picks one.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vggt_cache.client.cache import FeatureCache
from vggt_cache.client.cachefile import cache_path, read_entry, source_record, write_entry
from vggt_cache.client.spec import STORAGES, FeatureSpec

VGGT_1B = {"img_size": 518, "patch_size": 14, "embed_dim": 1024, "depth": 24, "num_heads": 16, "num_register_tokens": 4}
GRIDS = ([28, 37], [37, 37])  # 518x392 crop, 518x518
CHANNELS = 2 * VGGT_1B["embed_dim"]
CHUNK = 10
# glibc's mallopt parameters, and the values the `keep` policy sets.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
KEEP = {M_MMAP_THRESHOLD: 32 << 20, M_TRIM_THRESHOLD: 256 << 20}


def keep_freed_memory() -> bool:
    """Tell glibc to keep freed buffers for reuse; False where this is not glibc."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    return mallopt is not None and all(mallopt(param, value) == 1 for param, value in KEEP.items())


def stored_as(image: str, storage: str) -> str:
    """The image whose entry holds `image`'s features in another storage (a folder per storage)."""
    return image if storage == "raw" else os.path.join(os.path.dirname(image), storage, os.path.basename(image))


def make_files(folder: Path, n: int, specs: dict[str, FeatureSpec]) -> list[tuple[str, int]]:
    """N images with cache entries in every storage; returns (raw entry's image path, number of feature elements)."""
    entries = []
    for i in range(n):
        grid = GRIDS[i % 2]
        features = torch.randn(grid[0] * grid[1], CHANNELS).to(torch.bfloat16)
        for storage, spec in specs.items():
            image = Path(stored_as(str(folder / f"frame_{i:05d}.jpg"), storage))
            image.parent.mkdir(exist_ok=True)
            Image.new("RGB", (32, 24), (i % 256, 80, 160)).save(image)
            write_entry(image, features, spec, grid, source_record(image))
        entries.append((str(folder / f"frame_{i:05d}.jpg"), features.numel()))
    return entries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="number of cache files")
    parser.add_argument("--dir", help="folder for the files (default: a temporary one, removed)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (DataLoader workers run with 1)")
    parser.add_argument(
        "--allocator",
        choices=["both", "default", "keep"],
        default="both",
        help="glibc's default policy, freed memory kept (see above), or one after the other",
    )
    args = parser.parse_args()
    if args.rounds * -(-args.n // CHUNK) < 2:
        parser.error(f"need two chunks of files at least: --n above {CHUNK} or --rounds 2")
    torch.set_num_threads(args.threads)

    folder = Path(args.dir or tempfile.mkdtemp(prefix="vggt-loader-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    specs = {
        storage: FeatureSpec(fingerprint="sha256:" + "5a" * 32, architecture=VGGT_1B, storage=storage)
        for storage in STORAGES
    }
    try:
        t0 = time.perf_counter()
        entries = make_files(folder, args.n, specs)
        print(f"wrote {args.n} entries in {time.perf_counter() - t0:.1f}s to {folder}")
        if args.allocator in ("both", "default"):
            print("\n== allocator: default")
            run(entries, specs, args.rounds)
        if args.allocator in ("both", "keep"):
            # Set once: the default policy cannot be restored afterwards, so it runs first.
            if keep_freed_memory():
                print("\n== allocator: keep (freed memory kept for reuse)")
                run(entries, specs, args.rounds)
            else:
                print("\n== allocator: keep is not available here (not glibc)")
    finally:
        if args.dir is None:
            shutil.rmtree(folder, ignore_errors=True)


def run(entries: list[tuple[str, int]], specs: dict[str, FeatureSpec], rounds: int) -> None:
    spec = specs["raw"]
    paths = [cache_path(image) for image, _ in entries]
    file_bytes = sum(os.path.getsize(p) for p in paths)
    largest = max(os.path.getsize(p) for p in paths)
    raw_buffer = torch.empty(largest, dtype=torch.uint8)  # as aligned as a tensor's own storage
    cache = FeatureCache(spec=spec)
    touched = []  # keeps each sum, so the touch cannot be skipped

    def touch(features: torch.Tensor) -> None:
        touched.append(features.float().sum())

    def ours(image: str, path: str, numel: int) -> None:
        features = cache.get(image)
        if features is None:
            raise RuntimeError(f"{image}: not a hit ({cache.stats})")
        touch(features)

    def ours_mmap(image: str, path: str, numel: int) -> None:
        result = read_entry(image, spec, mmap=True)
        if not result.hit:
            raise RuntimeError(f"{image}: {result.outcome.value}: {result.reason}")
        touch(result.features)

    def ours_read_entry(image: str, path: str, numel: int) -> None:
        result = read_entry(image, spec, mmap=False)
        if not result.hit:
            raise RuntimeError(f"{image}: {result.outcome.value}: {result.reason}")
        touch(result.features)

    def ours_crc(image: str, path: str, numel: int) -> None:
        result = read_entry(image, spec, mmap=False, check_crc=True)
        if not result.hit:
            raise RuntimeError(f"{image}: {result.outcome.value}: {result.reason}")
        touch(result.features)

    def stored(storage: str) -> Callable[[str, str, int], None]:
        def read(image: str, path: str, numel: int) -> None:
            result = read_entry(stored_as(image, storage), specs[storage], mmap=False)
            if not result.hit:
                raise RuntimeError(f"{image}: {result.outcome.value}: {result.reason}")
            touch(result.features)

        return read

    def raw(image: str, path: str, numel: int) -> None:
        with open(path, "rb", buffering=0) as f:
            size = f.readinto(raw_buffer.numpy())
        touch(raw_buffer[: min(2 * numel, size) // 2 * 2].view(torch.bfloat16))

    def seed(image: str, path: str, numel: int) -> None:
        touch(torch.load(path, map_location="cpu")["features"])  # the seed's call: weights_only by default

    methods: dict[str, Callable[[str, str, int], None]] = {
        "ours": ours,
        "ours (mmap=True)": ours_mmap,
        "read_entry": ours_read_entry,
        "read_entry (check_crc)": ours_crc,
        "raw": raw,
        "seed": seed,
        "packed (read_entry)": stored("packed"),
        "fp8 (read_entry)": stored("fp8"),
    }
    for fn in methods.values():  # warm the page cache and every code path
        for (image, numel), path in zip(entries, paths, strict=True):
            fn(image, path, numel)

    # Methods alternate every CHUNK files in a shuffled order (each follows every other, after
    # whatever it freed), so a burst of load from other processes, or the allocator's state,
    # hits all of them alike. Each ratio compares two methods on the same chunk of files, read
    # back to back; the figure is the median over every chunk of every round.
    seconds: dict[str, list[float]] = {name: [] for name in methods}
    items = list(zip(entries, paths, strict=True))
    order = list(methods.items())
    shuffle = random.Random(0).shuffle
    for _ in range(rounds):
        for start in range(0, len(items), CHUNK):
            chunk = items[start : start + CHUNK]
            shuffle(order)
            for name, fn in order:
                t0 = time.perf_counter()
                for (image, numel), path in chunk:
                    fn(image, path, numel)
                seconds[name].append(time.perf_counter() - t0)
                touched.clear()

    n = len(entries)
    mb = file_bytes / n / 1e6
    print(
        f"{n} files, {mb:.2f} MB each on average, {rounds} rounds, "
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)"
    )
    print(f"{'method':<24}{'files/s':>9}{'MB/s':>8}  (MB/s of the raw entries' bytes, as features delivered)")
    for name, times in seconds.items():
        rate = n * rounds / sum(times)
        print(f"{name:<24}{rate:>9.0f}{rate * mb:>8.0f}")

    def ratios(slow: str, fast: str) -> str:
        """Median (and quartiles) over chunks of slow's time / fast's time."""
        q1, median, q3 = statistics.quantiles([a / b for a, b in zip(seconds[slow], seconds[fast], strict=True)], n=4)
        return f"{median:.2f} median of {len(seconds[slow])} chunks (quartiles {q1:.2f}-{q3:.2f}"

    for ours_name in ("ours", "ours (mmap=True)"):
        for other, goal in (("raw", 0.8), ("seed", 1.0)):
            print(f"{ours_name}/{other:<5}= {ratios(other, ours_name)}; goal >= {goal})")
    cost = ratios("read_entry (check_crc)", "read_entry")
    print(f"check_crc: {cost}) the time of a read without it; FeatureCache would check it only under 1.15")
    for storage in ("packed", "fp8"):
        on_disk = sum(os.path.getsize(cache_path(stored_as(image, storage))) for image, _ in entries) / n
        print(
            f"{storage}: {on_disk / 1e6:.2f} MB an entry ({mb / (on_disk / 1e6):.2f}x smaller than raw); hits at "
            f"{ratios('read_entry', f'{storage} (read_entry)')}) of raw's read_entry rate, "
            f"{ratios('raw', f'{storage} (read_entry)')}) of the raw-read limit; "
            f"{statistics.median(seconds[f'{storage} (read_entry)']) / CHUNK * 1e3:.1f} ms a sample"
        )


if __name__ == "__main__":
    main()
