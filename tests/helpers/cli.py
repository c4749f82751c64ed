"""The CLI as a user runs it: a `vggt-cache` process, and the shape of its one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys

from helpers.service import REPO


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m vggt_cache.service.cli ARGS`, stdout and stderr together in `.stdout`."""
    return subprocess.run(
        [sys.executable, "-m", "vggt_cache.service.cli", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )


def one_error(run: subprocess.CompletedProcess, says: str, code: int = 2) -> str:
    """The run failed with `code` and exactly one `[ERROR]` line containing `says`, without a traceback."""
    assert run.returncode == code, run.stdout
    assert "Traceback" not in run.stdout, run.stdout
    errors = [line for line in run.stdout.splitlines() if line.startswith("[ERROR]")]
    assert len(errors) == 1 and says in errors[0], run.stdout
    return errors[0]
