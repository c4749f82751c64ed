"""Log set-up for our `vggt_cache` logger: the seed's `[INFO] ...` / `[WARN] ...` lines on stderr.

The CLI and the training entry point both call it; libraries only log (they never configure).
"""

from __future__ import annotations

import logging
import sys

from vggt_cache.client.text import displayable

LOGGER = "vggt_cache"


class LineFormatter(logging.Formatter):
    """`[LEVEL] message`, each record one line whatever names it carries.

    A message is made `displayable` (a file name's newline cannot forge an `[ERROR]` line, nor its
    `ESC [` rewrite the terminal); a traceback keeps its lines, each indented and made displayable,
    so none of them can pass for a record either.
    """

    def __init__(self) -> None:
        super().__init__("[%(levelname)s] %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = displayable(record.message)
        return super().formatMessage(record)

    def formatException(self, ei) -> str:
        return "\n".join("  " + displayable(line) for line in super().formatException(ei).splitlines())

    def formatStack(self, stack_info: str) -> str:
        return "\n".join("  " + displayable(line) for line in stack_info.splitlines())


def setup_logging(verbose: bool = False, main_process: bool = True) -> logging.Logger:
    """Our logger on stderr: DEBUG with `verbose`, WARNING on all but the main process (training ranks)."""
    logging.addLevelName(logging.WARNING, "WARN")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LineFormatter())
    log = logging.getLogger(LOGGER)
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.DEBUG if verbose else logging.INFO if main_process else logging.WARNING)
    return log
