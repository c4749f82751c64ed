"""A lab's shared GPU node: connections, probes, browsers and tokens (issue 18, items 1, 2, 12, 15).

Real services on 127.0.0.1: a flood of silent connections against a low descriptor limit, probes
while plans pile up, requests addressed to a foreign Host or with non-JSON bodies, and the token
read from a file instead of the command line.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import resource
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from vggt_cache.service.api.connections import AcceptErrors

from helpers.service import REPO, TINY_MODEL, RunningService, free_port, poll, start_service, wait_job, write_images

TOKEN = "shared-node-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
FD_LIMIT = 256  # the service's RLIMIT_NOFILE, soft and hard: it cannot raise it
FLOOD = 400  # silent connections, more than the service has descriptors
HEADER_TIMEOUT_S = 2.0
PROBE_S = 2.0  # what a probe must beat while the service is busy (docker's healthcheck waits 5 s)


def cli(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vggt_cache.service.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# -- 1. idle connections and descriptors ----------------------------------------------------------


def low_descriptor_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))


def closed_by_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(1, socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:  # reset by the service
        return True


def test_a_flood_of_silent_connections_neither_fails_a_job_nor_starves_requests(tmp_path: Path) -> None:
    images = write_images(tmp_path / "job", [f"{i}.png" for i in range(48)], seed=1)
    service = start_service(tmp_path, "--header-timeout", str(HEADER_TIMEOUT_S), preexec_fn=low_descriptor_limit)
    try:
        host, port = service.url.removeprefix("http://").split(":")
        with httpx.Client(base_url=service.url, timeout=30) as http, contextlib.ExitStack() as flood:
            job = http.post("/precompute", json={"data_root": str(tmp_path / "job")}).raise_for_status().json()
            sockets = [
                flood.enter_context(socket.create_connection((host, int(port)), timeout=10)) for _ in range(FLOOD)
            ]
            t0 = time.monotonic()
            with httpx.Client(base_url=service.url, timeout=30) as fresh:  # a new connection, past the flood
                assert fresh.get("/healthz").status_code == 200
            answered_s = time.monotonic() - t0
            view = wait_job(http, job["job_id"], timeout=120)
            poll(
                lambda: all(closed_by_peer(s) for s in sockets),
                10 * HEADER_TIMEOUT_S + 30,
                "the service to close every silent connection",
            )
        log = service.log()
    finally:
        service.stop()
    assert answered_s < 5.0, f"/healthz took {answered_s:.1f} s behind {FLOOD} silent connections"
    assert (view["state"], view["computed"], view["failed"]) == ("finished", len(images), 0), view
    assert len(log) < 16384 and "Traceback" not in log, log[-3000:]
    assert "At most 64 open connections" in log, log[-3000:]


def python(code: str, preexec_fn=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, preexec_fn=preexec_fn
    )


def test_the_descriptor_soft_limit_is_raised_to_the_hard_limit_and_logged() -> None:
    code = (
        "import logging, resource, sys\n"
        "logging.basicConfig(level=logging.INFO, stream=sys.stdout, format='%(message)s')\n"
        "from vggt_cache.service.api.connections import raise_descriptor_limit\n"
        "print(raise_descriptor_limit(), *resource.getrlimit(resource.RLIMIT_NOFILE))\n"
    )
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[1]  # what this machine lets a process keep
    hard = 4 * FD_LIMIT if limit == resource.RLIM_INFINITY else min(limit, 4 * FD_LIMIT)
    if hard <= FD_LIMIT:
        pytest.skip(f"the hard descriptor limit here ({hard}) leaves nothing to raise")
    raised = python(code, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, hard)))
    at_hard = python(code, preexec_fn=low_descriptor_limit)
    assert raised.returncode == 0, raised.stderr
    assert raised.stdout.splitlines() == [
        f"File descriptor limit raised from {FD_LIMIT} to {hard} (the hard limit)",
        f"{hard} {hard} {hard}",
    ]
    assert at_hard.stdout.splitlines() == [f"{FD_LIMIT} {FD_LIMIT} {FD_LIMIT}"], at_hard.stderr


def test_a_step_out_of_descriptors_is_retried_until_they_come_back(tmp_path: Path) -> None:
    # A process with every descriptor taken: the open fails with EMFILE until some are given back, as
    # connections closing would, while the step waits for its retry (here: just before its second try).
    code = f"""
import errno, os
from vggt_cache.service.engine.work import when_descriptors_free
held = []
while True:
    try:
        held.append(os.open({str(tmp_path)!r}, os.O_RDONLY))
    except OSError as e:
        assert e.errno == errno.EMFILE
        break
tries = []

def step():
    tries.append(1)
    if len(tries) == 2:
        for fd in held[:8]:
            os.close(fd)
    return os.open({str(tmp_path)!r}, os.O_RDONLY)

fd = when_descriptors_free(step, "opening the folder")
assert len(tries) == 2
try:
    when_descriptors_free(lambda: os.open({str(tmp_path / "absent")!r}, os.O_RDONLY), "opening nothing")
except FileNotFoundError:
    print("other errors at once")
print("opened after", len(held), "descriptors")
"""
    result = python(code, preexec_fn=low_descriptor_limit)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "other errors at once"
    assert result.stdout.splitlines()[1].startswith("opened after")
    assert "Out of file descriptors opening the folder; retrying in 0.5 s" in result.stderr
    assert "opening nothing" not in result.stderr


def test_failed_accepts_are_said_once_an_interval_with_their_count(caplog: pytest.LogCaptureFixture) -> None:
    loop = asyncio.new_event_loop()
    handler = AcceptErrors(interval_s=3600)
    emfile = {"message": "socket.accept() out of system resource", "exception": OSError(errno.EMFILE, "Too many")}
    try:
        with caplog.at_level(logging.ERROR, logger="vggt_cache"):
            for _ in range(1000):
                handler(loop, emfile)
        said = [r.getMessage() for r in caplog.records if r.name == "vggt_cache"]
        assert said == [
            "Cannot accept connections: Too many (1 times since the last report; said at most once every 3600 s)"
        ]
        assert handler.count == 999  # counted for the next report
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            handler(loop, {"message": "something else", "exception": ValueError("not ours")})
        assert handler.count == 999 and any("something else" in r.getMessage() for r in caplog.records)
    finally:
        loop.close()


# -- 2. probes and plans ------------------------------------------------------------------------


def test_probes_answer_at_once_while_plans_are_refused_past_their_limit(tmp_path: Path, service_server) -> None:
    tree = tmp_path / "tree"
    png = Path(write_images(tmp_path, ["one.png"], seed=2)[0]).read_bytes()
    for i in range(1500):  # a plan stats every image: seconds for this tree, however small its images
        (tree / f"d{i % 30}").mkdir(parents=True, exist_ok=True)
        (tree / f"d{i % 30}" / f"{i}.png").write_bytes(png)
    server = service_server(tmp_path)
    body = {"data_root": str(tree), "dry_run": True}

    def probe(http: httpx.Client, route: str) -> float:
        t0 = time.monotonic()
        assert http.get(route).status_code == 200
        return time.monotonic() - t0

    limits = httpx.Limits(max_connections=64)
    with httpx.Client(base_url=server.url, timeout=300, limits=limits) as http, ThreadPoolExecutor(48) as pool:
        # More plans than the service's 40 worker threads: without admission they would take them all.
        futures = [pool.submit(http.post, "/precompute", json=body) for _ in range(48)]
        poll(lambda: sum(f.done() for f in futures) >= len(futures) - 2, 30, "the plans past the limit to be refused")
        times = {route: probe(http, route) for route in ("/healthz", "/readyz", "/metrics")}
        answers = [f.result() for f in futures]
    refused = [r for r in answers if r.status_code == 429]
    assert all(r.status_code in (200, 429) for r in answers), {r.status_code for r in answers}
    assert all(t < PROBE_S for t in times.values()), times
    assert refused and all(r.headers.get("retry-after") for r in refused), len(refused)
    assert "plans (dry runs) in progress" in refused[0].json()["detail"]
    assert any(r.status_code == 200 for r in answers)


# -- 12. DNS rebinding and cross-origin bodies ------------------------------------------------------


@pytest.fixture(scope="module")
def public_server(service_server, tmp_path_factory: pytest.TempPathFactory) -> RunningService:
    """Bound to every address, with a token given on the command line and one extra allowed name."""
    return service_server(
        tmp_path_factory.mktemp("public"),
        "--host",
        "0.0.0.0",
        "--api-token",
        TOKEN,
        "--allowed-host",
        "gpu-node.example",
    )


def test_foreign_hosts_and_non_json_bodies_are_refused_and_the_page_cannot_be_framed(
    public_server: RunningService, tmp_path: Path
) -> None:
    port = public_server.url.rsplit(":", 1)[1]
    url = f"http://127.0.0.1:{port}"

    def get(path: str, host: str, headers: dict | None = None) -> httpx.Response:
        return httpx.get(url + path, headers={"Host": host, **(headers or {})}, timeout=30)

    def post(path: str, content: bytes, content_type: str | None) -> httpx.Response:
        headers = {**AUTH, **({"Content-Type": content_type} if content_type else {})}
        return httpx.post(url + path, content=content, headers=headers, timeout=30)

    for host in ("evil.example", f"evil.example:{port}", "localhost.evil.example"):
        assert get("/status", host, AUTH).status_code == 421
        assert get("/healthz", host).status_code == 421
    assert get("/status", "evil.example").status_code == 421  # before auth: no 401 to tell it apart
    for host in (
        f"127.0.0.1:{port}",
        f"localhost:{port}",
        f"[::1]:{port}",
        "10.1.2.3",
        "gpu-node.example",
        f"GPU-Node.example.:{port}",
        socket.gethostname(),
    ):
        assert get("/status", host, AUTH).status_code == 200, host

    json_body = b'{"data_root": "%s", "dry_run": true}' % public_server.root.encode()
    for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
        for path in ("/precompute", "/features"):
            r = post(path, json_body, content_type)
            assert r.status_code == 415 and "application/json" in r.json()["detail"], (path, content_type, r.text)
    assert post("/precompute", json_body, "application/json; charset=utf-8").status_code == 200
    started = post("/precompute", json_body.replace(b"true", b"false"), "text/plain")
    assert started.status_code == 415 and get("/status", "localhost", AUTH).json()["jobs"] == []

    page = get("/", f"127.0.0.1:{port}")
    policy = page.headers["content-security-policy"]
    assert page.status_code == 200 and page.headers["x-frame-options"] == "DENY"
    scripts = policy.split("script-src ", 1)[1].split(";", 1)[0]
    assert "frame-ancestors 'none'" in policy and "connect-src 'self'" in policy
    assert scripts.startswith("'sha256-") and "unsafe" not in scripts, policy


# -- 15. the token on the command line ------------------------------------------------------------


def test_the_token_comes_from_a_file_and_one_on_the_command_line_is_warned_about(
    tmp_path: Path, service_server, public_server: RunningService
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(f"  {TOKEN}\n")
    token_file.chmod(0o600)
    empty = tmp_path / "empty"
    empty.write_text(" \n")
    server = service_server(tmp_path, "--api-token-file", str(token_file))

    assert httpx.get(f"{server.url}/status", headers=AUTH, timeout=30).status_code == 200
    assert httpx.get(f"{server.url}/status", timeout=30).status_code == 401
    status = cli("status", "--server", server.url, "--api-token-file", str(token_file))
    refused = cli(
        "serve",
        "--model",
        str(TINY_MODEL),
        "--device",
        "cpu",
        "--port",
        str(free_port()),
        "--allowed-root",
        str(tmp_path),
        "--state-dir",
        str(tmp_path / "state"),
        "--api-token-file",
        str(empty),
        timeout=60,
    )

    assert status.returncode == 0, status.stderr[-2000:]
    assert "can be read by every user" not in server.log() + status.stderr
    assert refused.returncode == 2 and "holds no token" in refused.stderr, refused.stderr[-2000:]
    assert "--api-token on the command line can be read by every user" in public_server.log()
