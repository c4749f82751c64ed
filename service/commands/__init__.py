"""What each `vggt-cache` subcommand does (argument parsing lives in cli.py), a module per command group.

A command that cannot go on raises `CommandError` (what is wrong and what to do); cli.py prints it as
one `[ERROR]` line.
"""

from vggt_cache.service.commands.entries import convert, verify
from vggt_cache.service.commands.precompute import precompute
from vggt_cache.service.commands.serve import serve
from vggt_cache.service.commands.status import demo, status

__all__ = ["convert", "demo", "precompute", "serve", "status", "verify"]
