"""The CLI's wrong turns: each is one `[ERROR]` line saying what to do, a non-zero exit, no traceback.

Real processes, real ports: an unreachable server is a loopback port that was free a moment ago.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

from helpers.cli import cli, one_error
from helpers.service import REPO, TINY_MODEL, free_port, poll, write_images


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli-errors")
    write_images(root, ["a.png"])
    return root


def test_serve_on_a_port_in_use_says_so_before_loading_the_model(data_root: Path, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = cli(
            "serve",
            "--model",
            str(TINY_MODEL),
            "--port",
            str(port),
            "--allowed-root",
            str(data_root),
            "--state-dir",
            str(tmp_path / "state"),
        )
    one_error(run, f"port {port} on 127.0.0.1 is already in use")
    assert "Loading VGGT model" not in run.stdout and "Serving on" not in run.stdout


@pytest.mark.parametrize("command", ["precompute", "verify", "status"])
def test_an_unreachable_server_is_one_line(command: str, data_root: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # bound, then closed: nothing listens there
    args = {"precompute": ("--data_root", str(data_root)), "verify": (str(data_root),), "status": ()}[command]
    line = one_error(
        cli(command, *args, "--server", url),
        f"cannot reach the service: no vggt-cache service answered after 1 try ({url}: ConnectError",
    )
    assert "start `vggt-cache serve` there, or fix --server" in line


def test_a_server_that_is_not_a_url_is_one_line(data_root: Path) -> None:
    one_error(
        cli("verify", str(data_root), "--server", "gpu-node:8600"),
        "--server gpu-node:8600: a service URL must start with http:// or https://",
    )


@pytest.mark.parametrize("command", ["verify", "precompute"])
def test_a_data_root_that_does_not_exist_is_no_such_folder(command: str, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-root"
    args = (str(missing),) if command == "verify" else ("--data_root", str(missing), "--state-dir", str(tmp_path))
    one_error(cli(command, *args), f"no such folder: {missing}")


def test_verify_without_a_manifest_says_to_pass_server(data_root: Path) -> None:
    one_error(cli("verify", str(data_root)), "no vggt_cache_manifest.json in")


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
def test_a_wrong_model_path_is_one_line(data_root: Path, tmp_path: Path, dry_run: bool) -> None:
    run = cli(
        "precompute",
        "--data_root",
        str(data_root),
        "--vggt_model_path",
        str(tmp_path / "nope"),
        "--state-dir",
        str(tmp_path / "state"),
        *(["--dry-run"] if dry_run else []),
    )
    line = one_error(run, f"cannot load the VGGT model {tmp_path / 'nope'}: model source ")
    assert "check --vggt_model_path" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_a_device_this_machine_lacks_is_one_line(data_root: Path, tmp_path: Path) -> None:
    run = cli(
        "precompute",
        "--data_root",
        str(data_root),
        "--vggt_model_path",
        str(TINY_MODEL),
        "--device",
        "cuda",
        "--state-dir",
        str(tmp_path),
    )
    one_error(run, "--device cuda: no CUDA device is visible (use --device cpu)")
    one_error(cli("serve", "--allowed-root", str(data_root), "--device", "gpu"), "--device must be auto, cpu")


def test_precompute_refuses_settings_that_cannot_be_meant_before_loading_the_model(
    data_root: Path, tmp_path: Path
) -> None:
    for flag, value, says in (
        ("--decode-workers", "0", "--decode-workers must be a positive integer, got 0"),
        ("--patch-cache-mb", "-1", "--patch-cache-mb must be zero or more, got -1"),
    ):
        run = cli(
            "precompute",
            "--data_root",
            str(data_root),
            "--vggt_model_path",
            str(TINY_MODEL),
            "--device",
            "cpu",
            "--state-dir",
            str(tmp_path),
            flag,
            value,
        )
        one_error(run, says)
        assert "Loading VGGT model" not in run.stdout


def test_usage_errors_are_one_line_pointing_at_help() -> None:
    one_error(cli("serve"), "the following arguments are required: --allowed-root")
    one_error(cli("precompute", "--data_root"), "expected one argument (see `vggt-cache precompute --help`)")


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    for run in (
        cli("verify", str(tmp_path / "x"), "--debug"),
        cli("verify", str(tmp_path / "x"), env={"VGGT_CACHE_DEBUG": "1"}),
    ):
        assert run.returncode == 2 and "Traceback" in run.stdout and "no such folder" in run.stdout


def test_every_help_shows_its_defaults() -> None:
    serve = cli("serve", "--help").stdout
    for shown in ("(default: 127.0.0.1)", "(default: 8600)", "(default: auto)", "(default: facebook/VGGT-1B)"):
        assert shown in serve, serve
    assert "colon-separated) (required)" in serve
    precompute = cli("precompute", "--help").stdout
    assert "(default: auto)" in precompute and "(required)" in precompute
    assert "(default: http://127.0.0.1:8600)" in cli("status", "--help").stdout


def test_serve_with_a_model_that_cannot_load_stays_up_at_503_and_says_why(data_root: Path, tmp_path: Path) -> None:
    port = free_port()
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "vggt_cache.service.cli",
                "serve",
                "--model",
                str(tmp_path / "nope"),
                "--port",
                str(port),
                "--allowed-root",
                str(data_root),
                "--state-dir",
                str(tmp_path / "state"),
            ],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:

        def failed() -> httpx.Response | None:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
            except httpx.TransportError:
                return None
            return r if r.json()["state"] == "failed" else None

        r = poll(failed, 60, "the service to report its failed model")
        assert r.status_code == 503 and "neither a file, a folder" in r.json()["error"]
        assert proc.poll() is None
        text = log_path.read_text()
        assert f"[INFO] Serving on http://127.0.0.1:{port}" in text and "[ERROR] Model failed to load" in text
        assert "Traceback" not in text
    finally:
        proc.terminate()
        proc.wait(30)


def test_a_failed_model_is_logged_again_every_interval(tmp_path: Path) -> None:
    from vggt_cache.service.runtime import ServiceRuntime
    from vggt_cache.service.settings import ServiceSettings

    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger = logging.getLogger("vggt_cache")
    handler = Collect()
    logger.addHandler(handler)
    runtime = ServiceRuntime(
        ServiceSettings(
            model=str(tmp_path / "nope"), device="cpu", allowed_roots=[str(tmp_path)], state_dir=str(tmp_path / "state")
        ),
        failed_reminder_s=0.05,
    )
    try:
        runtime.start(background=False)
        poll(
            lambda: sum(line.startswith("Serving nothing: the model failed to load") for line in lines) >= 2,
            10,
            "two reminders",
        )
    finally:
        runtime.stop()
        logger.removeHandler(handler)
    assert runtime.state == "failed"
