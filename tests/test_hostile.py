"""A hostile file system and hostile requests, against real services on 127.0.0.1 (issue 10).

Someone with write access to part of the data root swaps folders for symlinks, plants FIFOs,
crafted zips and foreign files; someone with the port sends ambiguous framing, bodies without
a token, stalled and oversized bodies. Each case is one item or one request: the rest is served.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image

from vggt_cache.client import FeatureCache
from vggt_cache.client.cachefile import Outcome, cache_path, read_entry
from vggt_cache.client.manifest import manifest_path
from vggt_cache.client.wire import decode_features

from helpers.service import (
    REPO,
    TINY_MODEL,
    RunningService,
    cache_files,
    free_port,
    poll,
    service_in_process,
    service_spec,
    temp_files,
    wait_job,
    write_images,
)

TOKEN = "hostile-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
HANG_S = 30.0  # what "at once" must beat: a blocked worker would wait forever


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hostile-root")


@pytest.fixture(scope="module")
def outside(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hostile-outside")


@pytest.fixture(scope="module")
def server(service_server, root: Path) -> RunningService:
    return service_server(root, "--api-token", TOKEN)


@pytest.fixture(scope="module")
def http(server: RunningService) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=2 * HANG_S, headers=AUTH) as client:
        yield client


def features(http: httpx.Client, images: list[str]) -> list[dict]:
    r = http.post("/features", json={"images": images})
    assert r.status_code == 200, r.text
    return decode_features(r.content)[0]


def verify(folder: Path, server: RunningService) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "vggt_cache.service.cli",
            "verify",
            str(folder),
            "--server",
            server.url,
            "--api-token",
            TOKEN,
            "--json",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=HANG_S,
    )


# -- 1. containment when the file is opened ------------------------------------------------------


class Gate:
    """A before_forward hook holding the device until released."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, batch: object) -> None:
        self.entered.set()
        assert self.release.wait(120), "the test never released the device"


def swap_for_symlink(folder: Path, target: Path) -> None:
    folder.rename(folder.with_name(folder.name + ".orig"))
    folder.symlink_to(target, target_is_directory=True)


def test_folders_swapped_for_symlinks_after_acceptance_are_neither_read_nor_written(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    early = write_images(root / "job" / "a", [f"{i}.png" for i in range(6)], seed=1)
    write_images(root / "job" / "b", [f"{i}.png" for i in range(6)], seed=2)
    write_images(outside / "b", [f"{i}.png" for i in range(6)], seed=3)  # what the swapped folders lead to
    queued = write_images(root / "asked", ["0.png", "1.png"], seed=4)
    write_images(outside / "asked", ["0.png", "1.png"], seed=5)
    gate = Gate()
    with (
        service_in_process(root, tmp_path / "state", gate, gate.release.set) as url,
        httpx.Client(base_url=url, timeout=120) as http,
        ThreadPoolExecutor(1) as pool,
    ):
        job_id = http.post("/precompute", json={"data_root": str(root / "job")}).raise_for_status().json()["job_id"]
        assert gate.entered.wait(60)  # the job's first forward holds the device; folder b is not decoded yet
        answer = pool.submit(http.post, "/features", json={"images": queued})
        poll(
            lambda: http.get("/status").json()["engine"]["queued"]["on_demand"] >= 2,
            60,
            "the on-demand request to be accepted and queued",
        )
        swap_for_symlink(root / "job" / "b", outside / "b")
        swap_for_symlink(root / "asked", outside / "asked")
        gate.release.set()

        response = answer.result(timeout=120)
        assert response.status_code == 200, response.text
        items, tensors = decode_features(response.content)
        assert [i["status"] for i in items] == ["failed"] * 2 and not tensors
        assert all("outside the allowed roots" in i["error"] for i in items), items
        view = wait_job(http, job_id, timeout=120)
    assert view["computed"] == len(early) and view["failed"] == 6, view
    assert all("/job/b/" in f["image"] and "outside the allowed roots" in f["reason"] for f in view["failures"])
    assert cache_files(outside) == [] and temp_files(outside) == []
    assert Path(manifest_path(str(root / "job"))).is_file()


def test_a_cache_path_that_is_a_symlink_is_not_followed(http: httpx.Client, root: Path, outside: Path) -> None:
    image = write_images(root / "linked-entry", ["a.png"], seed=6)[0]
    assert [i["status"] for i in features(http, [image])] == ["computed"]
    planted = outside / "a.png.vggt_cache.pt"
    os.replace(cache_path(image), planted)  # a valid entry, now outside the roots
    os.symlink(planted, cache_path(image))
    before = planted.read_bytes()

    read = read_entry(image, service_spec(http))
    [item] = features(http, [image])

    assert read.outcome is Outcome.CORRUPT and "symbolic link" in read.reason.lower()
    assert item["status"] == "failed" and cache_path(image) in item["error"] and "symlink" in item["error"]
    assert planted.read_bytes() == before


# -- 2. HTTP framing -----------------------------------------------------------------------------


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=HANG_S)


def answer_of(sock: socket.socket, timeout: float = HANG_S) -> tuple[int | None, bytes, bool]:
    """(status, bytes received, whether the server closed) after reading until it closes or `timeout` passes."""
    data, closed = b"", False
    sock.settimeout(timeout)
    with contextlib.suppress(TimeoutError):
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                closed = True
                break
            data += chunk
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else None
    return status, data, closed


def request_head(path: str, *headers: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def chunked(body: bytes) -> bytes:
    return b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"


def test_content_length_with_transfer_encoding_is_a_400_and_closes(server: RunningService) -> None:
    with connect(server.url) as sock:
        sock.sendall(
            request_head(
                "/features", f"Authorization: Bearer {TOKEN}", "Content-Length: 5", "Transfer-Encoding: chunked"
            )
            + chunked(b'{"images": []}')
        )
        status, data, closed = answer_of(sock)
    assert status == 400 and b"Transfer-Encoding" in data and closed


def test_a_request_without_the_token_is_refused_before_its_body_arrives(server: RunningService) -> None:
    with connect(server.url) as sock:
        sock.sendall(request_head("/features", "Content-Length: 1000000") + b'{"images": [')  # the rest never comes
        status, data, closed = answer_of(sock)
    assert status == 401 and closed, data


def rss_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) * 1024


def test_a_flood_of_oversized_and_slow_bodies_keeps_memory_bounded(server: RunningService, http: httpx.Client) -> None:
    idle = rss_bytes(server.proc.pid)
    piece = b"x" * 65536
    chunk = b"%x\r\n" % len(piece) + piece + b"\r\n"
    with contextlib.ExitStack() as stack:
        claims = [stack.enter_context(connect(server.url)) for _ in range(16)]
        for sock in claims:  # a declared length over the limit: refused before one byte is read
            sock.sendall(request_head("/features", f"Authorization: Bearer {TOKEN}", "Content-Length: 100000000"))
        slow = [stack.enter_context(connect(server.url)) for _ in range(24)]
        for sock in slow:  # 3.5 MB each, under the 4 MiB limit, and never finished
            with contextlib.suppress(OSError):  # refused and closed by the service
                sock.sendall(request_head("/features", f"Authorization: Bearer {TOKEN}", "Transfer-Encoding: chunked"))
                for _ in range(54):
                    sock.sendall(chunk)
        peak = rss_bytes(server.proc.pid)
        assert all(answer_of(sock)[0] == 413 for sock in claims)
    assert peak - idle < 48 * 2**20, f"RSS grew by {(peak - idle) / 2**20:.1f} MiB"
    assert http.get("/status").status_code == 200


@pytest.fixture(scope="module")
def open_server(service_server, root: Path) -> RunningService:
    """No token, bound to every address, a short body timeout."""
    return service_server(root, "--host", "0.0.0.0", "--body-timeout", "1")


def test_a_body_that_stalls_is_answered_408_and_its_connection_closed(open_server: RunningService) -> None:
    t0 = time.monotonic()
    with connect(open_server.url) as sock:
        sock.sendall(request_head("/features", "Content-Length: 1000") + b'{"images": [')
        status, data, closed = answer_of(sock)
    assert status == 408 and closed and time.monotonic() - t0 < 10, data


def test_a_body_dripped_a_byte_at_a_time_is_cut_at_its_deadline(open_server: RunningService) -> None:
    t0 = time.monotonic()
    data = b""
    with connect(open_server.url) as sock:
        sock.sendall(request_head("/features", "Content-Length: 1000") + b'{"images": [')
        sock.settimeout(0.2)  # a byte each time the service has not answered for 0.2 s
        while not data and time.monotonic() - t0 < HANG_S:
            with contextlib.suppress(OSError):  # closed by the service: its answer is waiting
                sock.sendall(b" ")
            with contextlib.suppress(TimeoutError):
                data = sock.recv(65536)
    assert data.startswith(b"HTTP/1.1 408") and time.monotonic() - t0 < 10, data


# -- 3. only regular files -----------------------------------------------------------------------


def test_fifos_where_files_are_expected_fail_their_item_at_once(
    server: RunningService, http: httpx.Client, root: Path
) -> None:
    folder = root / "fifos"
    good = write_images(folder, ["good.png"], seed=7)[0]
    fifos = [str(folder / f"pipe{i}.png") for i in range(6)]  # more than the decode workers
    for fifo in fifos:
        os.mkfifo(fifo)
    image = write_images(folder, ["entry-is-a-fifo.png"], seed=8)[0]
    os.mkfifo(cache_path(image))

    items = features(http, [good, *fifos, image])

    assert [i["status"] for i in items] == ["computed"] + ["failed"] * 7
    assert all(i["image"] in i["error"] and "FIFO" in i["error"] for i in items[1:-1]), items
    assert cache_path(image) in items[-1]["error"] and "FIFO" in items[-1]["error"]
    spec = service_spec(http)
    read = read_entry(image, spec)
    assert read.outcome is Outcome.CORRUPT and "FIFO" in read.reason
    cache = FeatureCache(spec=spec, fallback="online")  # a miss is None: the caller's model computes it
    assert cache.get(image) is None and cache.stats["corrupt"] == 1
    report = verify(folder, server)
    assert report.returncode == 1
    assert any(p["outcome"] == "corrupt" and "FIFO" in p["reason"] for p in json.loads(report.stdout)["problems"])


def test_a_fifo_sample_file_does_not_block_the_job_runner(http: httpx.Client, root: Path) -> None:
    folder = root / "fifo-samples"
    write_images(folder, ["a.png"], seed=9)
    os.mkfifo(folder / "train.jsonl")
    after = root / "after-fifo-samples"
    write_images(after, ["b.png"], seed=10)

    first = http.post("/precompute", json={"data_root": str(folder)}).raise_for_status().json()["job_id"]
    view = wait_job(http, first, timeout=HANG_S)
    second = http.post("/precompute", json={"data_root": str(after)}).raise_for_status().json()["job_id"]

    assert view["state"] == "finished", view
    assert any("train.jsonl" in f["image"] and "FIFO" in f["reason"] for f in view["failures"]), view
    assert wait_job(http, second, timeout=HANG_S)["computed"] == 1


# -- 4. bounded reads ----------------------------------------------------------------------------


def sparse_file(path: Path, head: bytes, size: int) -> None:
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(size)


def test_compressed_or_oversized_files_are_refused_unread(http: httpx.Client, root: Path) -> None:
    folder = root / "bounded"
    deflated, padded = write_images(folder, ["deflated.png", "padded.png"], seed=11)
    assert [i["status"] for i in features(http, [deflated, padded])] == ["computed"] * 2
    entry = cache_path(deflated)
    with zipfile.ZipFile(entry) as src:  # torch.load reads it: a 1 MB file could inflate to 1 GiB
        records = [(info.filename, src.read(info)) for info in src.infolist()]
    with zipfile.ZipFile(entry, "w", zipfile.ZIP_DEFLATED) as out:
        for name, data in records:
            out.writestr(name, data)
    sparse_file(Path(cache_path(padded)), b"PK\x03\x04", 50 * 2**20)  # far more than a 4x4-patch entry
    huge = folder / "huge.png"
    sparse_file(huge, Path(padded).read_bytes()[:64], 300 * 2**20)  # a PNG header, then zeros
    spec = service_spec(http)

    t0 = time.monotonic()
    padded_read = read_entry(padded, spec, mmap=False)
    items = features(http, [deflated, padded, str(huge)])

    assert padded_read.outcome is Outcome.CORRUPT and "over the limit" in padded_read.reason
    assert [i["status"] for i in items] == ["computed", "computed", "failed"], items
    assert "over the limit" in items[2]["error"] and str(huge) in items[2]["error"]
    assert time.monotonic() - t0 < HANG_S
    with zipfile.ZipFile(entry) as rewritten:
        assert all(info.compress_type == zipfile.ZIP_STORED for info in rewritten.infolist())
    assert all(read_entry(p, spec).hit for p in (deflated, padded))


# -- 5. integrity --------------------------------------------------------------------------------


def tensor_offset(entry: str) -> int:
    """Where the features' bytes start in an entry (its one record under data/)."""
    with zipfile.ZipFile(entry) as archive:
        info = next(i for i in archive.infolist() if i.filename.split("/")[-2:-1] == ["data"])
    with open(entry, "rb") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
    return info.header_offset + 30 + name_len + extra_len


def test_a_flipped_byte_in_the_features_is_caught_by_its_crc(
    server: RunningService, http: httpx.Client, root: Path
) -> None:
    folder = root / "bitrot"
    image = write_images(folder, ["a.png"], seed=12)[0]
    [_first] = features(http, [image])
    entry = Path(cache_path(image))
    data = bytearray(entry.read_bytes())
    data[tensor_offset(str(entry)) + 5] ^= 0x40
    entry.write_bytes(bytes(data))

    report = verify(folder, server)
    [item] = features(http, [image])

    assert report.returncode == 1 and "CRC" in report.stdout, report.stdout
    assert item["status"] == "computed", item
    assert verify(folder, server).returncode == 0


# -- 6. configuration that looks secure is secure --------------------------------------------------


def serve_exits(root: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "vggt_cache.service.cli",
        "serve",
        "--model",
        str(TINY_MODEL),
        "--device",
        "cpu",
        "--port",
        str(free_port()),
        "--allowed-root",
        str(root),
        *args,
    ]
    return subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=HANG_S, env={**os.environ, **(env or {})}
    )


@pytest.mark.parametrize(
    "args, env, says",
    [
        ((), {"VGGT_CACHE_API_TOKEN": ""}, "set but empty"),
        (("--api-token", " "), None, "set but empty"),
        (("--max-pending", "0"), None, "--max-pending must be a positive integer"),
        (("--max-items-per-request", "-1"), None, "--max-items-per-request must be a positive integer"),
        (("--max-image-bytes", "0"), None, "--max-image-bytes must be a positive integer"),
        (("--patch-cache-mb", "-1"), None, "--patch-cache-mb must be zero or more"),
    ],
    ids=[
        "empty-token-variable",
        "blank-token",
        "zero-max-pending",
        "negative-items",
        "zero-image-bytes",
        "negative-patch-cache",
    ],
)
def test_settings_that_cannot_be_meant_stop_the_start(tmp_path: Path, args: tuple, env: dict | None, says: str) -> None:
    result = serve_exits(tmp_path, "--state-dir", str(tmp_path / "state"), *args, env=env)
    assert result.returncode == 2 and says in result.stderr + result.stdout, result.stderr[-2000:]


def test_a_non_loopback_bind_without_a_token_warns_at_start_and_on_status(open_server: RunningService) -> None:
    status = httpx.get(f"{open_server.url}/status", timeout=HANG_S).json()
    assert status["service"]["auth"] is False
    assert any("0.0.0.0" in w and "--api-token" in w for w in status["service"]["warnings"]), status["service"]
    assert "without an API token" in open_server.log()


# -- 7. scanning and writing stay in their lane --------------------------------------------------


def test_a_walk_does_not_follow_links_out_of_the_roots(http: httpx.Client, root: Path, outside: Path) -> None:
    folder = root / "walk"
    write_images(folder, ["inside.png"], seed=13)
    write_images(outside / "elsewhere", [f"secret{i}.png" for i in range(5)], seed=14)
    (folder / "link").symlink_to(outside / "elsewhere", target_is_directory=True)
    (folder / "file-link.png").symlink_to(outside / "elsewhere" / "secret0.png")

    job_id = http.post("/precompute", json={"data_root": str(folder)}).raise_for_status().json()["job_id"]
    view = wait_job(http, job_id)

    assert (view["total"], view["computed"], view["failed"]) == (1, 1, 0), view
    assert "secret" not in Path(manifest_path(str(folder))).read_text()
    assert cache_files(outside / "elsewhere") == []


def test_a_foreign_file_at_a_cache_path_is_never_replaced(http: httpx.Client, root: Path) -> None:
    image = write_images(root / "foreign", ["a.png"], seed=15)[0]
    Path(cache_path(image)).write_text("my notes, not a cache entry\n")

    [item] = features(http, [image])

    assert item["status"] == "failed" and cache_path(image) in item["error"], item
    assert Path(cache_path(image)).read_text() == "my notes, not a cache entry\n"


def test_only_allowlisted_image_formats_are_decoded(http: httpx.Client, root: Path) -> None:
    folder = root / "formats"
    good = write_images(folder, ["good.png"], seed=16)[0]
    postscript = folder / "drawing.jpg"  # PIL's EPS plugin would hand this to Ghostscript
    postscript.write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 56 56\nnewpath 0 0 moveto showpage\n")

    items = features(http, [good, str(postscript)])

    assert [i["status"] for i in items] == ["computed", "failed"]
    assert str(postscript) in items[1]["error"] and "accepted format" in items[1]["error"], items[1]


# -- 8. messages ---------------------------------------------------------------------------------


def test_errors_name_the_file_and_redirects_do_not_echo_the_host(
    server: RunningService, http: httpx.Client, root: Path
) -> None:
    folder = root / "messages"
    text = folder / "text.png"
    folder.mkdir()
    text.write_text("not an image\n")
    thin = folder / "thin.png"
    Image.new("RGB", (2000, 1)).save(thin)

    items = features(http, [str(text), str(thin)])
    redirect = httpx.get(f"{server.url}/status/", headers={**AUTH, "Host": "evil.example"}, timeout=HANG_S)

    assert [i["status"] for i in items] == ["failed", "failed"]
    assert str(text) in items[0]["error"] and "BytesIO" not in items[0]["error"], items[0]
    assert str(thin) in items[1]["error"] and "aspect ratio" in items[1]["error"], items[1]
    assert not redirect.is_redirect and "evil.example" not in redirect.headers.get("location", "")
