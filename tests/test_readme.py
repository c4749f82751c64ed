"""The README's "Try it on a CPU" block, run as written: serve `tiny`, precompute, train two steps, read back."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.service import free_port

REPO = Path(__file__).resolve().parent.parent
RUN_TIMEOUT_S = 240


def readme_block(heading: str) -> str:
    """The first ```bash block after `heading` in the README."""
    text = (REPO / "README.md").read_text()
    section = text[text.index(f"\n{heading}\n") :]
    found = re.search(r"```bash\n(.*?)```", section, re.S)
    assert found, f"no bash block under {heading}"
    return found.group(1)


def checkout_bin(folder: Path) -> Path:
    """A `vggt-cache` that runs this checkout (what `pip install -e .` gives), first on PATH."""
    folder.mkdir()
    script = folder / "vggt-cache"
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m vggt_cache.service.cli "$@"\n')
    script.chmod(0o755)
    return folder


@pytest.mark.slow
def test_the_cpu_section_runs_as_written(tmp_path):
    block = readme_block("## Try it on a CPU")
    path = f"{checkout_bin(tmp_path / 'bin')}:{Path(sys.executable).parent}:/usr/bin:/bin"
    env = {
        **os.environ,
        "PATH": path,
        "PYTHONPATH": str(REPO),
        "PORT": str(free_port()),
        "TRY": str(tmp_path / "try"),
        "PYTHONUNBUFFERED": "1",
    }
    proc = subprocess.Popen(
        ["bash", "-e", "-c", block],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        with contextlib.suppress(ProcessLookupError):  # the background service too, whatever happened
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-4000:]
    assert "finished: 4 total, 4 computed, 0 skipped, 0 failed" in out, out[-4000:]
    assert "VGGT features by source over 4 sample(s): cache=4, service=0, online=0" in out, out[-4000:]
    assert "hit 4, missing 0, stale 0, corrupt 0, spec_mismatch 0" in out
    assert "torch.Size([64, 128])" in out  # 112 px padded: 8 x 8 patches of the tiny model's 2 x 64 channels
    assert "Traceback" not in out and "[WARN]" not in out
