"""What a plan costs as a data root grows: ours against a bare walk + stat of the same root (the floor).

Builds NewJanusVLN-style episode roots (`step_<n>_<ACTION>.jpg`, 35 steps an episode) and
JanusVLN-style JSON roots (one JSON array, 9-frame clips) of N samples, every image a hard link
to one small JPEG (quick to build), and measures in child processes, side by side:

- `ours`: `plan_root` (what `precompute --dry-run` does: a job's plan, its units let go) with the tiny model's
  `newjanusvln` spec: wall and CPU time, file-system calls per sample (`strace -c -f`, start-up
  subtracted, when strace is installed) and peak RSS per sample (over a child that only imports
  the same modules); and what a job does, `plan_pieces` recording each piece in a job store: its
  wall time, its first-entry latency (the job submits its first unit once its first piece is
  recorded), state bytes per unit (the store's SQLite files), and the RSS of what a running job
  holds of its plan (a child that loads the job's pending units from the store, as the runner does);
- `floor`: `os.walk` + one `os.stat` per file of the same root;
- then, every image given a valid entry (one written per step, hard-linked into every folder: the
  frames are links to images of one size and mtime, so each link is valid where it lies), `verify`
  (every entry read, its CRC checked) and the plan again over the computed root (every entry valid):
  wall, CPU and calls per sample.

`python benchmarks/plan.py` runs N = 10k; `--n 10000 100000 612492` the issue's sizes (the
612k root needs ~5 GB of inodes-only disk and minutes). `--json` prints the results as JSON.
`--instructions` also counts, with valgrind's callgrind, the instructions the plan and the floor run per sample
(only their measured part): unlike CPU time, the same on a busy machine as on an idle one (~50x slower: 10k only).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = REPO / "tests" / "fixtures" / "vggt_tiny"
STEPS = 35  # an R2R-CE episode's mean length: 612,492 samples in ~17,500 folders
HISTORY = 8
LINKS_PER_IMAGE = 60_000  # ext4 allows 65,000 links to one inode
TRACED = "%file,%stat,readlink"
COUNTING = "VGGT_BENCH_CALLGRIND"  # set in a child run under callgrind: it counts its measured part only
LAYOUTS = ("episodes", "json")


def _image(path: str) -> None:
    from PIL import Image

    Image.new("RGB", (64, 48), (90, 120, 150)).save(path, quality=90)


def build_root(folder: str, n: int, layout: str) -> None:
    """`n` samples under `folder` (episode folders, or one JSON array over frame folders)."""
    os.makedirs(folder)
    first = os.path.join(folder, ".one_0.jpg")  # hidden: the walk skips it
    _image(first)
    samples, linked = [], 0
    for episode in range((n + STEPS - 1) // STEPS):
        sub = f"ep_{episode:06d}"
        os.mkdir(os.path.join(folder, sub))
        steps = min(STEPS, n - episode * STEPS)
        names = [f"step_{s}_MOVE_FORWARD.jpg" if layout == "episodes" else f"rgb_{s}.jpg" for s in range(steps)]
        for name in names:
            one = os.path.join(folder, f".one_{linked // LINKS_PER_IMAGE}.jpg")
            if not os.path.exists(one):
                shutil.copyfile(first, one)
            os.link(one, os.path.join(folder, sub, name))
            linked += 1
        if layout == "json":
            from vggt_cache.service.samples import history_indices

            samples += [
                {
                    "images": [f"{sub}/{names[i]}" for i in history_indices(j, HISTORY)],
                    "conversations": [{"from": "human", "value": "<image>"}],
                }
                for j in range(steps)
            ]
    if layout == "json":
        with open(os.path.join(folder, "train.json"), "w") as f:
            json.dump(samples, f)


def compute_root(folder: str) -> None:
    """Give every image under `folder` (a root `build_root` made) a valid entry of the tiny model's spec."""
    import torch

    from vggt_cache.client.cachefile import CACHE_SUFFIX, context_record, source_record, write_entry
    from vggt_cache.client.entryformat import entry_shape
    from vggt_cache.client.spec import resolve_options
    from vggt_cache.service.model import identify_model
    from vggt_cache.service.model.features import model_spec
    from vggt_cache.service.preprocess import output_size
    from vggt_cache.service.samples import history_indices

    ones = [os.path.join(folder, n) for n in os.listdir(folder) if n.startswith(".one_")]
    mtime = os.stat(ones[0]).st_mtime_ns
    for one in ones:  # every image of one size and mtime: an entry is valid for its step in every folder
        os.utime(one, ns=(mtime, mtime))
    spec = model_spec(identify_model(str(TINY_MODEL)), **resolve_options("newjanusvln"))
    patch = spec.architecture.get("patch_size", 14)
    height, width = output_size(64, 48, spec.preprocess, spec.size, spec.align)
    grid = (height // patch, width // patch)
    features = torch.zeros(entry_shape(spec, grid, channels=2048), dtype=spec.torch_dtype)
    episodes = sorted(n for n in os.listdir(folder) if n.startswith("ep_"))
    first = os.path.join(folder, episodes[0])
    names = sorted(os.listdir(first), key=lambda n: int(n.split("_")[1].split(".")[0]))  # step order
    for j, name in enumerate(names):
        image = os.path.join(first, name)
        clip = [os.path.join(first, names[i]) for i in history_indices(j, HISTORY)]
        context = context_record(image, spec.context_of(clip))
        write_entry(image, features, spec, grid, source_record(image), context)
    for episode in episodes[1:]:
        for name in os.listdir(os.path.join(folder, episode)):
            os.link(os.path.join(first, name + CACHE_SUFFIX), os.path.join(folder, episode, name + CACHE_SUFFIX))


def _rss_bytes() -> int:
    """This process's peak RSS: `VmHWM` is its own address space's (`ru_maxrss` keeps the peak of the parent
    that forked it across `execve`: the benchmark's, which builds a JSON root of 612k samples in memory)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    raise OSError("no VmHWM in /proc/self/status")


def child(task: str, root: str, state_dir: str) -> dict:
    """One measurement in this process: `none` (imports only), `walk` (the floor), `plan` (ours: a dry run),
    `stream` (a job's plan, recorded a piece at a time in `state_dir`), `units` (the pending units of the job
    a `stream` child left in `state_dir`) or `verify`."""
    from vggt_cache.client.spec import resolve_options
    from vggt_cache.service.collector import settle_start_up
    from vggt_cache.service.jobs.options import JobOptions
    from vggt_cache.service.jobs.planning import plan_pieces, plan_root
    from vggt_cache.service.jobs.store import JobStore
    from vggt_cache.service.model import identify_model
    from vggt_cache.service.model.features import model_spec
    from vggt_cache.service.paths import AllowedRoots

    settle_start_up()  # as the service and the commands do once started
    wall, cpu = time.perf_counter(), time.process_time()
    out: dict = {}
    if task == "walk":
        _count_instructions(True)
        files = 0
        for folder, _, names in os.walk(root):
            for name in names:
                os.stat(os.path.join(folder, name))
                files += 1
        _count_instructions(False)
        out["files"] = files
    elif task == "plan":
        spec = model_spec(identify_model(str(TINY_MODEL)), **resolve_options("newjanusvln"))
        wall, cpu = time.perf_counter(), time.process_time()
        _count_instructions(True)
        plan = plan_root(root, spec, AllowedRoots.of([root]), JobOptions(max_history_images=HISTORY))
        _count_instructions(False)
        out["samples"], out["entries"], out["valid"] = plan.source["samples"], plan.entries, plan.valid
    elif task == "stream":  # what a job does: plan a piece at a time, each recorded before the next is planned
        spec = model_spec(identify_model(str(TINY_MODEL)), **resolve_options("newjanusvln"))
        options = JobOptions(max_history_images=HISTORY)
        store = JobStore(state_dir)
        job = store.create(root, spec.digest, spec.canonical_json(), options)
        wall, cpu = time.perf_counter(), time.process_time()
        out["units"] = 0
        for piece in plan_pieces(root, spec, AllowedRoots.of([root]), options):
            store.record_piece(
                job.job_id, piece.plan.to_dict(), piece.units, piece.problems, [], piece.samples, piece.last
            )
            if piece.units and not out["units"]:
                out["first_entry_s"] = time.perf_counter() - wall  # the job submits its first unit now
            out["units"] += len(piece.units)
        out["seconds"], out["cpu_seconds"] = time.perf_counter() - wall, time.process_time() - cpu
        store.close()
        out["state_bytes"] = sum(p.stat().st_size for p in Path(state_dir).iterdir())
    elif task == "verify":
        from vggt_cache.service.verify import verify_data_root

        spec = model_spec(identify_model(str(TINY_MODEL)), **resolve_options("newjanusvln"))
        wall, cpu = time.perf_counter(), time.process_time()
        report = verify_data_root(root, spec, max_history_images=HISTORY)
        out["hits"], out["entries"] = report["counts"]["hit"], sum(report["counts"].values())
    elif task == "units":
        store = JobStore(state_dir)
        [job] = store.unfinished_jobs()
        out["units"] = len(store.pending_units(job.job_id))
        store.close()
    out.setdefault("seconds", time.perf_counter() - wall)
    out.setdefault("cpu_seconds", time.process_time() - cpu)
    out["rss_bytes"] = _rss_bytes()
    return out


def _count_instructions(on: bool) -> None:
    """Under callgrind (`--instructions`), count from here (`on`) or stop counting: the measured part only."""
    if os.environ.get(COUNTING):
        switch = ["callgrind_control", "-i", "on" if on else "off", str(os.getpid())]
        subprocess.run(switch, check=True, capture_output=True, timeout=60)  # where vgdb cannot attach: an error


def _run_child(
    task: str, root: str, scratch: str, traced: bool, state_dir: str | None = None, counted: bool = False
) -> dict:
    """`task` in a child process; `state_dir`: the job store it uses and leaves (default: a temporary one);
    `traced`: its file-system calls counted (strace); `counted`: the instructions of its measured part (callgrind)."""
    kept = state_dir is not None
    state_dir = state_dir or tempfile.mkdtemp(dir=scratch)
    cmd = [sys.executable, __file__, "--child", task, "--root", root, "--state-dir", state_dir]
    counts = os.path.join(scratch, "strace.txt")
    env = None
    if traced:
        cmd = ["strace", "-f", "-c", "-e", f"trace={TRACED}", "-o", counts, *cmd]
    elif counted:
        profile = os.path.join(scratch, "callgrind.out")
        cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={profile}", *cmd]
        env = {**os.environ, COUNTING: "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    if not kept:
        shutil.rmtree(state_dir)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if traced:
        result["calls"] = _strace_total(counts)
    if counted:
        result["instructions"] = _collected(proc.stderr)
    return result


def _collected(stderr: str) -> int:
    """The instructions callgrind says it collected (`==pid== Collected : N`)."""
    for line in stderr.splitlines():
        if "Collected :" in line:
            return int(line.rsplit(":", 1)[1])
    raise ValueError("callgrind said nothing collected")


def _strace_total(path: str) -> int:
    """The `total` calls of an `strace -c` summary."""
    with open(path) as f:
        for line in f:
            if line.rstrip().endswith("total"):
                return int(line.split()[3])  # % time, seconds, usecs/call, calls[, errors], total
    raise ValueError(f"no total in {path}")


def baseline(scratch: str, strace: bool) -> dict:
    """A child that imports what the others do and does nothing: their start-up calls and memory."""
    base = _run_child("none", scratch, scratch, False)
    if strace:
        base["calls"] = _run_child("none", scratch, scratch, True)["calls"]
    return base


def measure(n: int, layout: str, scratch: str, strace: bool, base: dict, instructions: bool = False) -> dict:
    root = os.path.join(scratch, f"{layout}_{n}")
    t0 = time.perf_counter()
    build_root(root, n, layout)
    built = time.perf_counter() - t0
    state_dir = tempfile.mkdtemp(dir=scratch)
    runs = {"walk": _run_child("walk", root, scratch, False)}
    runs["plan"] = _run_child("plan", root, scratch, False)
    runs["stream"] = _run_child("stream", root, scratch, False, state_dir)
    runs["units"] = _run_child("units", root, scratch, False, state_dir)  # what a running job holds of the plan
    shutil.rmtree(state_dir)
    if strace:
        for task in ("walk", "plan"):
            runs[task]["calls"] = _run_child(task, root, scratch, True)["calls"]
    if instructions:
        for task in ("walk", "plan"):
            runs[task]["instructions"] = _run_child(task, root, scratch, False, counted=True)["instructions"]
    compute_root(root)
    runs["verify"] = _run_child("verify", root, scratch, False)
    runs["rerun"] = _run_child("plan", root, scratch, False)
    if strace:
        runs["verify"]["calls"] = _run_child("verify", root, scratch, True)["calls"]
        runs["rerun"]["calls"] = _run_child("plan", root, scratch, True)["calls"]
    shutil.rmtree(root)
    walk, plan, stream, verify, rerun = runs["walk"], runs["plan"], runs["stream"], runs["verify"], runs["rerun"]
    if verify["hits"] != verify["entries"] or rerun["valid"] != rerun["entries"]:
        raise RuntimeError(f"the computed root's entries are not all valid: {verify}, {rerun}")
    row = {
        "n": n,
        "layout": layout,
        "build_s": built,
        "samples": plan["samples"],
        "entries": plan["entries"],
        "ours_s": plan["seconds"],
        "ours_cpu_us": 1e6 * plan["cpu_seconds"] / n,
        "floor_s": walk["seconds"],
        "floor_cpu_us": 1e6 * walk["cpu_seconds"] / n,
        "job_plan_s": stream["seconds"],
        "first_entry_s": stream["first_entry_s"],
        "state_bytes_per_unit": stream["state_bytes"] / stream["units"],
        "rss_bytes_per_sample": max(0, plan["rss_bytes"] - base["rss_bytes"]) / n,
        "job_rss_bytes_per_sample": max(0, runs["units"]["rss_bytes"] - base["rss_bytes"]) / n,
        "verify_s": verify["seconds"],
        "verify_cpu_us": 1e6 * verify["cpu_seconds"] / n,
        "rerun_s": rerun["seconds"],
        "rerun_cpu_us": 1e6 * rerun["cpu_seconds"] / n,
    }
    if strace:
        row["ours_calls"] = (plan["calls"] - base["calls"]) / n
        row["floor_calls"] = (walk["calls"] - base["calls"]) / n
        row["verify_calls"] = (verify["calls"] - base["calls"]) / n
        row["rerun_calls"] = (rerun["calls"] - base["calls"]) / n
    if instructions:
        row["ours_instructions"] = plan["instructions"] / n
        row["floor_instructions"] = walk["instructions"] / n
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[10_000], help="samples per root (default 10000)")
    parser.add_argument("--layout", choices=LAYOUTS, nargs="+", default=list(LAYOUTS))
    parser.add_argument("--dir", default=None, help="where the roots are built (default: a temporary folder)")
    parser.add_argument("--no-strace", action="store_true", help="do not count file-system calls")
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--instructions", action="store_true", help="count instructions per sample with callgrind (needs valgrind)"
    )
    parser.add_argument(
        "--child", choices=("none", "walk", "plan", "stream", "units", "verify"), help=argparse.SUPPRESS
    )
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--state-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    if args.child:
        print(json.dumps(child(args.child, args.root, args.state_dir)))
        return 0
    strace = not args.no_strace and shutil.which("strace") is not None
    if args.instructions and shutil.which("valgrind") is None:
        parser.error("--instructions needs valgrind (callgrind, callgrind_control)")
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="vggt-plan-bench-") as scratch:
        base = baseline(scratch, strace)
        rows = [measure(n, layout, scratch, strace, base, args.instructions) for n in args.n for layout in args.layout]
    if args.json:
        print(json.dumps({"strace": strace, "rows": rows}, indent=2))
        return 0
    sys.path.insert(0, str(REPO / "benchmarks"))
    from common import print_table

    calls = ("calls/sample ours", "floor") if strace else ()
    counted = ("instructions/sample ours", "floor") if args.instructions else ()
    print_table(
        (
            "root",
            "samples",
            "ours s",
            "floor s",
            "CPU us/sample ours",
            "floor",
            *calls,
            *counted,
            "job plan s",
            "first entry s",
            "state B/unit",
            "RSS B/sample plan",
            "job",
        ),
        [
            (
                f"{r['layout']} {r['n']}",
                r["samples"],
                f"{r['ours_s']:.3f}",
                f"{r['floor_s']:.3f}",
                f"{r['ours_cpu_us']:.0f}",
                f"{r['floor_cpu_us']:.0f}",
                *((f"{r['ours_calls']:.2f}", f"{r['floor_calls']:.2f}") if strace else ()),
                *((f"{r['ours_instructions']:,.0f}", f"{r['floor_instructions']:,.0f}") if args.instructions else ()),
                f"{r['job_plan_s']:.2f}",
                f"{r['first_entry_s']:.2f}",
                f"{r['state_bytes_per_unit']:.0f}",
                f"{r['rss_bytes_per_sample']:.0f}",
                f"{r['job_rss_bytes_per_sample']:.0f}",
            )
            for r in rows
        ],
    )
    print("\nThe same roots, every image given a valid entry:")
    print_table(
        (
            "root",
            "verify s",
            "CPU us/sample",
            *(("calls/sample",) if strace else ()),
            "plan s",
            "CPU us/sample",
            *(("calls/sample",) if strace else ()),
        ),
        [
            (
                f"{r['layout']} {r['n']}",
                f"{r['verify_s']:.2f}",
                f"{r['verify_cpu_us']:.0f}",
                *((f"{r['verify_calls']:.2f}",) if strace else ()),
                f"{r['rerun_s']:.2f}",
                f"{r['rerun_cpu_us']:.0f}",
                *((f"{r['rerun_calls']:.2f}",) if strace else ()),
            )
            for r in rows
        ],
    )
    print("" if strace else "(file-system calls not counted: --no-strace, or no strace here)")
    for r in rows:
        print(f"{r['layout']} {r['n']} ours/floor wall = {r['ours_s'] / r['floor_s']:.2f}")
        if strace:
            print(f"{r['layout']} {r['n']} ours/floor calls = {r['ours_calls'] / max(r['floor_calls'], 1e-9):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
