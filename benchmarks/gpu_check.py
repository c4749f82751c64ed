"""The Python steps of benchmarks/gpu_check.sh (run that, not this): setup, the service probe, the summary.

python benchmarks/gpu_check.py setup OUT [--tiny] [--device cuda:0]
python benchmarks/gpu_check.py probe OUT URL
python benchmarks/gpu_check.py summary OUT
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vggt_cache.client.http import wait_until_ready
from vggt_cache.client.wire import decode_features
from vggt_cache.service.demo import DEMO_CONFIG
from vggt_cache.service.samples import DEFAULT_MAX_HISTORY

from common import make_images, random_model, write_json

EPISODE_STEPS = 24
CLIP_FRAMES = DEFAULT_MAX_HISTORY + 1  # a JanusVLN sample: 8 history frames and the current view
READY_TIMEOUT_S = 100.0  # VGGT-1B read from local disk onto the GPU (the serve step has 120 s)
STEPS = ("model", "serve", "precompute", "precompute-rerun", "throughput")


def setup(out: Path, tiny: bool, device: str) -> None:
    """OUT/model: VGGT-1B's config (the tiny demo config with --tiny) with random weights, as the loader reads
    a folder; OUT/data: one 24-step episode of 640x480 JPEGs (80x60 with --tiny), named as JanusVLN's."""
    from safetensors.torch import save_file

    start = time.monotonic()
    model_dir = out / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    loaded = random_model(DEMO_CONFIG if tiny else {}, device)
    # bfloat16 on disk halves VGGT-1B's 3.6 GB; the loader casts to float32 as it does a real checkpoint.
    state = {
        k: (v.bfloat16() if v.is_floating_point() and not tiny else v).detach().cpu().contiguous()
        for k, v in loaded.model.state_dict().items()
    }
    save_file(state, str(model_dir / "state_dict.safetensors"))
    (model_dir / "config.json").write_text(json.dumps(loaded.config.to_dict(), indent=2))
    episode = out / "data" / "ep_0001"
    episode.mkdir(parents=True, exist_ok=True)
    width, height = (80, 60) if tiny else (640, 480)
    make_images(episode, EPISODE_STEPS, width, height, name="step_{i}_MOVE_FORWARD.jpg")
    write_json(
        out / "model.json",
        {
            "parameters": loaded.num_params,
            "tiny": tiny,
            "episode_steps": EPISODE_STEPS,
            "seconds": round(time.monotonic() - start, 1),
        },
    )


def probe(out: Path, url: str) -> None:
    """One on-demand causal request of a 9-frame clip, then /status: OUT/serve.json."""
    if not wait_until_ready(url, READY_TIMEOUT_S):
        raise SystemExit(f"the service at {url} did not become ready within {READY_TIMEOUT_S:.0f} s")
    frames = sorted((out / "data" / "ep_0001").glob("step_*.jpg"), key=lambda p: int(p.name.split("_")[1]))
    clip = [str(p) for p in frames[:CLIP_FRAMES]]
    with httpx.Client(base_url=url, timeout=600) as http:
        start = time.monotonic()
        r = http.post("/features", json={"clips": [clip]})
        seconds = time.monotonic() - start
        r.raise_for_status()
        items, _ = decode_features(r.content)
        status = http.get("/status").raise_for_status().json()
    engine = status["engine"]
    write_json(
        out / "serve.json",
        {
            "request_s": round(seconds, 3),
            "entry_status": items[0]["status"],
            "error": items[0].get("error"),
            "images_per_s": round(CLIP_FRAMES / seconds, 2),
            "oom_splits": engine["oom_splits"],
            "devices": engine["devices"],
            "compile": engine.get("compile"),
            "status": status,
        },
    )


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def summary(out: Path) -> dict:
    """OUT/summary.json from each step's rc file and results: ok only if every step ran and did its part."""
    steps = []
    for name in STEPS:
        rc = _json(out / f"{name}.rc")
        steps.append({"name": name, "log": f"{name}.log", **(rc or {"rc": None, "seconds": None})})
    serve = _json(out / "serve.json") or {}
    runs = [_json(out / f"{name}.manifest.json") or {} for name in ("precompute", "precompute-rerun")]
    throughput = _json(out / "throughput.json") or {}
    ok_rows = [r for r in throughput.get("rows", []) if r.get("status") == "ok"]
    best = max(ok_rows, key=lambda r: r["frames_per_s"], default={})
    device = (serve.get("devices") or [{}])[0]
    result = {
        "steps": steps,
        "device": throughput.get("device"),
        "torch": throughput.get("torch"),
        "serve": {
            k: serve.get(k) for k in ("entry_status", "error", "request_s", "images_per_s", "oom_splits", "compile")
        }
        | {"memory": device.get("memory"), "failed": device.get("failed")},
        "precompute": {
            "computed": runs[0].get("computed"),
            "failed": runs[0].get("failed"),
            "verified_entries": runs[0].get("verified_entries"),
            "seconds": runs[0].get("seconds"),
            "rerun_computed": runs[1].get("computed"),
            "rerun_skipped": runs[1].get("skipped"),
        },
        "throughput": {
            "best_frames_per_s": best.get("frames_per_s"),
            "best_row": best,
            "best_mfu": max((r["mfu"] for r in ok_rows if r.get("mfu") is not None), default=None),
            "peak_memory_gib": max((r["peak_memory_gib"] for r in ok_rows if "peak_memory_gib" in r), default=None),
            "rows": [
                {
                    k: r.get(k)
                    for k in (
                        "variant",
                        "size",
                        "batch",
                        "status",
                        "frames_per_s",
                        "mfu",
                        "peak_memory_gib",
                        "compile_s",
                    )
                }
                for r in throughput.get("rows", [])
            ],
        },
    }
    result["ok"] = (
        all(s["rc"] == 0 for s in steps)
        and serve.get("entry_status") == "computed"
        and bool(runs[0].get("computed"))
        and not runs[0].get("failed")
        and runs[1].get("computed") == 0
        and bool(best)
    )
    write_json(out / "summary.json", result)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="step", required=True)
    s = sub.add_parser("setup")
    s.add_argument("out", type=Path)
    s.add_argument("--tiny", action="store_true")
    s.add_argument("--device", default="cpu", help="where the random weights are drawn (cuda: seconds for 1B)")
    p = sub.add_parser("probe")
    p.add_argument("out", type=Path)
    p.add_argument("url")
    m = sub.add_parser("summary")
    m.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    if args.step == "setup":
        setup(args.out, args.tiny, args.device)
    elif args.step == "probe":
        probe(args.out, args.url)
    else:
        result = summary(args.out)
        print(json.dumps({k: result[k] for k in ("ok", "serve", "precompute")}, indent=2))
        t = result["throughput"]
        print(
            f"throughput: best {t['best_frames_per_s']} frames/s, best MFU {t['best_mfu']}, "
            f"peak {t['peak_memory_gib']} GiB"
        )
        return 0 if result["ok"] else 1
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
