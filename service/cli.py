"""`vggt-cache` command line: serve, precompute, verify, convert, status, demo."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import NoReturn

from vggt_cache.client.logs import setup_logging
from vggt_cache.client.service import TOKEN_ENV, ServiceError
from vggt_cache.client.spec import STORAGES, positive_int
from vggt_cache.client.text import error_text
from vggt_cache.service.convert import ESTIMATE_SAMPLES
from vggt_cache.service.errors import CommandError, UnusableInput
from vggt_cache.service.samples import DEFAULT_MAX_HISTORY, check_history, file_list
from vggt_cache.service.settingflags import ENGINE, SERVE_LIMITS, add_setting, add_settings
from vggt_cache.service.settings import DEFAULT_PORT, is_true, read_variable
from vggt_cache.service.specflags import ENV_PREFIX, add_spec_flags

log = logging.getLogger("vggt_cache")
DEFAULT_SERVER = f"http://127.0.0.1:{DEFAULT_PORT}"
DEBUG_ENV = f"{ENV_PREFIX}DEBUG"
TOKEN_FILE_ENV = f"{ENV_PREFIX}API_TOKEN_FILE"
SERVICE_URL_ENV = "VGGT_SERVICE_URL"  # as training's --vggt_service_url reads it


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
    common.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help=f"show the traceback of an error (or set {DEBUG_ENV}=1)",
    )
    return common


def add_token_flags(p: argparse.ArgumentParser, what: str) -> None:
    # No default from the environment here: commands.common.api_token tells a token on the command line (seen by
    # every local user in `ps`) from the safe ways, the file and the variable.
    p.add_argument(
        "--api-token",
        "--api_token",
        default=None,
        help=f"{what} (visible to other users in `ps`: prefer --api-token-file or ${TOKEN_ENV})",
    )
    p.add_argument(
        "--api-token-file",
        default=read_variable(TOKEN_FILE_ENV),
        metavar="PATH",
        help=f"read the token from this file (or ${TOKEN_FILE_ENV}); else ${TOKEN_ENV}",
    )


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
    p.add_argument(
        "--max_history_images",
        "--max-history-images",
        type=_history,
        default=default,
        help="episode folders (step_<n>_<ACTION>.png): history frames per sample, as the training "
        f"flag of the same name (default: {shown})",
    )


def add_files_flag(p: argparse.ArgumentParser, default_text: str = "(default: every one found)") -> None:
    p.add_argument(
        "--data_files",
        "--data-files",
        type=file_list,
        default=None,
        help="comma-separated sample files, relative to the data root unless absolute, as the "
        f"training flag of the same name {default_text}",
    )


def build_parser() -> argparse.ArgumentParser:
    common = _common_flags()
    parser = _Parser(prog="vggt-cache", description=__doc__, parents=[common], formatter_class=_Help)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, parents=[common], formatter_class=_Help)

    serve = command("serve", "run the feature-cache service (VGGT resident on the device)")
    add_settings(serve, "model", "device", "host", "port", "allowed_roots")
    add_token_flags(serve, "require 'Authorization: Bearer <token>' on every route but the health probes")
    add_settings(serve, *SERVE_LIMITS, *ENGINE)
    add_spec_flags(serve)

    pre = command("precompute", "compute every feature under a data root (in-process or via --server)")
    pre.add_argument("--data_root", "--data-root", required=True, help="folder of the images and sample files")
    add_setting(
        pre, "model", ("--vggt_model_path", "--vggt-model-path", "--model"), "VGGT weights: HF id, folder or file"
    )
    pre.add_argument(
        "--model_path",
        "--model-path",
        dest="llm_model_path",
        default=None,
        help="accepted for compatibility with the seed's script and ignored (VGGT needs no LLM)",
    )
    add_server_flags(pre, None, "submit the job to a running service instead of computing here")
    pre.add_argument(
        "--batch_size",
        "--batch-size",
        type=int,
        default=None,
        help="frames per device batch (alias of --max-batch-frames)",
    )
    add_settings(pre, "device")
    # One default with the API's: valid work is never recomputed unless asked for.
    pre.add_argument(
        "--skip_existing",
        "--skip-existing",
        action="store_true",
        default=True,
        help="skip entries that already validate (stale or foreign ones are recomputed); the default, "
        "accepted for the seed's scripts",
    )
    pre.add_argument(
        "--no-skip-existing",
        "--no_skip_existing",
        dest="skip_existing",
        action="store_false",
        help="recompute every entry, valid ones too",
    )
    pre.add_argument("--verify", action="store_true", help="re-read every written entry")
    pre.add_argument(
        "--data_path",
        "--data-path",
        default=None,
        help="folder the samples' image paths are relative to (default: the JSONL file's folder)",
    )
    add_files_flag(pre)
    pre.add_argument(
        "--allowed-root",
        "--allowed_root",
        action="append",
        dest="allowed_roots",
        metavar="DIR",
        default=None,
        help="further folders samples may name images in (repeatable; the data root always is)",
    )
    add_history_flag(pre)
    pre.add_argument(
        "--dry-run",
        "--dry_run",
        action="store_true",
        help="plan only, without loading the model: samples found, entries valid / to compute, "
        "bytes to write, free space",
    )
    pre.add_argument(
        "--force",
        action="store_true",
        help="start even if the plan says the new entries will not fit on the file system",
    )
    pre.add_argument(
        "--overwrite",
        action="store_true",
        help="replace valid entries computed with another clip (another history); without it they are kept and counted",
    )
    add_settings(pre, *ENGINE)
    add_spec_flags(pre)

    ver = command("verify", "check every cache entry under a data root; exit 1 if any is not valid")
    ver.add_argument("data_root", help="folder of the images and sample files")
    add_server_flags(
        ver, None, "take the expected spec from this service's /status (default: from the data root's manifest)"
    )
    ver.add_argument(
        "--data_path",
        "--data-path",
        default=None,
        help="folder the samples' image paths are relative to (default: the sample file's folder)",
    )
    add_files_flag(ver, "(default: the manifest's, else every one found)")
    add_history_flag(ver, default=None)
    add_settings(ver, "max_sample_bytes")
    ver.add_argument("--json", action="store_true", help="print the counts as JSON")
    ver.add_argument(
        "--estimate-storage",
        "--estimate_storage",
        action="store_true",
        help="instead of verifying: sample the entries under the root and print, per storage "
        "(raw|packed|fp8), the bytes they would take, the ratio and fp8's error",
    )
    ver.add_argument(
        "--samples",
        type=_positive,
        default=ESTIMATE_SAMPLES,
        help="entries --estimate-storage encodes (default: %(default)s)",
    )

    conv = command("convert", "rewrite the valid entries under a data root in another storage, without recomputing")
    conv.add_argument("data_root", help="folder of the images and their cache entries")
    conv.add_argument(
        "--storage",
        choices=STORAGES,
        default="packed",
        help="the storage to write (default: %(default)s); fp8 entries are never converted back",
    )
    conv.add_argument("--json", action="store_true", help="print the counts as JSON")

    st = command("status", "show a running service's model, queues and jobs")
    add_server_flags(st, read_variable(SERVICE_URL_ENV) or DEFAULT_SERVER, "the service's URL")
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
    return (
        f"{error_text(exc)} (unexpected: rerun with --debug for the traceback, "
        "and report it if the message does not say what to change)"
    ), 1


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = getattr(args, "debug", False) or is_true(read_variable(DEBUG_ENV))
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
