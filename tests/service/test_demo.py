"""`vggt-cache demo` runs the whole loop on a CPU with no downloads."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path


def test_demo_runs_end_to_end(tmp_path):
    # The installed console script, from a folder outside the checkout: what a newcomer runs.
    script = Path(sys.executable).parent / "vggt-cache"
    proc = subprocess.run(
        [str(script), "demo", "--keep"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
        env={"TMPDIR": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert re.search(r"job finished: 12 computed, 0 skipped, 0 failed", out), out[-3000:]
    assert "read 12 cached features from sibling files" in out
    assert re.search(r"the service filled 3/3 on demand in one request", out)
    assert "[INFO] VGGT feature cache enabled (loading from image directories)" in out
    assert "\r" not in out and "Traceback" not in out  # piped: plain lines, no bar frames
    caches = list(tmp_path.glob("vggt-cache-demo-*/data/scene*/*.jpg.vggt_cache.pt"))
    assert len(caches) == 12
