"""Service settings: one typed definition per setting, from which every view of it derives.

Each `ServiceSettings` field carries a `Setting` in its metadata: its flag, help, parser and bounds.
From that table come the `vggt-cache` flags (`settingflags.add_settings`), their `VGGT_CACHE_<FLAG>` variables
(`read_variable`, the one reader of the service's environment), `ServiceSettings.check` and the
`/status` view (`ServiceSettings.view`).
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from vggt_cache.client.service import ENV_PREFIX
from vggt_cache.client.spec import positive_int
from vggt_cache.service.samples import MAX_SAMPLE_BYTES, check_sample_bytes

DEFAULT_MODEL = "facebook/VGGT-1B"
DEFAULT_PORT = 8600
TRUE_WORDS = ("true", "1", "yes")


def read_variable(name: str) -> str | None:
    """The environment variable `name`, or None: the one place the service's settings and commands read it."""
    return os.environ.get(name)


def env_flag(name: str) -> bool:
    """The seed's convention: ``true``, ``1`` or ``yes`` (any case) switch a feature on."""
    return is_true(read_variable(name))


def is_true(text: str | None) -> bool:
    return (text or "").strip().lower() in TRUE_WORDS


@dataclass(frozen=True)
class Setting:
    """How a `ServiceSettings` field appears outside the code (see `setting`)."""

    flag: str | None  # its `vggt-cache` flag, whose name gives the variable; None: set in code only
    help: str  # `{env}` stands for its variable
    parse: Callable[[str], Any] | None  # the text of its flag or variable -> the value; None: the field's type
    check: Callable[[str, Any], None] | None  # ValueError naming the setting, for a value that cannot be meant
    aliases: tuple[str, ...]  # further spellings of the flag (the seed's underscores)
    separator: str | None  # a repeatable flag, whose variable lists its values split by this
    required: bool  # a flag the command requires unless its variable is set
    metavar: str | None
    shown: bool  # on /status (not: a secret, or what /status shows elsewhere)
    text: Callable[[Any], Any]  # the value as --help and /status show it

    @property
    def env(self) -> str | None:
        return None if self.flag is None else ENV_PREFIX + self.flag[2:].upper().replace("-", "_")


def setting(
    default: Any,
    flag: str | None = None,
    help: str = "",
    *,
    parse: Callable[[str], Any] | None = None,
    check: Callable[[str, Any], None] | None = None,
    aliases: tuple[str, ...] = (),
    separator: str | None = None,
    required: bool = False,
    metavar: str | None = None,
    shown: bool = True,
    text: Callable[[Any], Any] = lambda value: value,
) -> Any:
    """A `ServiceSettings` field with its `Setting`."""
    meta = {"setting": Setting(flag, help, parse, check, aliases, separator, required, metavar, shown, text)}
    if isinstance(default, dict):
        return field(default_factory=dict, metadata=meta)
    return field(default=default, metadata=meta)


# Bounds: each raises ValueError naming the setting (its flag, else its field) and the value refused.
def _positive(name: str, value: Any) -> None:
    positive_int(name, value)


def _count(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be zero or more, got {value!r}")


def _not_negative(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{name} must be zero or more, got {value!r}")


def _positive_number(unit: str) -> Callable[[str, Any], None]:
    def check(name: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{name} must be a positive number of {unit}, got {value!r}")

    return check


def _sample_bytes(name: str, value: Any) -> None:
    try:
        check_sample_bytes(value)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None


def _token(name: str, value: Any) -> None:
    if value is not None and not value.strip():
        raise ValueError(
            "the API token (--api-token or its environment variable) is set but empty: give a "
            "token, or unset it to run without authentication"
        )


def _host_names(name: str, value: Any) -> None:
    if any(not h.strip() or any(c in h for c in "/:@ ") for h in value):
        raise ValueError(f"{name} takes a host name without port or scheme, got {list(value)!r}")


def _file_mode(name: str, value: Any) -> None:
    check_file_mode(value)


def parse_octal(text: str) -> int:
    try:
        return int(text, 8)
    except ValueError:
        raise ValueError(f"expected an octal mode such as 0644, got {text!r}") from None


def parse_sample_bytes(text: str) -> int:
    return check_sample_bytes(int(text))


_SECONDS = _positive_number("seconds")


@dataclass(frozen=True)
class ServiceSettings:
    """What a service (or an in-process precompute) runs with; `check` before use."""

    model: str = setting(DEFAULT_MODEL, "--model", "Hugging Face id (from the local HF cache), folder or weights file")
    device: str = setting(
        "auto", "--device", "auto (every visible GPU, else the CPU), cpu, cuda (all GPUs), cuda:0 or cuda:0,1"
    )
    host: str = setting("127.0.0.1", "--host", "address to listen on (0.0.0.0: every interface)")
    port: int = setting(DEFAULT_PORT, "--port", "TCP port")
    allowed_roots: tuple[str, ...] = setting(
        (),
        "--allowed-root",
        "folder the service may read and write (repeatable; or {env}, colon-separated)",
        aliases=("--allowed_root",),
        separator=":",
        required=True,
        metavar="DIR",
    )
    state_dir: str = setting(
        os.path.expanduser("~/.local/state/vggt-cache"),
        "--state-dir",
        "where job state (SQLite) lives; keep it on local disk",
        aliases=("--state_dir",),
        parse=os.path.expanduser,
    )
    # Given by the token flags, a file or TOKEN_ENV (commands.common.api_token); /status says only whether it is set.
    api_token: str | None = setting(None, check=_token, shown=False)
    # FeatureSpec fields other than the model's, from the spec flags (specflags.py; /status shows the spec).
    spec: dict = setting({}, shown=False)  # noqa: RUF009 (setting() gives a dict default a default_factory)
    # The engine (service/engine).
    max_batch_frames: int = setting(
        32, "--max-batch-frames", "frames per device batch", aliases=("--max_batch_frames",), check=_positive
    )
    max_wait_ms: float = setting(5.0, check=_not_negative)  # a decoded unit's wait for company in its batch
    decode_workers: int = setting(
        4, "--decode-workers", "threads decoding and preprocessing images while the device computes", check=_positive
    )
    write_workers: int = setting(
        4, "--write-workers", "threads writing cache files (each fsyncs) while the device computes", check=_positive
    )
    # Per device: DINOv2 tokens of recent frames (8.7 MB a frame at 644 px), for the clips that share them.
    patch_cache_mb: int = setting(
        4096,
        "--patch-cache-mb",
        "per device, MiB for the DINOv2 tokens of recent frames, computed once for every "
        "clip that shares the frame (sequence/causal; 0: within a batch only)",
        check=_count,
    )
    fp32_weights: bool = setting(
        False,
        "--fp32-weights",
        "on CUDA with 16-bit entries, keep float32 weights under bfloat16 autocast instead "
        "of resident bfloat16 weights",
    )
    compile: bool = setting(
        False, "--compile", "torch.compile the transformer blocks (slow first batches of each shape)"
    )
    # With compile: the shapes the spec implies compile before the service reports ready (0: none; shapes
    # left compile when first met). compile_backend: Dynamo's ("eager" in tests: inductor takes minutes a shape).
    compile_warmup_s: float = setting(
        900.0,
        "--compile-warmup",
        "with --compile, seconds to compile the shapes the spec implies before the "
        "service reports ready (0: none; the rest compile when first met)",
        check=_not_negative,
    )
    compile_backend: str = setting("inductor")
    # The bulk backlog is the back-pressure on a job's runner; hints (non-blocking bulk requests) get room above it.
    bulk_queue_batches: int = setting(
        2,
        "--bulk-queue-batches",
        "a job's units queued for the devices, in batches per device; the job waits past it",
        check=_positive,
    )
    hint_queue_batches: int = setting(
        8,
        "--hint-queue-batches",
        'further room, in batches, for prefetch hints (requests with "wait": false) '
        "while a job keeps its backlog full; past it they are refused (429)",
        check=_count,
    )
    frame_cache_frames: int = setting(
        64,
        "--frame-cache-frames",
        "preprocessed frames kept per device lane, decoded once for the clips that share them (sequence/causal)",
        check=_count,
    )
    # Requests: a body or item count past these is a 413, a deeper on-demand queue a 429.
    max_body_bytes: int = setting(4 * 1024 * 1024, check=_positive)
    max_items_per_request: int = setting(
        512, "--max-items-per-request", "images per /features request; more is a 413", check=_positive
    )
    max_pending_units: int = setting(
        4096, "--max-pending", "on-demand units waiting for the device; past it /features answers 429", check=_positive
    )
    # An image file larger than this fails unread (a decoded image is bounded by MAX_PIXELS too).
    max_image_bytes: int = setting(
        256 * 1024 * 1024,
        "--max-image-bytes",
        "image files larger than this fail unread (and are counted unreadable by a plan)",
        check=_positive,
    )
    body_timeout_s: float = setting(
        30.0,
        "--body-timeout",
        "seconds a request body may take to arrive whole; past it the request is refused "
        "(408) and its connection closed",
        check=_SECONDS,
    )
    # Request bodies buffered at once, all requests together; past it a request is a 503 (memory stays bounded).
    body_buffer_bytes: int = setting(16 * 1024 * 1024, check=_positive)
    # Connections and admission (issue 18); uvicorn's keep-alive timer misses a silent connection.
    header_timeout_s: float = setting(
        10.0,
        "--header-timeout",
        "seconds a connection may go without a request's complete headers (from its "
        "opening or its last response); past it the connection is closed",
        check=_SECONDS,
    )
    max_connections: int = setting(
        1000,
        "--max-connections",
        "open connections at most (lowered to fit the descriptor limit); a new one closes "
        "the oldest idle one, or is answered 503",
        check=_positive,
    )
    max_plans: int = setting(
        2, "--max-plans", "dry runs (plans) computed at once; more are answered 429 with Retry-After", check=_positive
    )
    # Host header names accepted besides IP addresses, `localhost` and (bound to a non-loopback address) this
    # machine's names: a DNS-rebinding page sends its own name. "*": any.
    allowed_hosts: tuple[str, ...] = setting(
        (),
        "--allowed-host",
        "a host name clients address the service by, besides IP addresses, localhost and "
        "(with a non-loopback --host) this machine's names (repeatable; or {env}, comma-separated; '*': any)",
        separator=",",
        metavar="NAME",
        check=_host_names,
    )
    # Shared storage (issue 18): every user's dataloader reads 0644 entries, the group only 0640 ones.
    file_mode: int = setting(
        0o644,
        "--file-mode",
        "permissions of the entries and manifests written, whatever the umask (0644: readable "
        "by every user; 0640: by the group only)",
        parse=parse_octal,
        check=_file_mode,
        text=lambda mode: f"{mode:04o}",
    )
    # Work one input can make long (JanusVLN uses 9 frames a sample, VG-LLM up to 32).
    max_frames_per_sample: int = setting(
        64,
        "--max-frames-per-sample",
        "a job's sample (clip) of more frames fails alone, with the reason",
        check=_positive,
    )
    shutdown_grace_s: float = setting(
        30.0,
        "--shutdown-grace",
        "seconds SIGTERM waits for the work in flight before the service exits anyway "
        "(an abandoned unit stays pending for the next start)",
        check=_SECONDS,
    )
    job_retention: int = setting(
        1000,
        "--job-retention",
        "ended jobs kept in the state dir (with their failures); older ones are pruned",
        check=_positive,
    )
    job_retention_days: float = setting(
        30.0,
        "--job-retention-days",
        "days an ended job is kept in the state dir before it is pruned",
        check=_positive_number("days"),
    )
    # Sample files are read one sample at a time, so memory stays bounded whatever a file holds.
    max_sample_bytes: int = setting(
        MAX_SAMPLE_BYTES,
        "--max-sample-bytes",
        "a sample (jsonl line, JSON array element) larger than this is a problem, not read",
        aliases=("--max_sample_bytes",),
        parse=parse_sample_bytes,
        check=_sample_bytes,
    )

    def __post_init__(self) -> None:
        for name in ("allowed_roots", "allowed_hosts"):  # lists welcome; held as tuples
            object.__setattr__(self, name, tuple(getattr(self, name)))

    @classmethod
    def from_args(cls, args: argparse.Namespace, **overrides: Any) -> ServiceSettings:
        """The settings of a command line: each flag `add_settings` added (None: not given), then `overrides`."""
        given = {f.name: getattr(args, f.name) for f in _flagged() if getattr(args, f.name, None) is not None}
        return cls(**{**given, **overrides})

    def check(self) -> None:
        """Raise ValueError naming the first setting that cannot be meant: checked before the service starts."""
        for f in dataclasses.fields(self):
            s = f.metadata["setting"]
            if s.check is not None:
                s.check(s.flag or f.name, getattr(self, f.name))
        if self.body_buffer_bytes < self.max_body_bytes:
            raise ValueError(
                f"body_buffer_bytes ({self.body_buffer_bytes}) must hold one body of max_body_bytes "
                f"({self.max_body_bytes})"
            )

    def view(self) -> dict[str, Any]:
        """The settings as `/status` shows them (`service.settings`): the token and the spec left out."""
        return {
            f.name: _json(f.metadata["setting"].text(getattr(self, f.name)))
            for f in dataclasses.fields(self)
            if f.metadata["setting"].shown
        }

    def warnings(self) -> list[str]:
        """What is allowed but unsafe: logged at start and shown on /status."""
        found = []
        if self.api_token is None and not is_loopback(self.host):
            found.append(
                f"listening on {self.host}, not a loopback address, without an API token: anyone who can "
                "reach the port can read features and start jobs (set --api-token)"
            )
        names = host_names(self)
        if names is not None and not self.allowed_hosts and not is_loopback(self.host):
            # Inside a container the machine's name is the container's: clients that use the node's name, a
            # Service name or a CNAME would be refused 421.
            found.append(
                f"listening on {self.host}: requests must address it by an IP address or one of "
                f"{', '.join(sorted(names))}; add the names clients use with --allowed-host "
                "(VGGT_CACHE_ALLOWED_HOST), or they are refused 421"
            )
        # Not refused: a mount may come up after the service; until then every request under it fails.
        found += [
            f"--allowed-root {root} is not a folder: nothing under it can be served until it exists (check the path)"
            for root in self.allowed_roots
            if not os.path.isdir(root)
        ]
        return found


def _json(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _flagged() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(ServiceSettings) if f.metadata["setting"].flag is not None]


SETTINGS: Mapping[str, Setting] = {f.name: f.metadata["setting"] for f in dataclasses.fields(ServiceSettings)}


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
        raise ValueError(
            f"--file-mode must give the owner read and write and nothing beyond 0666 (e.g. 0644, "
            f"0640), got {oct(mode) if isinstance(mode, int) else repr(mode)}"
        )


def is_loopback(host: str) -> bool:
    """True for `localhost` and loopback addresses; every other name or address may be reachable from elsewhere."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
