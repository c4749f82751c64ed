"""The status page, rendered by a real headless Chromium against a real service running a job."""

from __future__ import annotations

import html
import re
import shutil
import subprocess

import httpx
import numpy as np
import pytest
from PIL import Image

from service_helpers import wait_job

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium package is not installed (.ci/run installs it)")


def render(url: str, profile: str) -> str:
    """The DOM after the page's scripts ran (virtual time lets its fetch and timers complete)."""
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--virtual-time-budget=5000", "--dump-dom", url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout


def test_status_page_shows_model_queue_and_job_progress(tmp_path, service_server):
    root = tmp_path / "data"
    (root / "scene").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(60):
        Image.fromarray(rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)).save(root / "scene" / f"{i:03d}.png")
    service = service_server(root, "--max-batch-frames", "2")
    job = httpx.post(f"{service.url}/precompute", json={"data_root": str(root)}).raise_for_status().json()
    with httpx.Client(base_url=service.url) as http:
        job = wait_job(http, job["job_id"], until=lambda view: view["computed"] > 0)

    dom = render(service.url + "/", str(tmp_path / "profile"))
    status = httpx.get(f"{service.url}/status").json()
    body = dom[dom.index('<tbody id="jobs">'):]
    rows = re.findall(r'<tr class="job state-(\w+)" data-job="(\w+)">(.*?)</tr>', body, re.S)
    assert [r[1] for r in rows] == [job["job_id"]]
    state, _, cells = rows[0]
    assert state in ("running", "finished")
    pct = float(re.search(r'class="pct">([\d.]+)%', cells).group(1))
    assert 0 < pct <= 100
    assert re.search(r"\d+ / \d+ / \d+ of 60", cells)
    assert html.escape(str(root)) in cells
    assert 'id="svc-state">ready<' in dom
    assert status["model"]["fingerprint"][:23] in dom
    assert "340,864" in dom  # parameters of the fixture model, formatted by the page
    assert "queued (bulk)" in dom and "(process RSS)" in dom


def test_status_page_asks_for_the_token_when_auth_is_on(tmp_path, service_server):
    root = tmp_path / "data"
    root.mkdir()
    service = service_server(root, "--api-token", "s3cret")
    denied = render(service.url + "/", str(tmp_path / "p1"))
    assert "/status answered 401" in denied and "#token=" in denied
    allowed = render(service.url + "/#token=s3cret", str(tmp_path / "p2"))
    assert 'id="svc-state">ready<' in allowed
    assert "answered 401" not in allowed
