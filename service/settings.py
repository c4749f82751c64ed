"""Service settings: one dataclass built from CLI flags (or env vars), shared by serve and precompute."""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass, field

from vggt_cache.client.spec import positive_int
from vggt_cache.service.samples import MAX_SAMPLE_BYTES, check_sample_bytes

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
    # With compile: seconds the shapes the spec implies may take to compile before the service reports
    # ready (0: none; shapes left compile when first met). compile_backend: Dynamo's ("eager": tests).
    compile_warmup_s: float = 900.0
    compile_backend: str = "inductor"
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
    # Connections and admission (issue 18). A connection must deliver a request's headers within this long of
    # opening or of its last response, else it is closed (uvicorn's keep-alive timer misses a silent connection).
    header_timeout_s: float = 10.0
    # Open connections at most (lowered at start to fit the descriptor limit); a new one past it closes the
    # oldest idle one, or is answered 503 when none is idle.
    max_connections: int = 1000
    # Plans (`POST /precompute` with dry_run) computed at once; more are answered 429 with Retry-After.
    max_plans: int = 2
    # Host header names accepted besides IP addresses, `localhost` and (bound to a non-loopback address) this
    # machine's names: a DNS-rebinding page sends its own name. "*": any.
    allowed_hosts: list[str] = field(default_factory=list)
    # Shared storage (issue 18): entries and manifests get these permissions whatever the service's umask
    # (0o644: every user's dataloader reads them; 0o640: the group only).
    file_mode: int = 0o644
    # Work one input can make long: a job's sample of more frames fails alone (JanusVLN uses 9, VG-LLM up
    # to 32); SIGTERM abandons a batch still running this long after it (its unit stays pending).
    max_frames_per_sample: int = 64
    shutdown_grace_s: float = 30.0
    # Ended jobs kept in the state dir (with their units and failures): the newest this many, none older.
    job_retention: int = 1000
    job_retention_days: float = 30.0
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
                            ("--max-image-bytes", self.max_image_bytes), ("max_body_bytes", self.max_body_bytes),
                            ("--max-connections", self.max_connections), ("--max-plans", self.max_plans),
                            ("--max-frames-per-sample", self.max_frames_per_sample)):
            positive_int(flag, value)
        try:
            check_sample_bytes(self.max_sample_bytes)
        except ValueError as exc:
            raise ValueError(f"--max-sample-bytes: {exc}") from None
        if isinstance(self.patch_cache_mb, bool) or not isinstance(self.patch_cache_mb, int) or self.patch_cache_mb < 0:
            raise ValueError(f"--patch-cache-mb must be zero or more, got {self.patch_cache_mb!r}")
        positive_int("--job-retention", self.job_retention)
        if not self.job_retention_days > 0:
            raise ValueError(f"--job-retention-days must be a positive number of days, got {self.job_retention_days!r}")
        if not self.body_timeout_s > 0:
            raise ValueError(f"--body-timeout must be a positive number of seconds, got {self.body_timeout_s!r}")
        if not self.header_timeout_s > 0:
            raise ValueError(f"--header-timeout must be a positive number of seconds, got {self.header_timeout_s!r}")
        if any(not h.strip() or any(c in h for c in "/:@ ") for h in self.allowed_hosts):
            raise ValueError(f"--allowed-host takes a host name without port or scheme, got {self.allowed_hosts!r}")
        if not self.shutdown_grace_s > 0:
            raise ValueError(f"--shutdown-grace must be a positive number of seconds, got {self.shutdown_grace_s!r}")
        if not self.compile_warmup_s >= 0:
            raise ValueError(f"--compile-warmup must be zero or more seconds, got {self.compile_warmup_s!r}")
        if not self.max_wait_ms >= 0:
            raise ValueError(f"max_wait_ms must be zero or more, got {self.max_wait_ms!r}")
        check_file_mode(self.file_mode)
        if self.body_buffer_bytes < self.max_body_bytes:
            raise ValueError(f"body_buffer_bytes ({self.body_buffer_bytes}) must hold one body of max_body_bytes "
                             f"({self.max_body_bytes})")

    def warnings(self) -> list[str]:
        """What is allowed but unsafe: logged at start and shown on /status."""
        found = []
        if self.api_token is None and not is_loopback(self.host):
            found.append(f"listening on {self.host}, not a loopback address, without an API token: anyone who can "
                         "reach the port can read features and start jobs (set --api-token)")
        names = host_names(self)
        if names is not None and not self.allowed_hosts and not is_loopback(self.host):
            # Inside a container the machine's name is the container's: clients that use the node's name, a
            # Service name or a CNAME would be refused 421.
            found.append(f"listening on {self.host}: requests must address it by an IP address or one of "
                         f"{', '.join(sorted(names))}; add the names clients use with --allowed-host "
                         "(VGGT_CACHE_ALLOWED_HOST), or they are refused 421")
        # Not refused: a mount may come up after the service; until then every request under it fails.
        found += [f"--allowed-root {root} is not a folder: nothing under it can be served until it exists "
                  "(check the path)" for root in self.allowed_roots if not os.path.isdir(root)]
        return found


def host_names(settings: ServiceSettings) -> frozenset[str] | None:
    """The names a request's Host may give (IP addresses are always accepted); None: any name.

    A page rebound to our address by DNS sends its own name, never an address: names are what to check.
    Bound to a non-loopback address, the machine's own names are how other hosts reach it.
    """
    given = {h.strip().lower().rstrip(".") for h in settings.allowed_hosts}
    if "*" in given:
        return None
    names = {"localhost", settings.host.lower(), *given}
    if not is_loopback(settings.host):
        names |= {socket.gethostname().lower(), socket.getfqdn().lower()}
    return frozenset(names)
def check_file_mode(mode: int) -> None:
    """ValueError unless `mode` is one a cache file may have: read-write for its owner, no execute or special bits."""
    if isinstance(mode, bool) or not isinstance(mode, int) or mode & ~0o666 or mode & 0o600 != 0o600:
        raise ValueError(f"--file-mode must give the owner read and write and nothing beyond 0666 (e.g. 0644, "
                         f"0640), got {oct(mode) if isinstance(mode, int) else repr(mode)}")


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
    -> explicit device names; ValueError for a device this machine does not show, or one named twice."""
    device = device.strip()
    if device == "cpu":
        return ["cpu"]
    if device == "auto":
        return [f"cuda:{i}" for i in range(_cuda_count())] or ["cpu"]
    if device == "cuda":
        return [f"cuda:{i}" for i in range(_visible(device))]
    if device.startswith("cuda:"):
        ids = [s.strip() for s in device[len("cuda:"):].split(",") if s.strip()]
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
        raise ValueError(f"--device {device} names {', '.join(f'cuda:{i}' for i in twice)} more than once: "
                         "give each GPU once (one replica per GPU)")
    past = [i for i in ids if i >= n]
    if past:
        raise ValueError(f"--device {device}: this machine shows {n} CUDA device(s), cuda:0 to cuda:{n - 1}, "
                         f"not cuda:{past[0]} (nvidia-smi and CUDA_VISIBLE_DEVICES say which)")
    return [f"cuda:{i}" for i in ids]
