"""The status page, rendered by a real headless Chromium against a real service running a job."""

from __future__ import annotations

import html
import re

import httpx
import numpy as np
import pytest
from PIL import Image

from helpers.browser import CHROMIUM, Browser, render
from helpers.service import poll, wait_job, write_images

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium package is not installed (.ci/run installs it)"
)


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
    body = dom[dom.index('<tbody id="jobs">') :]
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
    assert status["model"]["weights_dtype"] == "float32"  # resident bfloat16 weights are for CUDA only
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
    assert '<div id="error"></div>' in allowed


def test_the_chart_the_lookup_counts_and_cancel_with_a_token(tmp_path, service_server):
    root = tmp_path / "data"
    wanted = write_images(root / "wanted", ["a.png", "b.png"], seed=1)
    # Long enough to be still running when the page is up (it is cancelled long before its end).
    write_images(root / "bulk", [f"{i:04d}.png" for i in range(2000)], seed=2)
    service = service_server(root, "--max-batch-frames", "1", "--api-token", "s3cret")
    with httpx.Client(base_url=service.url, headers={"Authorization": "Bearer s3cret"}, timeout=60) as http:
        for _ in range(2):  # missing twice, then hits twice
            http.post("/features", json={"images": wanted}).raise_for_status()
        write_images(root / "wanted", ["a.png"], seed=3)  # rewritten: its entry is stale now
        http.post("/features", json={"images": wanted[:1]}).raise_for_status()
        job_id = http.post("/precompute", json={"data_root": str(root / "bulk")}).raise_for_status().json()["job_id"]
        wait_job(http, job_id, until=lambda view: view["computed"] > 0)
        # The chart shows complete 5 s intervals: wait for one with entries computed in it.
        poll(
            lambda: any(http.get("/status").json()["engine"]["history"]["computed_per_s"]),
            30,
            "an interval with entries computed",
        )

        with Browser(str(tmp_path / "profile")) as page:
            page.page(service.url + "/")
            page.wait_for("document.getElementById('error').textContent.includes('401')")
            page.evaluate(
                "document.getElementById('token').value = 's3cret';"
                "document.getElementById('token-form').requestSubmit()"
            )
            page.wait_for("document.getElementById('svc-state')?.textContent === 'ready'")
            counts = {
                k: page.evaluate(f"document.getElementById('lookup-{k}').textContent") for k in ("hit", "miss", "stale")
            }
            assert counts == {"hit": "2", "miss": "2", "stale": "1"}
            points = page.evaluate("document.getElementById('chart-line').getAttribute('points')").split()
            assert len(points) == 120  # ten minutes of 5 s intervals
            assert min(float(p.split(",")[1]) for p in points) < 99  # some throughput drawn above the baseline
            assert float(page.evaluate("document.getElementById('chart').dataset.peak")) > 0
            assert page.evaluate(f"document.querySelector('tr[data-job=\"{job_id}\"] .job-id').textContent") == job_id

            button = f"document.querySelector('button[data-cancel=\"{job_id}\"]')"
            page.wait_for(f"!!{button}")
            page.evaluate(f"{button}.click()")  # arms it: a stray click cancels nothing
            assert page.evaluate(f"{button}.textContent") == "Really cancel?"
            assert http.get(f"/jobs/{job_id}").json()["cancel_requested"] is False
            page.evaluate(f"{button}.click()")
            assert wait_job(http, job_id)["state"] == "cancelled"
            page.wait_for(f"document.querySelector('tr[data-job=\"{job_id}\"]').className === 'job state-cancelled'")
            assert page.evaluate("document.getElementById('error').textContent") == ""
