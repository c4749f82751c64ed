"""Peak memory and time of one JanusVLN clip's forward: block-causal attention chunked vs the dense mask.

    python benchmarks/causal_memory.py [--device cpu|cuda] [--embed-dim 1024 --depth 24 --num-heads 16] [--json]

One clip of 9 frames at the newjanusvln preset's 644x644 (2,121 tokens a frame, 19,089 a clip)
through `entry_features`, once per implementation, each in a fresh process so that one's peak
cannot hide the other's: on the CPU the growth of the peak resident set over its level once the
model and the input exist, on CUDA `max_memory_allocated` over the level before the forward.
Without --model the weights are random (the values do not change memory or time); the default
model is VGGT-1B's width and heads at depth 2 on the CPU (the 24-block model on CUDA), since
peak memory is one block's worth of activations plus what attention adds, whatever the depth.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import device_name, get_model, synchronize  # noqa: E402

from client.spec import PRESETS, preset_options  # noqa: E402
from service.model.features import entry_features, model_spec  # noqa: E402
from service.samples import DEFAULT_MAX_HISTORY  # noqa: E402

PRESET = "newjanusvln"
IMPLS = ("mask", "chunked")  # the reference first


def measure(args: argparse.Namespace) -> dict:
    """In this process: one forward with `args.impl`; peak memory above the level before it."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    config = {"embed_dim": args.embed_dim, "depth": args.depth, "num_heads": args.num_heads,
              "patch_embed": {"embed_dim": args.embed_dim, "depth": args.depth, "num_heads": args.num_heads}}
    loaded = get_model(args.model, config, str(device))
    loaded.model.causal_impl = args.impl
    spec = model_spec(loaded, **preset_options(PRESET))
    x = torch.rand(1, DEFAULT_MAX_HISTORY + 1, 3, spec.size, spec.size, device=device)  # [1, 9, 3, 644, 644]
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    with torch.inference_mode():
        entry_features(loaded.model, x, spec)
    synchronize(device)
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    cfg = loaded.config
    return {"impl": args.impl, "peak_bytes": peak, "seconds": round(seconds, 3), "device": device_name(device),
            "model": {"embed_dim": cfg.embed_dim, "depth": cfg.depth, "num_heads": cfg.num_heads,
                      "source": loaded.source},
            "input": list(x.shape)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", help="a model folder, weights file or HF repo id (default: random)")
    parser.add_argument("--embed-dim", type=int, default=1024)
    parser.add_argument("--depth", type=int, help="random model: blocks (default 24 on cuda, 2 on cpu)")
    parser.add_argument("--num-heads", type=int, default=16)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--impl", choices=IMPLS, help=argparse.SUPPRESS)  # a child process measures one
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    args = parser.parse_args(argv)
    args.depth = args.depth or (24 if args.device.startswith("cuda") else 2)
    if args.impl:
        print(json.dumps(measure(args)))
        return 0

    results = {}
    for impl in IMPLS:
        child = [sys.executable, __file__, "--impl", impl, "--device", args.device, "--embed-dim",
                 str(args.embed_dim), "--depth", str(args.depth), "--num-heads", str(args.num_heads),
                 "--threads", str(args.threads)] + (["--model", args.model] if args.model else [])
        done = subprocess.run(child, capture_output=True, text=True)
        if done.returncode != 0:
            results[impl] = {"impl": impl, "error": done.stderr.strip().splitlines()[-1:]}
            continue
        results[impl] = json.loads(done.stdout.strip().splitlines()[-1])
    ok = all("peak_bytes" in r for r in results.values())
    summary = {
        "preset": PRESET, "size": PRESETS[PRESET]["size"], "frames": DEFAULT_MAX_HISTORY + 1,
        "results": results,
        "peak_mask_over_chunked": round(results["mask"]["peak_bytes"] / max(results["chunked"]["peak_bytes"], 1), 2)
        if ok else None,
        "time_mask_over_chunked": round(results["mask"]["seconds"] / results["chunked"]["seconds"], 2) if ok else None,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    first = next((r for r in results.values() if "model" in r), None)
    if first:
        m = first["model"]
        print(f"{first['device']}: one clip {first['input']} ({PRESET}), embed {m['embed_dim']}, depth {m['depth']}, "
              f"{m['num_heads']} heads, {m['source']}")
    for impl, r in results.items():
        if "error" in r:
            print(f"{impl:<8} failed: {r['error']}")
        else:
            print(f"{impl:<8} peak +{r['peak_bytes'] / 2**20:8.0f} MiB   {r['seconds']:7.2f} s")
    if ok:
        print(f"peak mask/chunked = {summary['peak_mask_over_chunked']:.2f}")
        print(f"time mask/chunked = {summary['time_mask_over_chunked']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
