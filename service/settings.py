"""Service settings: one dataclass built from CLI flags (or env vars), shared by serve and precompute."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field

from client.spec import positive_int
from service.samples import MAX_SAMPLE_BYTES, check_sample_bytes

DEFAULT_MODEL = "facebook/VGGT-1B"
DEFAULT_PORT = 8600
TRUE_WORDS = ("true", "1", "yes")


def env_flag(name: str) -> bool:
    """The seed's convention: ``true``, ``1`` or ``yes`` (any case) switch a feature on."""
    return os.environ.get(name, "").strip().lower() in TRUE_WORDS


@dataclass
class ServiceSettings:
    model: str = DEFAULT_MODEL
    device: str = "auto"  # every visible GPU, else the CPU
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    allowed_roots: list[str] = field(default_factory=list)
    state_dir: str = os.path.expanduser("~/.local/state/vggt-cache")
    api_token: str | None = None
    # FeatureSpec fields other than the model's (layers, tokens, preprocess, size, align, dtype, attention);
    # unset ones take FeatureSpec's defaults.
    spec: dict = field(default_factory=dict)
    max_batch_frames: int = 32
    max_wait_ms: float = 5.0
    decode_workers: int = 4
    write_workers: int = 4
    # Per device: DINOv2 tokens of recent frames (8.7 MB a frame at 644 px), for the clips that share them.
    patch_cache_mb: int = 4096
    fp32_weights: bool = False  # CUDA with 16-bit entries: keep float32 weights under autocast
    compile: bool = False  # torch.compile the transformer blocks
    # Request limits: a body or item count past these is a 413, a deeper on-demand queue a 429.
    max_body_bytes: int = 4 * 1024 * 1024
    max_items_per_request: int = 512
    max_pending_units: int = 4096
    # An image file larger than this fails unread (a decoded image is bounded by MAX_PIXELS too).
    max_image_bytes: int = 256 * 1024 * 1024
    # A request body not received whole this long after its headers is answered 408, its connection closed.
    body_timeout_s: float = 30.0
    # Request bodies buffered at once, all requests together; past it a request is a 503 (memory stays bounded).
    body_buffer_bytes: int = 16 * 1024 * 1024
    # Sample files are read one sample at a time: a jsonl line or JSON array element larger than this is a
    # problem of the plan, not read (memory stays bounded whatever a file holds).
    max_sample_bytes: int = MAX_SAMPLE_BYTES

    def check(self) -> None:
        """Raise ValueError naming the first setting that cannot be meant: checked before the service starts."""
        if self.api_token is not None and not self.api_token.strip():
            raise ValueError("the API token (--api-token or its environment variable) is set but empty: give a "
                             "token, or unset it to run without authentication")
        for flag, value in (("--max-items-per-request", self.max_items_per_request),
                            ("--max-pending", self.max_pending_units), ("--max-batch-frames", self.max_batch_frames),
                            ("--decode-workers", self.decode_workers), ("--write-workers", self.write_workers),
                            ("--max-image-bytes", self.max_image_bytes), ("max_body_bytes", self.max_body_bytes)):
            positive_int(flag, value)
        try:
            check_sample_bytes(self.max_sample_bytes)
        except ValueError as exc:
            raise ValueError(f"--max-sample-bytes: {exc}") from None
        if isinstance(self.patch_cache_mb, bool) or not isinstance(self.patch_cache_mb, int) or self.patch_cache_mb < 0:
            raise ValueError(f"--patch-cache-mb must be zero or more, got {self.patch_cache_mb!r}")
        if not self.body_timeout_s > 0:
            raise ValueError(f"--body-timeout must be a positive number of seconds, got {self.body_timeout_s!r}")
        if not self.max_wait_ms >= 0:
            raise ValueError(f"max_wait_ms must be zero or more, got {self.max_wait_ms!r}")
        if self.body_buffer_bytes < self.max_body_bytes:
            raise ValueError(f"body_buffer_bytes ({self.body_buffer_bytes}) must hold one body of max_body_bytes "
                             f"({self.max_body_bytes})")

    def warnings(self) -> list[str]:
        """What is allowed but unsafe: logged at start and shown on /status."""
        if self.api_token is None and not is_loopback(self.host):
            return [f"listening on {self.host}, not a loopback address, without an API token: anyone who can "
                    "reach the port can read features and start jobs (set --api-token)"]
        return []


def is_loopback(host: str) -> bool:
    """True for `localhost` and loopback addresses; every other name or address may be reachable from elsewhere."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_devices(device: str) -> list[str]:
    """`auto` (every visible GPU, else the CPU), `cpu`, `cuda` (every visible GPU), `cuda:1` or `cuda:0,1`
    -> explicit device names."""
    device = device.strip()
    if device == "cpu":
        return ["cpu"]
    if device == "auto":
        import torch

        return [f"cuda:{i}" for i in range(torch.cuda.device_count())] or ["cpu"]
    if device == "cuda":
        import torch

        n = torch.cuda.device_count()
        if n == 0:
            raise ValueError("--device cuda: no CUDA device is visible (use --device cpu)")
        return [f"cuda:{i}" for i in range(n)]
    if device.startswith("cuda:"):
        ids = [s.strip() for s in device[len("cuda:"):].split(",") if s.strip()]
        if ids and all(s.isdigit() for s in ids):
            return [f"cuda:{s}" for s in ids]
    raise ValueError(f"--device must be auto, cpu, cuda, cuda:N or cuda:N,M; got {device!r}")
