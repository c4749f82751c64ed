"""`--compile` warm-up: the shapes the spec implies compile before the service is ready (issue 23 item 2).

Dynamo's "eager" backend traces, guards and recompiles exactly as Inductor does, without generating
code (Inductor on this CPU takes minutes a shape), so the graph counts here are the GPU's.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from vggt_cache.client.spec import FeatureSpec, resolve_options
from vggt_cache.service.engine import Engine, Priority
from vggt_cache.service.engine.device import compiled_graphs
from vggt_cache.service.engine.warmup import WarmupShape, warmup_shapes
from vggt_cache.service.model import load_aggregator
from vggt_cache.service.model.resident import VARIANTS_PER_DEVICE, compile_counts
from vggt_cache.service.units import Unit

from helpers.service import TINY_MODEL, free_port, poll, server_in_process

SIZE = 56  # 80x60 images (4:3, as the warm-up assumes) crop to 42x56


@pytest.fixture(scope="module")
def loaded():
    return load_aggregator(str(TINY_MODEL))


def make_spec(loaded, **overrides) -> FeatureSpec:
    return FeatureSpec(
        **{"fingerprint": loaded.fingerprint, "architecture": loaded.config.to_dict(), "size": SIZE, **overrides}
    )


def write_images(folder: Path, n: int, seed: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = folder / f"step_{i}.png"
        Image.fromarray(rng.integers(0, 256, (60, 80, 3), np.uint8)).save(path)
        paths.append(str(path))
    return paths


def test_the_warm_up_set_is_batches_of_one_and_two_of_each_clip_length(loaded) -> None:
    assert warmup_shapes(make_spec(loaded, attention="frame"), 32, 9) == [
        WarmupShape(1, 1, 42, 56),
        WarmupShape(2, 1, 42, 56),
    ]
    causal = warmup_shapes(make_spec(loaded, attention="causal", size=644), 8, 9)
    assert [(s.batch, s.frames) for s in causal] == [
        (1, 1),
        (2, 1),
        (1, 2),
        (2, 2),
        (1, 3),
        (2, 3),
        (1, 4),
        (2, 4),
        *((1, n) for n in range(5, 10)),
    ]
    assert {(s.height, s.width) for s in causal} == {(490, 644)}  # 640x480 at 644 px, as the reference rounds (34.5 up)
    pad = warmup_shapes(make_spec(loaded, attention="sequence", preprocess="pad"), 32, 9)
    assert {(s.height, s.width) for s in pad} == {(SIZE, SIZE)}
    # Every warm-up graph (and about as many met later) fits under the recompile limit of the one code object.
    assert 2 * len(warmup_shapes(make_spec(loaded, attention="causal"), 32, 9)) < VARIANTS_PER_DEVICE


def test_after_the_warm_up_its_shapes_compile_nothing(loaded, tmp_path: Path) -> None:
    spec = make_spec(loaded, attention="causal")
    with Engine(loaded, spec, max_batch_frames=6, max_wait_ms=50, compile=True, compile_backend="eager") as engine:
        report = engine.warm_up(600.0, max_frames=3)
        assert report is not None and report.finished and report.done == report.shapes == 6
        assert report.graphs > 0
        assert engine.stats()["compile"]["warmup"]["finished"] is True
        before, counts = compiled_graphs(), compile_counts()
        # Clips of 1 to 3 frames, several of each, so batches of 1, 2 and 3 clips form.
        clips = [
            write_images(tmp_path / f"ep{length}_{k}", length, 10 * length + k)
            for length in (1, 2, 3)
            for k in range(3)
        ]
        done = [f.result(timeout=120) for f in engine.submit([Unit.causal(c) for c in clips], Priority.ON_DEMAND)]
        assert all(e.status == "computed" for r in done for e in r.entries)
        assert compiled_graphs() == before, "a shape of the warm-up set compiled again"
        assert compile_counts()["frames_not_compiled"] == counts["frames_not_compiled"]
        # The counter does move: a clip length outside the set compiles its graph when first met, on the
        # device thread, past Dynamo's default limit of 8 (its settings are per thread on newer torch).
        longer = write_images(tmp_path / "ep4", 4, 99)
        engine.submit([Unit.causal(longer)], Priority.ON_DEMAND)[0].result(timeout=120)
        assert compiled_graphs() > before


def test_the_warm_up_stops_at_its_budget(loaded, caplog: pytest.LogCaptureFixture) -> None:
    with (
        Engine(loaded, make_spec(loaded), compile=True, compile_backend="eager") as engine,
        caplog.at_level(logging.INFO, logger="vggt_cache"),
    ):
        report = engine.warm_up(0.0)
    assert report is not None and report.done == 0 and not report.finished
    assert any("Compile warm-up stopped after 0 of 2" in r.getMessage() for r in caplog.records)
    with Engine(loaded, make_spec(loaded)) as eager:
        assert eager.warm_up(600.0) is None  # nothing to warm up without --compile


def test_readyz_answers_503_until_the_warm_up_is_over(tmp_path: Path) -> None:
    from vggt_cache.service.settings import ServiceSettings

    release = threading.Event()
    held = threading.Event()

    def hold_warm_up(batch: torch.Tensor) -> None:  # the warm-up's forwards go through the device's hook
        held.set()
        release.wait(120)

    settings = ServiceSettings(
        model=str(TINY_MODEL),
        device="cpu",
        port=free_port(),
        allowed_roots=[str(tmp_path)],
        state_dir=str(tmp_path / "state"),
        spec=resolve_options(None, size=SIZE, attention="frame"),
        compile=True,
        compile_backend="eager",
    )
    with (
        server_in_process(settings, hold_warm_up, on_exit=release.set) as (url, _),
        httpx.Client(base_url=url, timeout=10) as http,
    ):
        poll(lambda: held.is_set(), 120, "the warm-up's first forward")
        ready = http.get("/readyz")
        assert ready.status_code == 503 and ready.json()["state"] == "warming up"
        release.set()
        poll(lambda: http.get("/readyz").status_code == 200, 120, "/readyz after the warm-up")
        warmup = http.get("/status").json()["engine"]["compile"]["warmup"]
        assert warmup["finished"] is True and warmup["done"] == 2
