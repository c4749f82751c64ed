"""What the first run on a GPU node relies on, tested as far as a CPU can (issue 23, issue 19 item 3).

Device counts are faked through `torch.cuda.device_count`; CUDA errors are raised on the CPU by the
engine's before_forward hook with the messages CUDA gives; `benchmarks/gpu_check.sh --cpu-smoke` runs
the GPU node's check end to end on the tiny model.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import httpx
import pytest
import torch

from vggt_cache.client.wire import decode_features
from vggt_cache.service.devices import parse_devices, rank_device
from vggt_cache.service.engine.device import is_device_lost, is_out_of_memory
from vggt_cache.service.model import load_aggregator

from helpers.cli import cli, one_error
from helpers.service import REPO, TINY_MODEL, free_port, service_in_process, write_images

ILLEGAL_ACCESS = (
    "CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be "
    "asynchronously reported at some other API call"
)


@pytest.fixture
def gpus(monkeypatch: pytest.MonkeyPatch):
    """fake(n): this process sees n CUDA devices."""

    def fake(n: int) -> None:
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)

    return fake


# --- devices: one line for a device this machine lacks (issue 19 item 3, issue 23 item 3) -----------------


def test_device_indices_past_the_visible_count_or_named_twice_are_refused(gpus) -> None:
    gpus(2)
    assert parse_devices("cuda:1") == ["cuda:1"] and parse_devices("cuda:1,0") == ["cuda:1", "cuda:0"]
    with pytest.raises(ValueError, match=r"shows 2 CUDA device\(s\), cuda:0 to cuda:1, not cuda:3"):
        parse_devices("cuda:0,3")
    with pytest.raises(ValueError, match="names cuda:0 more than once"):
        parse_devices("cuda:0,0")
    gpus(0)
    for device in ("cuda:0", "cuda:3", "cuda"):
        with pytest.raises(ValueError, match=f"--device {device}: no CUDA device is visible"):
            parse_devices(device)


def test_a_rank_shown_one_gpu_takes_cuda_0(gpus) -> None:
    # Slurm --gpus-per-task=1: each rank sees its own GPU as cuda:0, whatever its LOCAL_RANK.
    gpus(1)
    assert [rank_device("cuda", r) for r in range(3)] == ["cuda:0"] * 3
    gpus(4)
    assert [rank_device("auto", r) for r in (0, 3, 5)] == ["cuda:0", "cuda:3", "cuda:1"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize("command, device", [("serve", "cuda:0"), ("serve", "cuda:0,0"), ("precompute", "cuda:3")])
def test_a_cuda_index_on_a_machine_without_one_is_one_line_before_serving(
    command: str, device: str, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    write_images(root, ["a.png"])
    args = (
        ("--allowed-root", str(root), "--model", str(TINY_MODEL), "--port", str(free_port()))
        if command == "serve"
        else ("--data_root", str(root), "--vggt_model_path", str(TINY_MODEL))
    )
    run = cli(command, *args, "--device", device, "--state-dir", str(tmp_path / "state"))
    one_error(run, f"--device {device}: no CUDA device is visible (use --device cpu)")
    assert "Loading VGGT model" not in run.stdout and "Serving on" not in run.stdout


# --- out of memory, whoever says it (issue 23 item 4) ----------------------------------------------------


@pytest.mark.parametrize(
    "exc",
    [
        torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
        RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),
        RuntimeError("CUDA error: out of memory"),
        RuntimeError("[enforce fail at alloc_cpu.cpp:118] DefaultCPUAllocator: can't allocate memory"),
    ],
)
def test_every_allocation_failure_is_out_of_memory(exc: BaseException) -> None:
    assert is_out_of_memory(exc) and not is_device_lost(exc)


@pytest.mark.parametrize(
    "exc",
    [
        RuntimeError("shape '[2, 3]' is invalid for input of size 5"),
        ValueError("out of memory"),
        RuntimeError(ILLEGAL_ACCESS),
    ],
)
def test_other_errors_are_not_out_of_memory(exc: BaseException) -> None:
    assert not is_out_of_memory(exc)


def test_the_benchmark_and_the_engine_share_the_predicate() -> None:
    text = (REPO / "benchmarks" / "gpu_throughput.py").read_text()
    assert "from vggt_cache.service.engine.device import is_out_of_memory" in text and "_is_oom" not in text


# --- a lost device (issue 23 item 5) ----------------------------------------------------------------------


class LoseDevice:
    """before_forward: the first forward ends as an illegal memory access does; later ones are counted."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, batch: torch.Tensor) -> None:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError(ILLEGAL_ACCESS)


def test_a_device_lost_to_a_fatal_cuda_error_is_not_ready_and_says_why(tmp_path: Path) -> None:
    root = tmp_path / "root"
    images = [str(p) for p in write_images(root, ["a.png", "b.png"])]
    hook = LoseDevice()
    with service_in_process(root, tmp_path / "state", hook) as url, httpx.Client(base_url=url, timeout=60) as http:
        first = http.post("/features", json={"images": images[:1]})
        item = decode_features(first.content)[0][0]
        assert item["status"] == "failed" and "illegal memory access" in item["error"], item
        ready = http.get("/readyz")
        assert ready.status_code == 503 and ready.json()["state"] == "device lost"
        health = http.get("/healthz")  # the only device: nothing will recover without a restart
        assert health.status_code == 503 and "cpu: device lost: RuntimeError: CUDA error" in health.json()["error"]
        device = http.get("/status").json()["engine"]["devices"][0]
        assert device["failed"].startswith("device lost: RuntimeError: CUDA error: an illegal memory access")
        second = http.post("/features", json={"images": images[1:]})
        assert second.status_code == 503, second.text
    assert hook.calls == 1, "a lost device ran another forward"


def test_a_lost_device_hands_later_work_to_the_others(tmp_path: Path) -> None:
    from vggt_cache.service.engine import Engine
    from vggt_cache.service.units import Unit

    from helpers.engine import images, make_spec

    loaded = load_aggregator(str(TINY_MODEL))
    hook = LoseDevice()
    with Engine(loaded, make_spec(loaded), devices=["cpu", "cpu"], max_batch_frames=1, before_forward=hook) as engine:
        first = engine.submit([Unit.frame(images(tmp_path / "a", 1)[0])])[0].result(timeout=60)
        assert first.entries[0].status == "failed"
        assert not engine.ready and next(iter(engine.lost_devices.values())).startswith("device lost")
        later = [f.result(timeout=60) for f in engine.submit([Unit.frame(p) for p in images(tmp_path / "b", 4)])]
        assert [r.entries[0].status for r in later] == ["computed"] * 4
        lost, alive = sorted(engine.stats()["devices"], key=lambda d: d["failed"] is None)
        assert lost["batches"] == 0 and alive["batches"] == 4


# --- what /status says of the device (issue 23 items 2 and 6) ---------------------------------------------


def test_compile_counts_grow_with_each_new_shape() -> None:
    # Each clip length compiles anew: /status's engine.compile shows it (graphs growing while serving).
    from vggt_cache.service.model.resident import compile_counts

    before = compile_counts()
    double = torch.compile(lambda x: x * 2, backend="eager", dynamic=False)
    for frames in (1, 2, 3):
        double(torch.zeros(1, frames, 3))
    after = compile_counts()
    assert after["graphs"] - before["graphs"] >= 3 and after["frames_not_compiled"] == before["frames_not_compiled"]


def test_compile_raises_the_limit_under_its_older_name_on_older_torch() -> None:
    # torch 2.4/2.5 (allowed by pyproject) call it cache_size_limit; recompile_limit does not exist there.
    import types

    from vggt_cache.service.model.resident import raise_recompile_limit

    older, newer = types.SimpleNamespace(cache_size_limit=8), types.SimpleNamespace(recompile_limit=8)
    raise_recompile_limit(older, 64)
    raise_recompile_limit(newer, 64)
    assert vars(older) == {"cache_size_limit": 64} and vars(newer) == {"recompile_limit": 64}


def test_a_batch_that_compiles_is_logged_with_its_shape(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Stands in for a compiled block meeting a new clip length: the hook compiles once per new shape.
    from vggt_cache.service.engine import Engine
    from vggt_cache.service.units import Unit

    from helpers.engine import images, make_spec

    double = torch.compile(lambda x: x * 2, backend="eager", dynamic=False)
    loaded = load_aggregator(str(TINY_MODEL))
    with (
        caplog.at_level("WARNING", logger="vggt_cache"),
        Engine(
            loaded,
            make_spec(loaded, attention="causal"),
            max_batch_frames=3,
            before_forward=lambda batch: double(batch[:, :, :1, :1, :1]),
        ) as engine,
    ):
        frames = images(tmp_path, 3)
        for clip in ([frames[0]], frames[:2], frames[:2]):  # two new clip lengths, then a known one
            engine.submit([Unit.causal(clip)])[0].result(timeout=60)
    compiles = [r.getMessage() for r in caplog.records if "compiled" in r.getMessage()]
    assert len(compiles) == 2, compiles
    assert compiles[1].startswith("cpu compiled 1 new graph(s) for a batch of 1 unit(s) of 2 frame(s)")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA memory counters need a GPU (benchmarks/gpu_check.sh)")
def test_cuda_memory_in_status_has_reserved_and_peaks(tmp_path: Path) -> None:
    from vggt_cache.service.engine import Engine
    from vggt_cache.service.units import Unit

    from helpers.engine import images, make_spec

    loaded = load_aggregator(str(TINY_MODEL))
    with Engine(loaded, make_spec(loaded), devices=["cuda:0"]) as engine:
        engine.submit([Unit.frame(images(tmp_path, 1)[0])])[0].result(timeout=120)
        memory = engine.stats()["devices"][0]["memory"]
    assert memory["max_reserved_bytes"] >= memory["reserved_bytes"] >= memory["allocated_bytes"] > 0
    assert memory["max_allocated_bytes"] >= memory["allocated_bytes"]


# --- the GPU check, rehearsed on the CPU (issue 23 item 7) ------------------------------------------------


@pytest.mark.gpu_check_smoke
@pytest.mark.timeout(450)  # ~70 s alone on 2 cores; busy neighbours have tripled it
def test_gpu_check_cpu_smoke_runs_every_step_and_writes_the_summary(tmp_path: Path) -> None:
    out = tmp_path / "check"
    run = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--cpu-smoke", str(out)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=420,
    )
    assert run.returncode == 0, run.stdout[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] is True, summary
    assert {s["name"] for s in summary["steps"]} >= {"model", "serve", "precompute", "precompute-rerun", "throughput"}
    assert all(s["rc"] == 0 for s in summary["steps"]), summary["steps"]
    assert summary["serve"]["images_per_s"] > 0 and summary["serve"]["entry_status"] == "computed"
    assert summary["precompute"]["rerun_computed"] == 0 and summary["precompute"]["computed"] > 0
    assert summary["throughput"]["best_frames_per_s"] > 0
    for step in summary["steps"]:
        assert (out / step["log"]).is_file()
