"""Log set-up for our `vggt_cache` logger: the seed's `[INFO] ...` / `[WARN] ...` lines on stderr.

The CLI and the training entry point both call it; libraries only log (they never configure).
"""

from __future__ import annotations

import logging
import sys

LOGGER = "vggt_cache"


def setup_logging(verbose: bool = False, main_process: bool = True) -> logging.Logger:
    """Our logger on stderr: DEBUG with `verbose`, WARNING on all but the main process (training ranks)."""
    logging.addLevelName(logging.WARNING, "WARN")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[%(levelname)s] %(message)s"))
    log = logging.getLogger(LOGGER)
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.DEBUG if verbose else logging.INFO if main_process else logging.WARNING)
    return log
