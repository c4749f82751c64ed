"""Load on loopback: concurrent clients mixing cache hits, misses and status polls while a bulk job runs.

    python benchmarks/load.py [--clients 32] [--duration 60] [--server URL] [--json PATH]

Without --server it starts `vggt-cache serve` itself (the tiny test model on the
CPU unless --model/--device say otherwise) on a free port, over a temporary data
root. It then
  1. computes the `--hits` images (so their sibling files exist);
  2. starts a bulk job over `--bulk` images (POST /precompute);
  3. runs `--clients` threads, each looping over
       hit     POST /features for `--per-request` cached images (expects "cached")
       miss    POST /features for `--per-request` images written just before (expects "computed")
       status  GET /status or GET /jobs/{id}, alternately
     picked at random with the weights of `--mix`, through the project's client
     transport (a 429 is retried after Retry-After, as a training client would):
     `--warmup` seconds unmeasured, then `--duration` seconds measured;
  4. reports per kind p50/p99 latency, throughput, errors (anything the client
     saw after its retries, or an item with the wrong status), the 429s the
     service answered (from /metrics), the bulk job's progress, and the service's
     RSS (VmRSS of /proc/<pid>/status; with --server, /status's) after the
     warm-up, at half time, at its peak and at the end.
Exit status 1 if any client saw an error.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vggt_cache.client.http import ServiceError, Transport, wait_until_ready
from vggt_cache.client.wire import decode_features
from vggt_cache.service.demo import free_port

from common import make_images, print_table, write_json

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = REPO / "tests" / "fixtures" / "vggt_tiny"
KINDS = ("hit", "miss", "status")
EXPECTED = {"hit": "cached", "miss": "computed"}


# -- the service ------------------------------------------------------------------------------------


@dataclass
class Service:
    url: str
    pid: int | None  # known when this script started it: RSS is read from /proc
    proc: subprocess.Popen | None = None

    def rss_bytes(self, http: httpx.Client) -> int | None:
        if self.pid is not None:
            try:
                text = Path(f"/proc/{self.pid}/status").read_text()
            except OSError:
                text = ""
            match = re.search(r"^VmRSS:\s+(\d+) kB", text, re.M)
            if match:
                return int(match.group(1)) * 1024
        devices = http.get("/status").json().get("engine", {}).get("devices", [])
        rss = [d["memory"].get("rss_bytes") for d in devices if "rss_bytes" in d.get("memory", {})]
        return rss[0] if rss else None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_service(args: argparse.Namespace, root: str, log_path: str) -> Service:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "vggt_cache.service.cli",
        "serve",
        "--model",
        args.model,
        "--device",
        args.device,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--allowed-root",
        root,
        "--state-dir",
        os.path.join(root, ".state"),
        "--size",
        str(args.size),
        "--max-batch-frames",
        str(args.batch),
        "--max-pending",
        str(args.max_pending),
    ]
    with open(log_path, "w") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
    service = Service(f"http://127.0.0.1:{port}", proc.pid, proc)
    if wait_until_ready(service.url, 300, is_alive=lambda: proc.poll() is None):
        return service
    service.stop()
    raise RuntimeError(f"the service did not become ready; its log:\n{Path(log_path).read_text()[-3000:]}")


def requests_with_status(http: httpx.Client, route: str, status: str) -> int:
    text = http.get("/metrics").text
    pattern = re.compile(r"^vggt_cache_http_requests_total\{(.*)\} ([0-9.e+]+)$", re.M)
    return int(
        sum(
            float(v)
            for labels, v in pattern.findall(text)
            if f'route="{route}"' in labels and f'status="{status}"' in labels
        )
    )


# -- the clients ------------------------------------------------------------------------------------


@dataclass
class Tally:
    """What the clients saw, under one lock."""

    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    images: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ok(self, kind: str, seconds: float, images: int = 0) -> None:
        with self.lock:
            self.latencies[kind].append(seconds)
            self.images[kind] += images

    def error(self, kind: str, message: str) -> None:
        with self.lock:
            self.errors[kind] += 1
            if len(self.examples) < 5:
                self.examples.append(f"{kind}: {message[:300]}")


class Client:
    """One training-like client: a loop of weighted operations until `deadline`."""

    def __init__(
        self,
        index: int,
        transport: Transport,
        args: argparse.Namespace,
        hits: list[str],
        miss_root: str,
        job_id: str,
        tally: Tally,
    ) -> None:
        self.index = index
        self.transport = transport
        self.args = args
        self.hits = hits
        self.miss_root = miss_root
        self.job_id = job_id
        self.tally = tally
        self.rng = random.Random(index)
        self.misses = 0

    def run(self, deadline: float) -> None:
        ops: dict[str, Callable[[], None]] = {"hit": self.hit, "miss": self.miss, "status": self.status}
        kinds = list(self.args.mix)
        weights = [self.args.mix[k] for k in kinds]
        while time.monotonic() < deadline:
            kind = self.rng.choices(kinds, weights)[0]
            try:
                ops[kind]()
            except (ServiceError, httpx.HTTPError, ValueError) as exc:
                self.tally.error(kind, f"{type(exc).__name__}: {exc}")

    def features(self, kind: str, images: list[str]) -> None:
        start = time.perf_counter()
        response = self.transport.request("POST", "/features", key=images[0], json={"images": images})
        items, tensors = decode_features(response.content)
        seconds = time.perf_counter() - start
        wrong = [i for i in items if i["status"] != EXPECTED[kind] or i["tensor"] not in tensors]
        if wrong:
            self.tally.error(kind, f"{len(wrong)} item(s) not {EXPECTED[kind]}: {wrong[0]}")
            return
        self.tally.ok(kind, seconds, len(items))

    def hit(self) -> None:
        self.features("hit", self.rng.sample(self.hits, self.args.per_request))

    def miss(self) -> None:
        folder = os.path.join(self.miss_root, f"c{self.index:03d}-{self.misses:05d}")
        self.misses += 1
        images = images_in(folder, self.args.per_request, self.args, seed=self.index * 100_000 + self.misses)
        self.features("miss", images)

    def status(self) -> None:
        path = "/status" if self.rng.random() < 0.5 else f"/jobs/{self.job_id}"
        start = time.perf_counter()
        self.transport.request("GET", path).json()
        self.tally.ok("status", time.perf_counter() - start)


# -- the run ----------------------------------------------------------------------------------------


def drive(clients: list[Client], seconds: float) -> float:
    """Run every client in its own thread for `seconds`; returns the time it took."""
    started = time.monotonic()
    threads = [threading.Thread(target=c.run, args=(started + seconds,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.monotonic() - started


def images_in(folder: str, n: int, args: argparse.Namespace, seed: int) -> list[str]:
    os.makedirs(folder)
    return make_images(folder, n, args.width, args.height, seed=seed)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def sample_rss(service: Service, url: str, stop: threading.Event, samples: list[int]) -> None:
    """RSS once a second: the first half of the run shows the warm level, the second whether it still grows."""
    with httpx.Client(base_url=url, timeout=30) as http:
        while not stop.wait(1.0):
            rss = service.rss_bytes(http)
            if rss is not None:
                samples.append(rss)


def run(args: argparse.Namespace, root: str) -> dict:
    hits = images_in(os.path.join(root, "hits"), args.hits, args, seed=1)
    images_in(os.path.join(root, "bulk"), args.bulk, args, seed=2)
    miss_root = os.path.join(root, "misses")
    os.makedirs(miss_root)
    service = (
        Service(args.server.rstrip("/"), None)
        if args.server
        else start_service(args, root, os.path.join(root, "service.log"))
    )
    try:
        with httpx.Client(base_url=service.url, timeout=300) as http:
            status = http.get("/status").raise_for_status().json()
            for start in range(0, len(hits), 64):  # the hit set's entries
                http.post("/features", json={"images": hits[start : start + 64]}).raise_for_status()
            job = http.post("/precompute", json={"data_root": os.path.join(root, "bulk")}).raise_for_status().json()
            job_id = job["job_id"]

            transport = Transport(service.url, timeout=120.0, retries=args.retries)
            warmup = Tally()
            clients = [Client(i, transport, args, hits, miss_root, job_id, warmup) for i in range(args.clients)]
            # The same load first, unmeasured: thread pools, allocator arenas and caches reach their size.
            drive(clients, args.warmup)
            rss_before = service.rss_bytes(http)
            count_429 = requests_with_status(http, "/features", "429")
            tally = Tally()
            for client in clients:
                client.tally = tally
            stop, samples = threading.Event(), []
            sampler = threading.Thread(target=sample_rss, args=(service, service.url, stop, samples), daemon=True)
            sampler.start()
            elapsed = drive(clients, args.duration)
            stop.set()
            sampler.join()
            transport.close()

            job_view = http.get(f"/jobs/{job_id}").json()
            rss_after = service.rss_bytes(http)
            count_429 = requests_with_status(http, "/features", "429") - count_429
            if job_view["state"] in ("queued", "running"):
                http.delete(f"/jobs/{job_id}")
    finally:
        service.stop()

    kinds = {}
    for kind in KINDS:
        lat = tally.latencies.get(kind, [])
        kinds[kind] = {
            "requests": len(lat),
            "errors": tally.errors[kind],
            "images": tally.images[kind],
            "p50_ms": round(1000 * statistics.median(lat), 1) if lat else None,
            "p99_ms": round(1000 * percentile(lat, 99), 1) if lat else None,
            "max_ms": round(1000 * max(lat), 1) if lat else None,
        }
    requests = sum(k["requests"] for k in kinds.values())
    mib = 1024 * 1024
    return {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "service": {"url": service.url, "started_here": args.server is None, "model": status["model"]},
        "settings": {
            "clients": args.clients,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "per_request": args.per_request,
            "mix": args.mix,
            "hits": args.hits,
            "bulk": args.bulk,
            "image": [args.width, args.height],
            "retries": args.retries,
        },
        "elapsed_s": round(elapsed, 2),
        "kinds": kinds,
        "throughput": {
            "requests_per_s": round(requests / elapsed, 1),
            "on_demand_images_per_s": round((kinds["hit"]["images"] + kinds["miss"]["images"]) / elapsed, 1),
        },
        "errors": sum(tally.errors.values()) + sum(warmup.errors.values()),
        "error_examples": warmup.examples + tally.examples,
        "answered_429": count_429,
        "bulk_job": {k: job_view[k] for k in ("state", "total", "computed", "skipped", "failed")},
        "rss_mib": {
            "after_warmup": rss_before and round(rss_before / mib, 1),
            "half_time": round(samples[len(samples) // 2] / mib, 1) if samples else None,
            "peak": round(max(samples) / mib, 1) if samples else None,
            "end": rss_after and round(rss_after / mib, 1),
            "every_second": [round(x / mib, 1) for x in samples],
        },
    }


def report(result: dict) -> None:
    s, m = result["settings"], result["service"]["model"]
    print(
        f"service  {result['service']['url']}  model {m['source']} ({m['parameters']:,} parameters) "
        f"on {', '.join(m['devices'])}; machine {result['machine']['cpus']} CPUs"
    )
    print(
        f"load     {s['clients']} clients x {result['elapsed_s']} s after {s['warmup_s']} s of warm-up, "
        f"{s['per_request']} images per /features, "
        f"mix {s['mix']}, bulk job over {s['bulk']} images"
    )
    rows = [
        (kind, k["requests"], k["errors"], k["p50_ms"], k["p99_ms"], k["max_ms"]) for kind, k in result["kinds"].items()
    ]
    print_table(("kind", "requests", "errors", "p50 ms", "p99 ms", "max ms"), rows)
    t, b, r = result["throughput"], result["bulk_job"], result["rss_mib"]
    print(f"throughput  {t['requests_per_s']} requests/s, {t['on_demand_images_per_s']} on-demand images/s")
    print(f"errors      {result['errors']} seen by clients; {result['answered_429']} answers were 429 (retried)")
    for example in result["error_examples"]:
        print(f"  {example}")
    print(
        f"bulk job    {b['state']}: {b['computed'] + b['skipped'] + b['failed']}/{b['total']} done by the end"
        + ("  (it ended early: raise --bulk to keep it running throughout)" if b["state"] == "finished" else "")
    )
    print(
        f"service RSS {r['after_warmup']} MiB after the warm-up, {r['half_time']} MiB at half time, "
        f"{r['peak']} MiB peak, {r['end']} MiB at the end"
    )


def parse_mix(text: str) -> dict[str, float]:
    mix = {}
    for part in text.split(","):
        kind, _, weight = part.partition("=")
        if kind not in KINDS or not weight:
            raise argparse.ArgumentTypeError(f"--mix takes kind=weight pairs of {', '.join(KINDS)}, got {part!r}")
        mix[kind] = float(weight)
    return mix


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds of the same load before measuring")
    parser.add_argument("--mix", type=parse_mix, default=parse_mix("hit=5,miss=3,status=2"))
    parser.add_argument("--per-request", type=int, default=4, help="images per /features request")
    parser.add_argument("--hits", type=int, default=256, help="images cached before the run")
    parser.add_argument("--bulk", type=int, default=5000, help="images of the bulk job running meanwhile")
    parser.add_argument("--width", type=int, default=80)
    parser.add_argument("--height", type=int, default=60)
    parser.add_argument("--retries", type=int, default=8, help="client retry rounds (429, 5xx, connection errors)")
    parser.add_argument("--server", help="use this running service (its allowed roots must include --dir)")
    parser.add_argument("--model", default=str(TINY_MODEL), help="started service: weights (default: tiny test model)")
    parser.add_argument("--device", default="cpu", help="started service: device")
    parser.add_argument("--size", type=int, default=56, help="started service: preprocess size")
    parser.add_argument("--batch", type=int, default=32, help="started service: frames per batch")
    parser.add_argument(
        "--max-pending",
        type=int,
        default=4096,
        help="started service: on-demand units waiting before it answers 429 (small: exercise 429s)",
    )
    parser.add_argument("--dir", help="where to make the temporary data root (removed at the end)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = parser.parse_args(argv)
    if min(args.clients, args.per_request, args.hits) < 1 or args.duration <= 0 or args.warmup < 0:
        parser.error("--clients, --per-request, --hits and --duration must be positive, --warmup not negative")
    if args.per_request > args.hits:
        parser.error("--per-request cannot exceed --hits")

    root = tempfile.mkdtemp(prefix="vggt-load-", dir=args.dir)
    try:
        result = run(args, os.path.realpath(root))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report(result)
    if args.json:
        write_json(args.json, result)
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
