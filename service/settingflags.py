"""Service settings on the command line: each setting's flag, from its definition in `settings.py`.

A flag defaults to its `VGGT_CACHE_<FLAG>` variable, else to the setting's default, and its
`dest` is the field's name, so `ServiceSettings.from_args` takes the parsed values back.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from vggt_cache.service.settings import SETTINGS, ServiceSettings, is_true, read_variable
from vggt_cache.service.specflags import argparse_type


def add_settings(p: argparse.ArgumentParser, *names: str) -> None:
    """The flags of settings `names`, each defaulting to its variable, else to its default (shown by --help)."""
    for name in names:
        add_setting(p, name)


def add_setting(
    p: argparse.ArgumentParser, name: str, spellings: Sequence[str] | None = None, help: str | None = None
) -> None:
    """The flag of setting `name`; `spellings` and `help` replace its own where a command words it otherwise."""
    s = SETTINGS[name]
    if s.flag is None:
        raise ValueError(f"setting {name} has no flag")
    env = s.env
    assert env is not None  # a setting with a flag has a variable
    default = ServiceSettings.__dataclass_fields__[name].default
    variable = read_variable(env)
    flags = spellings or (s.flag, *s.aliases)
    text = (help or s.help).format(env=f"${env}")
    if isinstance(default, bool):
        p.add_argument(
            *flags,
            action="store_true",
            default=is_true(variable) if variable is not None else default,
            dest=name,
            help=text,
        )
    elif s.separator is not None:
        listed = [v for v in (variable or "").split(s.separator) if v.strip()]
        p.add_argument(
            *flags,
            action="append",
            metavar=s.metavar,
            default=listed or None,
            required=s.required and not listed,
            dest=name,
            help=text,
        )
    else:
        # A string default is parsed as the flag's text would be: a bad variable is a usage error naming the flag.
        parse = s.parse or type(default)
        p.add_argument(
            *flags,
            type=parse if parse in (int, float, str) else argparse_type(parse),
            metavar=s.metavar or s.flag[2:].upper().replace("-", "_"),
            default=variable if variable is not None else s.text(default),
            dest=name,
            help=text,
        )


# The settings each command takes, in the order its --help lists them.
SERVE_LIMITS = (
    "max_items_per_request",
    "max_pending_units",
    "shutdown_grace_s",
    "body_timeout_s",
    "header_timeout_s",
    "max_connections",
    "max_plans",
    "allowed_hosts",
)
ENGINE = (
    "max_batch_frames",
    "decode_workers",
    "write_workers",
    "max_image_bytes",
    "max_frames_per_sample",
    "max_sample_bytes",
    "patch_cache_mb",
    "fp32_weights",
    "compile",
    "compile_warmup_s",
    "bulk_queue_batches",
    "hint_queue_batches",
    "frame_cache_frames",
    "state_dir",
    "file_mode",
    "job_retention",
    "job_retention_days",
)
