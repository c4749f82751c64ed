"""`vggt-cache` command line: serve, precompute, verify, convert, status, demo."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import NoReturn, overload

from vggt_cache.client.logs import setup_logging
from vggt_cache.client.service import TOKEN_ENV, ServiceError
from vggt_cache.client.spec import STORAGES, positive_int
from vggt_cache.service.convert import ESTIMATE_SAMPLES
from vggt_cache.service.errors import CommandError, UnusableInput
from vggt_cache.service.samples import DEFAULT_MAX_HISTORY, check_history, check_sample_bytes, file_list
from vggt_cache.service.settings import DEFAULT_MODEL, DEFAULT_PORT, ServiceSettings, env_flag
from vggt_cache.service.specflags import ENV_PREFIX, add_spec_flags

log = logging.getLogger("vggt_cache")
DEFAULT_SERVER = f"http://127.0.0.1:{DEFAULT_PORT}"
DEBUG_ENV = f"{ENV_PREFIX}DEBUG"


@overload
def _env(name: str, default: str) -> str: ...
@overload
def _env(name: str, default: None = None) -> str | None: ...
def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"{ENV_PREFIX}{name}", default)


_DEFAULTS = ServiceSettings()


class _Parser(argparse.ArgumentParser):
    """argparse's parser, with a usage error said in one `[ERROR]` line that points at `--help`."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"[ERROR] {message} (see `{self.prog} --help`)\n")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default, `(required)` where it is; nothing for an option that is off or unset by default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or "(default:" in text or not action.option_strings:
            return text
        if action.required:
            return f"{text} (required)"
        if action.default in (None, False, argparse.SUPPRESS) or action.const is False:  # off, or a --no-X
            return text
        return f"{text} (default: %(default)s)"


def _common_flags() -> _Parser:
    # SUPPRESS: a subcommand's copy of a flag must not overwrite the one given before the subcommand.
    common = _Parser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug log lines")
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help=f"show the traceback of an error (or set {DEBUG_ENV}=1)")
    return common


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    defaults = _DEFAULTS
    p.add_argument("--max-batch-frames", "--max_batch_frames", type=int,
                   default=int(_env("MAX_BATCH_FRAMES", str(defaults.max_batch_frames))),
                   help="frames per device batch")
    p.add_argument("--decode-workers", type=int, default=int(_env("DECODE_WORKERS", str(defaults.decode_workers))),
                   help="threads decoding and preprocessing images while the device computes")
    p.add_argument("--write-workers", type=int, default=int(_env("WRITE_WORKERS", str(defaults.write_workers))),
                   help="threads writing cache files (each fsyncs) while the device computes")
    p.add_argument("--max-image-bytes", type=int, default=int(_env("MAX_IMAGE_BYTES", str(defaults.max_image_bytes))),
                   help="image files larger than this fail unread (and are counted unreadable by a plan)")
    p.add_argument("--max-frames-per-sample", type=int,
                   default=int(_env("MAX_FRAMES_PER_SAMPLE", str(defaults.max_frames_per_sample))),
                   help="a job's sample (clip) of more frames fails alone, with the reason")
    add_sample_bytes_flag(p)
    p.add_argument("--patch-cache-mb", type=int, default=int(_env("PATCH_CACHE_MB", str(defaults.patch_cache_mb))),
                   help="per device, MiB for the DINOv2 tokens of recent frames, computed once for every clip "
                        "that shares the frame (sequence/causal; 0: within a batch only)")
    p.add_argument("--fp32-weights", action="store_true", default=env_flag(f"{ENV_PREFIX}FP32_WEIGHTS"),
                   help="on CUDA with 16-bit entries, keep float32 weights under bfloat16 autocast instead of "
                        "resident bfloat16 weights")
    p.add_argument("--compile", action="store_true", default=env_flag(f"{ENV_PREFIX}COMPILE"),
                   help="torch.compile the transformer blocks (slow first batches of each shape)")
    p.add_argument("--state-dir", "--state_dir", default=_env("STATE_DIR", ServiceSettings.state_dir),
                   help="where job state (SQLite) lives; keep it on local disk")
    p.add_argument("--file-mode", type=_octal, default=_octal(_env("FILE_MODE", f"{defaults.file_mode:04o}")),
                   help="permissions of the entries and manifests written, whatever the umask "
                        "(0644: readable by every user; 0640: by the group only)")
    p.add_argument("--job-retention", type=int, default=int(_env("JOB_RETENTION", str(defaults.job_retention))),
                   help="ended jobs kept in the state dir (with their failures); older ones are pruned")
    p.add_argument("--job-retention-days", type=float,
                   default=float(_env("JOB_RETENTION_DAYS", str(defaults.job_retention_days))),
                   help="days an ended job is kept in the state dir before it is pruned")


def _octal(text: str) -> int:
    try:
        return int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an octal mode such as 0644, got {text!r}") from None


def add_device_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=_env("DEVICE", _DEFAULTS.device),
                   help="auto (every visible GPU, else the CPU), cpu, cuda (all GPUs), cuda:0 or cuda:0,1")


def add_token_flags(p: argparse.ArgumentParser, what: str) -> None:
    # No default from the environment here: commands.api_token tells a token on the command line (seen by
    # every local user in `ps`) from the safe ways, the file and the variable.
    p.add_argument("--api-token", "--api_token", default=None,
                   help=f"{what} (visible to other users in `ps`: prefer --api-token-file or ${TOKEN_ENV})")
    p.add_argument("--api-token-file", default=_env("API_TOKEN_FILE"), metavar="PATH",
                   help=f"read the token from this file (or ${ENV_PREFIX}API_TOKEN_FILE); else ${TOKEN_ENV}")


def add_server_flags(p: argparse.ArgumentParser, default: str | None, help: str) -> None:
    p.add_argument("--server", default=default, help=help)
    add_token_flags(p, "bearer token of a service started with a token")


def _history(text: str) -> int:
    try:
        return check_history(int(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(text: str) -> int:
    try:
        return positive_int("the value", int(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_history_flag(p: argparse.ArgumentParser, default: int | None = DEFAULT_MAX_HISTORY) -> None:
    shown = default if default is not None else f"the manifest's, else {DEFAULT_MAX_HISTORY}"
    p.add_argument("--max_history_images", "--max-history-images", type=_history, default=default,
                   help="episode folders (step_<n>_<ACTION>.png): history frames per sample, as the training "
                        f"flag of the same name (default: {shown})")


def _sample_bytes(text: str) -> int:
    try:
        return check_sample_bytes(int(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_sample_bytes_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-sample-bytes", "--max_sample_bytes", type=_sample_bytes,
                   default=int(_env("MAX_SAMPLE_BYTES", str(_DEFAULTS.max_sample_bytes))),
                   help="a sample (jsonl line, JSON array element) larger than this is a problem, not read")


def add_files_flag(p: argparse.ArgumentParser, default_text: str = "(default: every one found)") -> None:
    p.add_argument("--data_files", "--data-files", type=file_list, default=None,
                   help="comma-separated sample files, relative to the data root unless absolute, as the "
                        f"training flag of the same name {default_text}")


def _env_roots() -> list[str]:
    return [r for r in (_env("ALLOWED_ROOT") or "").split(":") if r]


def build_parser() -> argparse.ArgumentParser:
    common = _common_flags()
    parser = _Parser(prog="vggt-cache", description=__doc__, parents=[common], formatter_class=_Help)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, parents=[common], formatter_class=_Help)

    serve = command("serve", "run the feature-cache service (VGGT resident on the device)")
    serve.add_argument("--model", default=_env("MODEL", DEFAULT_MODEL),
                       help="Hugging Face id (from the local HF cache), folder or weights file")
    add_device_flag(serve)
    serve.add_argument("--host", default=_env("HOST", _DEFAULTS.host),
                       help="address to listen on (0.0.0.0: every interface)")
    serve.add_argument("--port", type=int, default=int(_env("PORT", str(DEFAULT_PORT))), help="TCP port")
    roots = _env_roots()
    serve.add_argument("--allowed-root", "--allowed_root", action="append", dest="allowed_roots", metavar="DIR",
                       default=roots or None, required=not roots,
                       help=f"folder the service may read and write (repeatable; or ${ENV_PREFIX}ALLOWED_ROOT, "
                            "colon-separated)")
    add_token_flags(serve, "require 'Authorization: Bearer <token>' on every route but the health probes")
    serve.add_argument("--max-items-per-request", type=int,
                       default=int(_env("MAX_ITEMS_PER_REQUEST", str(_DEFAULTS.max_items_per_request))),
                       help="images per /features request; more is a 413")
    serve.add_argument("--max-pending", type=int, default=int(_env("MAX_PENDING", str(_DEFAULTS.max_pending_units))),
                       help="on-demand units waiting for the device; past it /features answers 429")
    serve.add_argument("--shutdown-grace", type=float,
                       default=float(_env("SHUTDOWN_GRACE", str(_DEFAULTS.shutdown_grace_s))),
                       help="seconds SIGTERM waits for the work in flight before the service exits anyway "
                            "(an abandoned unit stays pending for the next start)")
    serve.add_argument("--body-timeout", type=float, default=float(_env("BODY_TIMEOUT", str(_DEFAULTS.body_timeout_s))),
                       help="seconds a request body may take to arrive whole; past it the request is refused (408) "
                            "and its connection closed")
    serve.add_argument("--header-timeout", type=float,
                       default=float(_env("HEADER_TIMEOUT", str(_DEFAULTS.header_timeout_s))),
                       help="seconds a connection may go without a request's complete headers (from its opening or "
                            "its last response); past it the connection is closed")
    serve.add_argument("--max-connections", type=int,
                       default=int(_env("MAX_CONNECTIONS", str(_DEFAULTS.max_connections))),
                       help="open connections at most (lowered to fit the descriptor limit); a new one closes the "
                            "oldest idle one, or is answered 503")
    serve.add_argument("--max-plans", type=int, default=int(_env("MAX_PLANS", str(_DEFAULTS.max_plans))),
                       help="dry runs (plans) computed at once; more are answered 429 with Retry-After")
    serve.add_argument("--allowed-host", action="append", dest="allowed_hosts", metavar="NAME",
                       default=[h for h in (_env("ALLOWED_HOST") or "").split(",") if h.strip()],
                       help="a host name clients address the service by, besides IP addresses, localhost and "
                            "(with a non-loopback --host) this machine's names (repeatable; or "
                            f"${ENV_PREFIX}ALLOWED_HOST, comma-separated; '*': any)")
    add_engine_flags(serve)
    add_spec_flags(serve)

    pre = command("precompute", "compute every feature under a data root (in-process or via --server)")
    pre.add_argument("--data_root", "--data-root", required=True, help="folder of the images and sample files")
    pre.add_argument("--vggt_model_path", "--vggt-model-path", "--model", dest="model",
                     default=_env("MODEL", DEFAULT_MODEL), help="VGGT weights: HF id, folder or file")
    pre.add_argument("--model_path", "--model-path", dest="llm_model_path", default=None,
                     help="accepted for compatibility with the seed's script and ignored (VGGT needs no LLM)")
    add_server_flags(pre, None, "submit the job to a running service instead of computing here")
    pre.add_argument("--batch_size", "--batch-size", type=int, default=None,
                     help="frames per device batch (alias of --max-batch-frames)")
    add_device_flag(pre)
    # One default with the API's: valid work is never recomputed unless asked for.
    pre.add_argument("--skip_existing", "--skip-existing", action="store_true", default=True,
                     help="skip entries that already validate (stale or foreign ones are recomputed); the default, "
                          "accepted for the seed's scripts")
    pre.add_argument("--no-skip-existing", "--no_skip_existing", dest="skip_existing", action="store_false",
                     help="recompute every entry, valid ones too")
    pre.add_argument("--verify", action="store_true", help="re-read every written entry")
    pre.add_argument("--data_path", "--data-path", default=None,
                     help="folder the samples' image paths are relative to (default: the JSONL file's folder)")
    add_files_flag(pre)
    pre.add_argument("--allowed-root", "--allowed_root", action="append", dest="allowed_roots", metavar="DIR",
                     default=None,
                     help="further folders samples may name images in (repeatable; the data root always is)")
    add_history_flag(pre)
    pre.add_argument("--dry-run", "--dry_run", action="store_true",
                     help="plan only, without loading the model: samples found, entries valid / to compute, "
                          "bytes to write, free space")
    pre.add_argument("--force", action="store_true",
                     help="start even if the plan says the new entries will not fit on the file system")
    pre.add_argument("--overwrite", action="store_true",
                     help="replace valid entries computed with another clip (another history); without it they "
                          "are kept and counted")
    add_engine_flags(pre)
    add_spec_flags(pre)

    ver = command("verify", "check every cache entry under a data root; exit 1 if any is not valid")
    ver.add_argument("data_root", help="folder of the images and sample files")
    add_server_flags(ver, None, "take the expected spec from this service's /status "
                                "(default: from the data root's manifest)")
    ver.add_argument("--data_path", "--data-path", default=None,
                     help="folder the samples' image paths are relative to (default: the sample file's folder)")
    add_files_flag(ver, "(default: the manifest's, else every one found)")
    add_history_flag(ver, default=None)
    add_sample_bytes_flag(ver)
    ver.add_argument("--json", action="store_true", help="print the counts as JSON")
    ver.add_argument("--estimate-storage", "--estimate_storage", action="store_true",
                     help="instead of verifying: sample the entries under the root and print, per storage "
                          "(raw|packed|fp8), the bytes they would take, the ratio and fp8's error")
    ver.add_argument("--samples", type=_positive, default=ESTIMATE_SAMPLES,
                     help="entries --estimate-storage encodes (default: %(default)s)")

    conv = command("convert", "rewrite the valid entries under a data root in another storage, without recomputing")
    conv.add_argument("data_root", help="folder of the images and their cache entries")
    conv.add_argument("--storage", choices=STORAGES, default="packed",
                      help="the storage to write (default: %(default)s); fp8 entries are never converted back")
    conv.add_argument("--json", action="store_true", help="print the counts as JSON")

    st = command("status", "show a running service's model, queues and jobs")
    add_server_flags(st, os.environ.get("VGGT_SERVICE_URL", DEFAULT_SERVER), "the service's URL")
    st.add_argument("--json", action="store_true", help="print /status as JSON")

    demo = command("demo", "a first look: a tiny model and data root, end to end, no GPU or downloads")
    demo.add_argument("--keep", action="store_true", help="keep the temporary data root")
    demo.add_argument("--port", type=int, default=0, help="port of the demo's service (0: a free one)")
    return parser


def failure_message(exc: BaseException) -> tuple[str, int]:
    """What to print for an error that stopped a command, and the exit code."""
    if isinstance(exc, CommandError):
        return str(exc), exc.exit_code
    if isinstance(exc, UnusableInput):  # a data root or option that cannot be used: the message says why
        return str(exc), 2
    if isinstance(exc, ServiceError):
        if exc.status is None:
            return f"cannot reach the service: {exc}; start `vggt-cache serve` there, or fix --server", 2
        return f"the service refused: {exc}", 2
    return (f"{type(exc).__name__}: {exc} (unexpected: rerun with --debug for the traceback, "
            "and report it if the message does not say what to change)"), 1


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = getattr(args, "debug", False) or env_flag(DEBUG_ENV)
    setup_logging(getattr(args, "verbose", False))
    from vggt_cache.service import commands

    try:
        return getattr(commands, args.command)(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # every error ends here: one line, the traceback only when asked for
        message, code = failure_message(exc)
        log.error("%s", message, exc_info=exc if debug else None)
        return code


if __name__ == "__main__":
    sys.exit(main())
