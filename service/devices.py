"""Device names: what `--device` means on this machine, and the GPU of a launcher's rank."""

from __future__ import annotations


def parse_devices(device: str) -> list[str]:
    """`auto` (every visible GPU, else the CPU), `cpu`, `cuda` (every visible GPU), `cuda:1` or `cuda:0,1`
    -> explicit device names; ValueError for a device this machine does not show, or one named twice."""
    device = device.strip()
    if device == "cpu":
        return ["cpu"]
    if device == "auto":
        return [f"cuda:{i}" for i in range(_cuda_count())] or ["cpu"]
    if device == "cuda":
        return [f"cuda:{i}" for i in range(_visible(device))]
    if device.startswith("cuda:"):
        ids = [s.strip() for s in device[len("cuda:") :].split(",") if s.strip()]
        if ids and all(s.isdigit() for s in ids):
            return _explicit(device, [int(s) for s in ids])
    raise ValueError(f"--device must be auto, cpu, cuda, cuda:N or cuda:N,M; got {device!r}")


def rank_device(device: str, local_rank: int) -> str:
    """The GPU of launcher rank `local_rank` for `--device cuda`/`auto`: `local_rank` modulo the visible count,
    since launchers that show each rank only its own GPU (Slurm --gpus-per-task=1) make every rank's `cuda:0`."""
    return f"cuda:{local_rank % _visible(device)}"


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count()


def _visible(device: str) -> int:
    n = _cuda_count()
    if n == 0:
        raise ValueError(f"--device {device}: no CUDA device is visible (use --device cpu)")
    return n


def _explicit(device: str, ids: list[int]) -> list[str]:
    n = _visible(device)
    if len(set(ids)) != len(ids):
        twice = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(
            f"--device {device} names {', '.join(f'cuda:{i}' for i in twice)} more than once: "
            "give each GPU once (one replica per GPU)"
        )
    past = [i for i in ids if i >= n]
    if past:
        raise ValueError(
            f"--device {device}: this machine shows {n} CUDA device(s), cuda:0 to cuda:{n - 1}, "
            f"not cuda:{past[0]} (nvidia-smi and CUDA_VISIBLE_DEVICES say which)"
        )
    return [f"cuda:{i}" for i in ids]
