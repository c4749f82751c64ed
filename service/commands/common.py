"""What the subcommands share: output lines, settings from flags, the token, the client, errors said as such."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
from collections.abc import Iterator
from typing import Any

from vggt_cache.client.service import TOKEN_ENV
from vggt_cache.client.text import displayable
from vggt_cache.service.devices import parse_devices
from vggt_cache.service.errors import CommandError
from vggt_cache.service.settings import ServiceSettings, read_variable
from vggt_cache.service.specflags import spec_options

log = logging.getLogger("vggt_cache")
PROGRESS_POLL_S = 1.0  # how often a followed job's progress is read (not a test's synchronisation)


def say(line: str) -> None:
    """One line of a command's output: names in it come from others' files, so it is made `displayable`."""
    print(displayable(line))


def say_json(body: object) -> None:
    """`--json` output: ASCII-escaped, so no name in it reaches the terminal as a control character."""
    print(json.dumps(body, indent=2, ensure_ascii=True))


def settings_of(args: argparse.Namespace, **overrides: object) -> ServiceSettings:
    """The settings the command line gives (flags, else variables, else defaults), checked before any model loads."""
    try:
        settings = ServiceSettings.from_args(args, spec=spec_options(args), **overrides)
        settings.check()
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    return settings


def check_device(device: str) -> None:
    """A `--device` this machine cannot give is said before anything is loaded."""
    try:
        parse_devices(device)
    except ValueError as exc:
        raise CommandError(str(exc)) from None


@contextlib.contextmanager
def loading_model(source: str, *errors: type[Exception]) -> Iterator[None]:
    """A model that cannot be read or does not fit (`errors`) is the user's to fix: one line naming the source."""
    try:
        yield
    except errors as exc:
        raise CommandError(f"cannot load the VGGT model {source}: {exc} (check --vggt_model_path / --model)") from exc


def no_folder(path: str) -> CommandError:
    return CommandError(f"no such folder: {path} (give the data root that holds the images and sample files)")


def api_token(args: argparse.Namespace) -> str | None:
    """The bearer token: `--api-token-file`, else `--api-token` (with a warning: `ps` shows it), else the variable."""
    from vggt_cache.client.service import read_token_file

    if args.api_token is not None and args.api_token_file:
        raise CommandError("give --api-token or --api-token-file, not both")
    if args.api_token_file:
        try:
            return read_token_file(args.api_token_file)
        except (OSError, ValueError) as exc:
            raise CommandError(f"--api-token-file {args.api_token_file}: {exc}") from None
    if args.api_token is not None:
        log.warning(
            "--api-token on the command line can be read by every user of this machine (ps): put it in a "
            "file readable by you alone (--api-token-file) or in $%s",
            TOKEN_ENV,
        )
        return args.api_token
    return read_variable(TOKEN_ENV)


def client(args: argparse.Namespace, **options: Any):
    """A ServiceClient of `--server` (`options`: its keyword arguments); a URL that is not one is the user's to fix."""
    from vggt_cache.client.service import ServiceClient

    try:
        return ServiceClient(args.server, api_token(args), **options)
    except ValueError as exc:
        raise CommandError(f"--server {args.server}: {exc}") from None
