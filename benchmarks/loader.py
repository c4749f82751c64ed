"""Cache-hit read throughput: the client's hit path vs the seed's `torch.load` vs a raw read of the same bytes.

    python benchmarks/loader.py [--n 200] [--dir DIR] [--rounds 5] [--threads 1]

Writes N realistic entries (bf16 patch tokens of VGGT-1B layer -2: [1036, 2048]
for a 518x392 crop and [1369, 2048] for 518x518, alternating) next to small
dummy images, warms the page cache, then times, on the same files, each way
followed by the same consumer touch (`.float().sum()`, as a model's first use
of the features reads every element):

  ours      FeatureCache(spec=...).get(image), as a training dataloader calls it without a
            service: every check of the entry, a stat of the image, the tensor read
            straight into its own buffer; also read_entry(image, spec, mmap=True), and
            read_entry(..., check_crc=True) (the tensor's CRC-32, as the service checks it)
  seed      torch.load(path, map_location="cpu")["features"]  (the seed's call; weights_only=True by default)
  raw       the file's bytes read into a preallocated buffer, torch.frombuffer of the tensor's
            bytes (the physical limit: one copy from the page cache, no checks)

Methods alternate every few files; ratios are medians over rounds.
Goals: ours/raw >= 0.8, ours/seed >= 1.0.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from client.cache import FeatureCache  # noqa: E402
from client.cachefile import cache_path, read_entry, source_record, write_entry  # noqa: E402
from client.spec import FeatureSpec  # noqa: E402

VGGT_1B = {"img_size": 518, "patch_size": 14, "embed_dim": 1024, "depth": 24,
           "num_heads": 16, "num_register_tokens": 4}
GRIDS = ([28, 37], [37, 37])  # 518x392 crop, 518x518
CHANNELS = 2 * VGGT_1B["embed_dim"]
CHUNK = 10


def make_files(folder: Path, n: int, spec: FeatureSpec) -> list[tuple[str, int]]:
    """N images with cache entries; returns (image path, number of feature elements)."""
    entries = []
    for i in range(n):
        grid = GRIDS[i % 2]
        image = folder / f"frame_{i:05d}.jpg"
        Image.new("RGB", (32, 24), (i % 256, 80, 160)).save(image)
        features = torch.randn(grid[0] * grid[1], CHANNELS).to(torch.bfloat16)
        write_entry(image, features, spec, grid, source_record(image))
        entries.append((str(image), features.numel()))
    return entries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="number of cache files")
    parser.add_argument("--dir", help="folder for the files (default: a temporary one, removed)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (DataLoader workers run with 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    folder = Path(args.dir or tempfile.mkdtemp(prefix="vggt-loader-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    spec = FeatureSpec(fingerprint="sha256:" + "5a" * 32, architecture=VGGT_1B)
    try:
        t0 = time.perf_counter()
        entries = make_files(folder, args.n, spec)
        print(f"wrote {args.n} entries in {time.perf_counter() - t0:.1f}s to {folder}")
        run(entries, spec, args.rounds)
    finally:
        if args.dir is None:
            shutil.rmtree(folder, ignore_errors=True)


def run(entries: list[tuple[str, int]], spec: FeatureSpec, rounds: int) -> None:
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

    def ours_crc(image: str, path: str, numel: int) -> None:
        result = read_entry(image, spec, mmap=False, check_crc=True)
        if not result.hit:
            raise RuntimeError(f"{image}: {result.outcome.value}: {result.reason}")
        touch(result.features)

    def raw(image: str, path: str, numel: int) -> None:
        with open(path, "rb", buffering=0) as f:
            size = f.readinto(raw_buffer.numpy())
        touch(raw_buffer[: min(2 * numel, size) // 2 * 2].view(torch.bfloat16))

    def seed(image: str, path: str, numel: int) -> None:
        touch(torch.load(path, map_location="cpu")["features"])  # the seed's call: weights_only by default

    methods: dict[str, Callable[[str, str, int], None]] = {
        "ours": ours, "ours (mmap=True)": ours_mmap, "ours (check_crc)": ours_crc, "raw": raw, "seed": seed,
    }
    for fn in methods.values():  # warm the page cache and every code path
        for (image, numel), path in zip(entries, paths):
            fn(image, path, numel)

    # Methods alternate every CHUNK files, so a burst of load from other processes
    # hits all of them alike; ratios are taken per round, then the median.
    seconds: dict[str, list[float]] = {name: [0.0] * rounds for name in methods}
    items = list(zip(entries, paths))
    for r in range(rounds):
        for start in range(0, len(items), CHUNK):
            chunk = items[start : start + CHUNK]
            for name, fn in methods.items():
                t0 = time.perf_counter()
                for (image, numel), path in chunk:
                    fn(image, path, numel)
                seconds[name][r] += time.perf_counter() - t0
                touched.clear()

    n = len(entries)
    mb = file_bytes / n / 1e6
    print(f"{n} files, {mb:.2f} MB each on average, {rounds} rounds, "
          f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    print(f"{'method':<20}{'best files/s':>14}{'MB/s':>8}{'median files/s':>16}")
    for name, times in seconds.items():
        best = n / min(times)
        print(f"{name:<20}{best:>14.0f}{best * mb:>8.0f}{n / statistics.median(times):>16.0f}")
    for ours_name in ("ours", "ours (mmap=True)"):
        for other, goal in (("raw", 0.8), ("seed", 1.0)):
            ratios = [o / t for o, t in zip(seconds[other], seconds[ours_name])]
            print(f"{ours_name}/{other:<5}= {statistics.median(ratios):.2f} median of rounds "
                  f"(min {min(ratios):.2f}, max {max(ratios):.2f}; goal >= {goal})")
    cost = [c / o - 1 for c, o in zip(seconds["ours (check_crc)"], seconds["ours"])]
    print(f"check_crc costs {100 * statistics.median(cost):.0f}% more time per hit, median of rounds "
          f"(min {100 * min(cost):.0f}%, max {100 * max(cost):.0f}%; FeatureCache checks it only under 15%)")


if __name__ == "__main__":
    main()
