"""`vggt-cache demo`: the whole loop on any machine, no GPU and no downloads.

The built-in `tiny` aggregator (fixed random weights) stands in for VGGT-1B; everything
else (service, jobs, sibling files, client) is the real thing.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from vggt_cache.client.http import wait_until_ready
from vggt_cache.service.model.loader import TINY_DIR, TINY_SOURCE

# The built-in tiny model's architecture (2 layers, VGGT's structure), for benchmarks that want random weights.
DEMO_CONFIG = json.loads(Path(TINY_DIR, "config.json").read_text(encoding="utf-8"))  # package data, not user input
DEMO_SIZE = 112


def write_demo_data(root: str, scenes: int = 3, frames: int = 4, seed: int = 0) -> list[list[str]]:
    """Scenes of gradient images plus a JSONL of samples in the seed's shape (history_images + current_image)."""
    rng = np.random.default_rng(seed)
    clips = []
    with open(os.path.join(root, "train.jsonl"), "w") as samples:
        for s in range(scenes):
            scene = os.path.join(root, f"scene{s:03d}")
            os.makedirs(scene, exist_ok=True)
            paths = []
            for t in range(frames):
                y, x = np.mgrid[0:96, 0:128]
                img = np.stack(
                    [(x * 2 + 40 * t) % 256, (y * 2 + 60 * s) % 256, rng.integers(0, 256, size=x.shape)], -1
                ).astype(np.uint8)
                path = os.path.join(scene, f"img_{t:04d}.jpg")
                Image.fromarray(img).save(path, quality=90)
                paths.append(path)
            clips.append(paths)
            for t in range(1, frames):
                rel = [os.path.relpath(p, root) for p in paths[: t + 1]]
                samples.write(
                    json.dumps(
                        {
                            "history_images": rel[:-1],
                            "current_image": rel[-1],
                            "instruction": "walk to the door",
                            "answer": "forward",
                        }
                    )
                    + "\n"
                )
    return clips


def free_port() -> int:
    """A loopback port free right now (for a service started next)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _say(text: str) -> None:
    print(f"[demo] {text}", flush=True)


def run_demo(keep: bool = False, port: int = 0) -> int:
    from vggt_cache.client import FeatureCache
    from vggt_cache.client.cachefile import cache_path
    from vggt_cache.client.service import ServiceClient
    from vggt_cache.service.jobs.view import JobView
    from vggt_cache.service.progress import follow_job

    work = tempfile.mkdtemp(prefix="vggt-cache-demo-")
    data_root = os.path.join(work, "data")
    os.makedirs(data_root)
    clips = write_demo_data(data_root)
    images = [p for clip in clips for p in clip]
    _say(f"made {len(images)} images in {len(clips)} scenes and train.jsonl under {data_root}")

    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable,
        "-m",
        "vggt_cache.service.cli",
        "serve",
        "--model",
        TINY_SOURCE,
        "--device",
        "cpu",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--allowed-root",
        data_root,
        "--state-dir",
        os.path.join(work, "state"),
        "--size",
        str(DEMO_SIZE),
        "--dtype",
        "float32",
    ]
    _say("starting: " + " ".join(cmd[2:]))
    server = subprocess.Popen(cmd)
    try:
        if not wait_until_ready(url, 120, is_alive=lambda: server.poll() is None):
            _say("the service did not become ready")
            return 1
        with ServiceClient(url) as service:
            _say(f"service ready at {url} (status page: {url}/)")
            job_id = service.precompute(data_root)["job_id"]
            job = follow_job(
                lambda: JobView.from_dict(service.job(job_id)),
                lambda v: v is not None and not v.state.active,
                lambda: time.sleep(0.2),
                "precompute",
            )
            assert job is not None  # done() above holds for a view only
            _say(f"job {job.state.value}: {job.computed} computed, {job.skipped} skipped, {job.failed} failed")

            cache = FeatureCache(service_url=url)
            feats = cache.get_many(images)
            assert feats[0] is not None  # the job above computed every image's entry
            _say(
                f"read {sum(f is not None for f in feats)} cached features from sibling files, "
                f"shape {tuple(feats[0].shape)} each"
            )
            removed = images[::5]
            for p in removed:
                os.remove(cache_path(p))
            _say(f"deleted {len(removed)} cache files; asking again ...")
            feats = cache.get_many(images)
            refilled = sum(os.path.exists(cache_path(p)) for p in removed)
            _say(
                f"the service filled {refilled}/{len(removed)} on demand in one request; client counters: {cache.stats}"
            )
            _say(f"example: {images[0]}  ->  {cache_path(images[0])}")
    finally:
        server.terminate()
        server.wait(30)
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    _say(f"files kept under {work}" if keep else "done (rerun with --keep to look at the files)")
    return 0
