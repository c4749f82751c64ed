"""VGGT-1B aggregator throughput on one GPU: frames/s and model FLOP utilisation (MFU), frame mode and JanusVLN's clips.

    python benchmarks/gpu_throughput.py --random-weights --compile --out gpu.json  # H100/H200: about 8 min
    python benchmarks/gpu_throughput.py --model facebook/VGGT-1B --out gpu.json
    python benchmarks/gpu_throughput.py --device cpu --tiny --out /tmp/t.json       # smoke test: a minute

Everything runs as the engine runs it: on CUDA bfloat16 autocast with the matmul and conv weights
resident in bfloat16 (entries stored in 16 bits; float32 on the CPU), torch.inference_mode. Rows:

  batched       frame mode [B, 1, 3, H, W], layers=[-2] (the model stops after 23 of 24 blocks), B in
                --batches, at each of --sizes
  one-by-one    the seed's loop: per image a host->device copy, a batch-1 forward, layer -2 patch
                tokens cast to bfloat16 and copied back to the host
  all-layers    layers=None (all 24 blocks, every layer's output kept) at batch 1 and the best batch
  fp32-weights  float32 weights under autocast (`--fp32-weights`, the reference setting), best batch
  compiled      the engine's `--compile` (every transformer block compiled), best batch (--compile only)
  janusvln      the JanusVLN workload: B clips of 9 frames at 644x644, block-causal, layer -2 of the
                current view as `entry_features` computes it (preset newjanusvln), B in --clip-batches,
                for each attention implementation (chunked: per frame against its prefix; mask: the
                dense (S*P)^2 boolean mask, the reference), then compiled (--compile) and with each
                frame's DINOv2 tokens computed once ("patches-once": one new frame per clip, as a bulk
                job over an episode reuses the other eight)

Each row: median of --iters timed steps (more at small batches, to time --min-frames) after --warmup, with
torch.cuda.synchronize. An out-of-memory batch is recorded and larger ones are skipped; any
other error is recorded and the run goes on. Rows past --budget-s are skipped. Results go to
--out after every row, so a run cut short still leaves its numbers.

FLOPs are counted analytically (a multiply-add is 2): the patch-embedding conv, the DINOv2
blocks, and the frame/global blocks that run; per block 2*N*C*(4C + 2*hidden) for q/k/v/out
projections and MLP plus 4*C per attended (query, key) pair for scores and weighted sum: P^2 per
frame in frame attention, P^2*S(S+1)/2 per clip in block-causal global attention (the mask
implementation computes the masked pairs too; they are not counted, so waste shows as lower
MFU). Norms, RoPE, softmax and GELU are left out, so MFU is slightly understated. Peak:
--peak-tflops, default 989 (H100/H200 SXM, dense bfloat16).
"""

from __future__ import annotations

import argparse
import copy
import gc
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vggt_cache.client.spec import PRESETS, preset_options
from vggt_cache.service.demo import DEMO_CONFIG
from vggt_cache.service.engine.device import is_out_of_memory
from vggt_cache.service.model import DEFAULT_SOURCE, LoadedModel
from vggt_cache.service.model.features import (
    compute_features,
    entry_features,
    feature_autocast,
    frame_patches,
    model_spec,
)
from vggt_cache.service.model.resident import compile_blocks, make_resident, weights_dtype
from vggt_cache.service.samples import DEFAULT_MAX_HISTORY

from common import clip_flops, device_name, get_model, median_seconds, print_table, random_model, write_json

H100_BF16_TFLOPS = 989.0
LAYERS = [-2]
CLIP_PRESET = "newjanusvln"
CLIP_FRAMES = DEFAULT_MAX_HISTORY + 1  # a sample's history and its current view
GOAL_MFU = {"frame": 0.45, "janusvln": 0.35}  # on an H100/H200, frame mode at 518 px / causal clips at 644 px


class Sweep:
    """Measures rows one by one, prints each as it lands and rewrites --out after each."""

    def __init__(self, args: argparse.Namespace, loaded: LoadedModel, weights: str) -> None:
        self.args = args
        self.loaded = loaded
        self.device = torch.device(args.device)
        self.is_cuda = self.device.type == "cuda"
        self.started = time.monotonic()
        self.rows: list[dict] = []
        cfg = loaded.config
        # As the engine holds it: entries in bfloat16, so bfloat16 weights on CUDA (float32 on the CPU).
        self.weights_dtype = weights_dtype(self.device, torch.bfloat16)
        self.model = self.resident()
        self.clip_spec = model_spec(loaded, **{**preset_options(CLIP_PRESET), "size": args.clip_size})
        self.result = {
            "device": device_name(self.device),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "model": {"weights": weights, "parameters": loaded.num_params, "config": cfg.to_dict()},
            "compute": "bfloat16 autocast, bfloat16 matmul/conv weights" if self.is_cuda else "float32",
            "peak_tflops": args.peak_tflops,
            "goal_frames_per_s": args.goal_fps,
            "args": vars(args),
            "rows": self.rows,
        }

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def resident(self, dtype: torch.dtype | None = None, compile: bool = False) -> torch.nn.Module:
        """A copy of the model as `make_resident` holds it in the engine."""
        model = make_resident(copy.deepcopy(self.loaded.model), self.device, dtype or self.weights_dtype)
        return compile_blocks(model) if compile else model

    def save(self) -> None:
        self.result["elapsed_s"] = round(self.elapsed(), 1)
        if self.args.out:
            write_json(self.args.out, self.result)

    def row(
        self,
        variant: str,
        size: int,
        batch: int,
        layers: list[int] | None,
        model: torch.nn.Module | None = None,
        step: Callable[[], object] | None = None,
        frames: int | None = None,
        forwards: int = 1,
        flops_per_frame: float | None = None,
        **extra: object,
    ) -> dict:
        """Time `step` (default: a frame-mode forward of a random [batch, 1, 3, size, size] input).

        `frames`: frames a step forwards (default `batch`), in `forwards` forwards; `flops_per_frame`
        defaults to frame mode's.
        """
        cfg = self.loaded.config
        blocks = cfg.depth if layers is None else max(layer % cfg.depth for layer in layers) + 1
        row: dict = {
            "variant": variant,
            "size": size,
            "batch": batch,
            "layers": "all" if layers is None else layers,
            "blocks": blocks,
            **extra,
        }
        if self.elapsed() > self.args.budget_s:
            return self._record(row, status="skipped (time budget)")
        model = self.model if model is None else model
        frames = frames or batch
        x = None
        failure: dict | None = None
        try:
            if step is None:
                x = torch.rand(batch, 1, 3, size, size, device=self.device)
                step = lambda: model(x, attention="frame", layers=layers)  # noqa: E731
            if self.is_cuda:
                torch.cuda.reset_peak_memory_stats(self.device)
            iters = max(self.args.iters, -(-self.args.min_frames // frames))
            with torch.inference_mode(), feature_autocast(self.device):
                seconds = median_seconds(step, self.device, iters, self.args.warmup)
        except Exception as exc:  # the run is unattended: record, free, go on
            failure = (
                {"status": "oom"}
                if is_out_of_memory(exc)
                else {
                    "status": "error",
                    "error": f"{type(exc).__name__}: {exc}",
                    "traceback": traceback.format_exc(limit=4),
                }
            )
        # Freed after the except block: the exception's traceback holds the failed forward's activations.
        x = None  # drop the input (the step's closure holds the name, not the tensor)
        self._free()
        if failure is not None:
            return self._record(row, **failure)
        fps = frames / seconds
        flops = flops_per_frame or clip_flops(cfg, size, size, blocks)
        tflops = flops * fps / 1e12
        row.update(
            ms_per_forward=round(seconds * 1e3 / forwards, 3),
            frames_per_s=round(fps, 2),
            gflop_per_frame=round(flops / 1e9, 1),
            tflops=round(tflops, 2),
            mfu=round(tflops / self.args.peak_tflops, 4) if self.args.peak_tflops else None,
        )
        if self.is_cuda:
            row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2)
        return self._record(row, status="ok")

    def _free(self) -> None:
        gc.collect()
        if self.is_cuda:
            torch.cuda.empty_cache()

    def _record(self, row: dict, status: str, **extra: object) -> dict:
        row.update(status=status, **extra)
        self.rows.append(row)
        self.save()
        print(f"[{self.elapsed():6.1f}s] " + _describe(row), flush=True)
        return row

    # -- the rows -----------------------------------------------------------------------------------------
    def batch_sweep(self, size: int) -> dict | None:
        """Frame mode at every batch size; returns the fastest row."""
        best = None
        for i, batch in enumerate(self.args.batches):
            row = self.row("batched", size, batch, LAYERS)
            if row["status"] == "oom":
                for bigger in self.args.batches[i + 1 :]:
                    self._record(
                        {"variant": "batched", "size": size, "batch": bigger, "layers": LAYERS},
                        status="skipped (oom at a smaller batch)",
                    )
                break
            if row["status"] == "ok" and (best is None or row["frames_per_s"] > best["frames_per_s"]):
                best = row
        return best

    def one_by_one(self, size: int) -> dict:
        spec = model_spec(self.loaded, size=size)
        host = torch.rand(self.args.loop_images, 3, size, size)  # decoded images, on the host like the seed's

        def step() -> None:
            for image in host:
                compute_features(self.loaded.model, image[None, None].to(self.device), spec)[0, 0].cpu()

        return self.row(
            "one-by-one", size, 1, LAYERS, step=step, frames=self.args.loop_images, forwards=self.args.loop_images
        )

    def fp32_weights(self, size: int, batch: int) -> dict:
        model = self.resident(torch.float32)
        try:
            return self.row("fp32-weights", size, batch, LAYERS, model=model)
        finally:
            del model
            self._free()

    def compiled_model(self, row: dict, warm: Callable[[torch.nn.Module], object]) -> torch.nn.Module | None:
        """The engine's `--compile` model, compiled by `warm(model)`; None (and `row` recorded) if that fails."""
        start = time.monotonic()
        try:
            model = self.resident(compile=True)
            with torch.inference_mode(), feature_autocast(self.device):
                warm(model)
        except Exception as exc:
            self._free()
            self._record(
                row,
                status="error",
                error=f"compile failed: {type(exc).__name__}: {exc}",
                traceback=traceback.format_exc(limit=4),
            )
            return None
        row["compile_s"] = round(time.monotonic() - start, 1)
        return model

    def compiled(self, size: int, batch: int) -> dict | None:
        row = {"variant": "compiled", "size": size, "batch": batch, "layers": LAYERS}
        if self.elapsed() > self.args.budget_s:
            return self._record(row, status="skipped (time budget)")
        # The warm-up input lives only inside the call, so nothing holds it once compiled.
        model = self.compiled_model(
            row, lambda m: m(torch.rand(batch, 1, 3, size, size, device=self.device), attention="frame", layers=LAYERS)
        )
        if model is None:
            return None
        try:
            return self.row("compiled", size, batch, LAYERS, model=model, compile_s=row["compile_s"])
        finally:
            del model
            self._free()

    # -- JanusVLN: 9-frame block-causal clips at 644 px -------------------------------------------------
    def clip_row(
        self,
        variant: str,
        batch: int,
        model: torch.nn.Module | None = None,
        impl: str = "chunked",
        patches_once: bool = False,
        **extra: object,
    ) -> dict:
        """B clips of the preset's sample through `entry_features`; with `patches_once`, one frame embedded a clip."""
        model = self.model if model is None else model
        spec = self.clip_spec
        size, frames = spec.size, CLIP_FRAMES
        cfg = self.loaded.config
        blocks = max(layer % cfg.depth for layer in spec.layers) + 1
        x = torch.rand(batch, frames, 3, size, size, device=self.device)
        tokens = None
        if patches_once:  # the other eight frames' tokens, as the patch cache holds them in a bulk job
            with torch.inference_mode(), feature_autocast(self.device):
                tokens = model.embed_patches(x.flatten(0, 1)).unflatten(0, (batch, frames))

        def step() -> None:
            patches = None
            if tokens is not None:
                fresh = frame_patches(model, x[:, -1])  # [B, h*w, C]: the one new frame of each clip
                patches = torch.cat((tokens[:, :-1], fresh[:, None]), dim=1)
            model.causal_impl = impl
            try:
                entry_features(model, x, spec, patches)
            finally:
                model.causal_impl = "chunked"

        flops = clip_flops(cfg, size, size, blocks, frames, "causal", embedded=1 if patches_once else None)
        try:
            return self.row(
                variant,
                size,
                batch,
                list(spec.layers),
                model=model,
                step=step,
                frames=batch * frames,
                flops_per_frame=flops / frames,
                attention_impl=impl,
                clip_frames=frames,
                **extra,
            )
        finally:
            x = tokens = None
            self._free()

    def janusvln(self) -> None:
        """Batch sweep per attention implementation, then compiled and patches-once at the best chunked batch."""
        best: dict[str, dict] = {}
        for impl in ("chunked", "mask"):
            for i, batch in enumerate(self.args.clip_batches):
                row = self.clip_row("janusvln", batch, impl=impl)
                if row["status"] == "oom":
                    for bigger in self.args.clip_batches[i + 1 :]:
                        self._record(
                            {
                                "variant": "janusvln",
                                "size": self.clip_spec.size,
                                "batch": bigger,
                                "attention_impl": impl,
                            },
                            status="skipped (oom at a smaller batch)",
                        )
                    break
                if row["status"] == "ok" and (impl not in best or row["frames_per_s"] > best[impl]["frames_per_s"]):
                    best[impl] = row
        batch = best["chunked"]["batch"] if "chunked" in best else self.args.clip_batches[0]
        self.clip_row("janusvln-patches-once", batch, patches_once=True)
        if self.args.compile:
            row = {"variant": "janusvln-compiled", "size": self.clip_spec.size, "batch": batch}
            if self.elapsed() > self.args.budget_s:
                self._record(row, status="skipped (time budget)")
                return
            x = torch.rand(batch, CLIP_FRAMES, 3, self.clip_spec.size, self.clip_spec.size, device=self.device)
            model = self.compiled_model(row, lambda m: entry_features(m, x, self.clip_spec))
            del x
            if model is not None:
                self.clip_row("janusvln-compiled", batch, model=model, compile_s=row["compile_s"])
                self.clip_row("janusvln-compiled-patches-once", batch, model=model, patches_once=True)
                del model
                self._free()

    def run(self) -> None:
        args = self.args
        best_by_size = {}
        for size in args.sizes:
            best_by_size[size] = self.batch_sweep(size)
        size = args.sizes[0]
        best = best_by_size[size]
        best_batch = best["batch"] if best else args.batches[0]
        self.one_by_one(size)
        self.row("all-layers", size, 1, None)
        if best_batch != 1:
            self.row("all-layers", size, best_batch, None)
        self.fp32_weights(size, best_batch)
        if args.compile:
            self.compiled(size, best_batch)
        self.janusvln()
        self.result["summary"] = self.summary()
        self.save()

    def summary(self) -> dict:
        """The goals are judged on the engine's own settings: batched frame mode at the first size, and clips."""
        ok = [r for r in self.rows if r["status"] == "ok"]

        def fastest(rows: list[dict]) -> dict | None:
            return max(rows, key=lambda r: r["frames_per_s"], default=None)

        batched = fastest([r for r in ok if r["variant"] == "batched" and r["size"] == self.args.sizes[0]])
        loop = fastest([r for r in ok if r["variant"] == "one-by-one"])
        clips = {
            impl: fastest([r for r in ok if r["variant"] == "janusvln" and r["attention_impl"] == impl])
            for impl in ("chunked", "mask")
        }
        return {
            "best_batched": batched,
            "one_by_one": loop,
            "best_any": fastest(ok),
            "batched_over_one_by_one": round(batched["frames_per_s"] / loop["frames_per_s"], 3)
            if batched and loop
            else None,
            "best_over_goal": round(batched["frames_per_s"] / self.args.goal_fps, 3) if batched else None,
            "janusvln_best": clips,
            "janusvln_best_any": fastest([r for r in ok if r["variant"].startswith("janusvln")]),
            "chunked_over_mask": round(clips["chunked"]["frames_per_s"] / clips["mask"]["frames_per_s"], 3)
            if clips["chunked"] and clips["mask"]
            else None,
            "goal_mfu": GOAL_MFU,
        }


def _describe(row: dict) -> str:
    impl = f" {row['attention_impl']}" if "attention_impl" in row else ""
    head = f"{row['variant']:<12}{impl} {row['size']}px batch {row['batch']:<3} layers {row.get('layers')}"
    if row["status"] != "ok":
        return f"{head}: {row['status']}" + (f" ({row['error']})" if row.get("error") else "")
    mfu = f", MFU {row['mfu'] * 100:.1f}%" if row.get("mfu") is not None else ""
    return f"{head}: {row['frames_per_s']:.1f} frames/s, {row['tflops']:.1f} TFLOP/s{mfu}"


def report(result: dict) -> None:
    rows = []
    for r in result["rows"]:
        if r["status"] != "ok":
            rows.append((_name(r), r["size"], r["batch"], str(r.get("layers")), r["status"], "", "", "", ""))
            continue
        mfu = f"{r['mfu'] * 100:.1f}%" if r.get("mfu") is not None else "-"
        mem = f"{r['peak_memory_gib']:.1f}" if "peak_memory_gib" in r else "-"
        rows.append(
            (
                _name(r),
                r["size"],
                r["batch"],
                str(r["layers"]),
                f"{r['ms_per_forward']:.1f}",
                f"{r['frames_per_s']:.1f}",
                f"{r['tflops']:.1f}",
                mfu,
                mem,
            )
        )
    print()
    print(
        f"{result['device']}, torch {result['torch']} (CUDA {result['cuda']}), {result['compute']}; "
        f"model: {result['model']['weights']}, {result['model']['parameters'] / 1e6:.0f}M parameters; "
        f"peak assumed {result['peak_tflops']} TFLOP/s"
    )
    print_table(("variant", "size", "batch", "layers", "ms/forward", "frames/s", "TFLOP/s", "MFU", "GiB"), rows)
    s = result["summary"]
    goal = result["goal_frames_per_s"]
    if s["one_by_one"]:
        print(f"one-by-one (seed loop): {s['one_by_one']['frames_per_s']:.1f} frames/s")
    if s["best_any"]:
        a = s["best_any"]
        print(f"fastest row: {a['frames_per_s']:.1f} frames/s ({a['variant']}, batch {a['batch']}, {a['size']}px)")
    if s["best_batched"]:
        b = s["best_batched"]
        verdict = "met" if b["frames_per_s"] >= goal else "NOT met"
        print(
            f"best batched (the engine's setting): {b['frames_per_s']:.1f} frames/s at batch {b['batch']} "
            f"({b['size']}px, layers [-2]); goal >= {goal:g} frames/s in frame mode: {verdict}"
        )
        print(f"best/goal = {s['best_over_goal']:.2f}")
    if s["batched_over_one_by_one"] is not None:
        print(f"batched/one-by-one = {s['batched_over_one_by_one']:.2f}")
    for name, row in (("frame mode", s["best_batched"]), ("janusvln clips", s["janusvln_best_any"])):
        if row and row.get("mfu") is not None:
            goal = s["goal_mfu"]["frame" if name == "frame mode" else "janusvln"]
            print(
                f"MFU {name}: {row['mfu'] * 100:.1f}% ({_name(row)}, batch {row['batch']}, {row['size']}px); "
                f"goal >= {goal * 100:.0f}% on an H100/H200: {'met' if row['mfu'] >= goal else 'NOT met'}"
            )
    if s["chunked_over_mask"] is not None:
        print(f"janusvln chunked/mask = {s['chunked_over_mask']:.2f}")


def _name(row: dict) -> str:
    return row["variant"] + (f" ({row['attention_impl']})" if "attention_impl" in row else "")


def _ints(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return values


def load(args: argparse.Namespace) -> tuple[LoadedModel, str]:
    """The model and a description of its weights; random VGGT-1B weights if the checkpoint is missing."""
    config = DEMO_CONFIG if args.tiny else {}
    if args.random_weights or args.tiny:
        return random_model(config, args.device), "random"
    try:
        loaded = get_model(args.model, config, args.device)
        return loaded, loaded.source
    except (FileNotFoundError, OSError) as exc:
        # Throughput does not depend on the weights' values; an unattended run must not stop here.
        print(f"cannot load {args.model} ({exc}); using random weights of the same architecture", flush=True)
        return random_model(config, args.device), f"random (checkpoint not found: {args.model})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_SOURCE, help="HF repo id, folder or weights file")
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="build VGGT-1B with random weights directly on the device (no checkpoint needed)",
    )
    parser.add_argument("--tiny", action="store_true", help="a tiny random model and small sizes (smoke test)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--sizes", type=_ints, help="square input sizes (default 518,504; tiny: 56,42)")
    parser.add_argument("--batches", type=_ints, default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument(
        "--clip-batches",
        type=_ints,
        default=[1, 2, 4, 8],
        help=f"clips of {CLIP_FRAMES} frames per forward in the JanusVLN rows",
    )
    parser.add_argument(
        "--clip-size",
        type=int,
        help=f"JanusVLN rows' input size (default the {CLIP_PRESET} preset's {PRESETS[CLIP_PRESET]['size']}; tiny: 56)",
    )
    parser.add_argument("--iters", type=int, default=10, help="timed steps per row (more if needed for --min-frames)")
    parser.add_argument("--min-frames", type=int, default=32, help="frames timed per row at least")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--loop-images", type=int, default=16, help="images per step of the one-by-one loop")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        help=f"device peak for MFU (default {H100_BF16_TFLOPS:g} on cuda: H100 SXM dense bf16)",
    )
    parser.add_argument("--goal-fps", type=float, default=100.0)
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time the engine's --compile (every block compiled) at the best batches",
    )
    parser.add_argument("--budget-s", type=float, default=480.0, help="skip rows that would start after this")
    parser.add_argument("--out", help="JSON results, rewritten after every row")
    args = parser.parse_args(argv)
    args.sizes = args.sizes or ([56, 42] if args.tiny else [518, 504])
    args.clip_size = args.clip_size or (56 if args.tiny else PRESETS[CLIP_PRESET]["size"])
    if torch.device(args.device).type == "cuda":
        args.peak_tflops = args.peak_tflops or H100_BF16_TFLOPS
    if min(args.iters, args.loop_images) < 1 or min(args.warmup, args.min_frames) < 0:
        parser.error("--iters and --loop-images must be at least 1, --warmup and --min-frames at least 0")

    start = time.monotonic()
    loaded, weights = load(args)
    print(
        f"model ready in {time.monotonic() - start:.1f}s: {weights}, {loaded.num_params / 1e6:.0f}M parameters "
        f"on {device_name(args.device)}",
        flush=True,
    )
    sweep = Sweep(args, loaded, weights)
    sweep.run()
    report(sweep.result)
    if args.out:
        print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
