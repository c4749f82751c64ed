"""A running job's counts move as its units land, while its runner waits for room in the bulk backlog
(issue 19 item 8: the row said `0 / 0 / 0 of 36` for 36 s while the device was 93% busy)."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import torch

from helpers.service import poll, service_in_process, wait_job, write_images


class Gate:
    """before_forward: each forward takes a permit; the test hands them out."""

    def __init__(self) -> None:
        self.permits = threading.Semaphore(0)
        self.forwards = 0

    def __call__(self, batch: torch.Tensor) -> None:
        self.permits.acquire()
        self.forwards += 1

    def allow(self, n: int) -> None:
        for _ in range(n):
            self.permits.release()


def test_a_running_jobs_computed_count_moves_while_its_runner_waits_to_submit(tmp_path: Path) -> None:
    root = tmp_path / "root"
    write_images(root, [f"img_{i:02d}.png" for i in range(20)])
    gate = Gate()
    # One frame a batch: the bulk backlog holds 2 units, and the runner submits chunks of 8, so after three
    # forwards it is still blocked admitting its first chunk.
    with (
        service_in_process(root, tmp_path / "state", gate, lambda: gate.allow(1000)) as url,
        httpx.Client(base_url=url, timeout=60) as http,
    ):
        job_id = http.post("/precompute", json={"data_root": str(root)}).raise_for_status().json()["job_id"]
        gate.allow(3)
        view = poll(
            lambda: (v := http.get(f"/jobs/{job_id}").json())["computed"] == 3 and v,
            60,
            "three computed entries counted while the job runs",
        )
        assert view["state"] == "running" and view["total"] == 20
        row = next(j for j in http.get("/status").json()["jobs"] if j["job_id"] == job_id)  # the page's row
        assert row["computed"] == 3 and row["progress"] > 0
        assert gate.forwards == 3
        gate.allow(1000)
        final = wait_job(http, job_id)
        assert final["state"] == "finished" and final["computed"] == 20
