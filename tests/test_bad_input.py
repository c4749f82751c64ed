"""Bad input against a real service: each gets a clear error and nothing else of the request or job is lost."""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import httpx
import pytest
import torch

from vggt_cache.client import FeatureCache
from vggt_cache.client.cachefile import Outcome, cache_path, read_entry
from vggt_cache.client.wire import decode_features

from helpers.service import REPO, cache_files, service_spec, temp_files, wait_job, write_images


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bad-input")


@pytest.fixture(scope="module")
def server(service_server, root: Path):
    return service_server(root)


def post_json(http: httpx.Client, route: str, body: object) -> httpx.Response:
    """POST `body` as JSON text; lone surrogates (non-UTF-8 file names) travel as \\udcXX escapes."""
    return http.post(route, content=json.dumps(body).encode(), headers={"content-type": "application/json"})


def features(http: httpx.Client, images: list[str]) -> list[dict]:
    r = post_json(http, "/features", {"images": images})
    assert r.status_code == 200, r.text
    items, _tensors = decode_features(r.content)
    for item in items:
        assert (item["tensor"] is not None) == (item["status"] != "failed"), item
    return items


def png_claiming(width: int, height: int) -> bytes:
    """A well-formed PNG header claiming `width` x `height` pixels, with almost no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def bad_image_files(folder: Path) -> dict[str, str]:
    """name -> what its error must say, for files that look like images and are not."""
    good = Path(write_images(folder, ["donor.png"], seed=5)[0])
    (folder / "truncated.png").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    good.unlink()
    (folder / "text.jpg").write_text("this is not a jpeg\n")
    (folder / "empty.png").write_bytes(b"")
    (folder / "huge.png").write_bytes(png_claiming(100_000, 100_000))
    (folder / "large.png").write_bytes(png_claiming(10_000, 10_000))  # past our limit, under PIL's
    return {
        "truncated.png": "truncated",
        "text.jpg": "cannot decode",
        "empty.png": "empty",
        "huge.png": "decompression bomb",
        "large.png": "decompression bomb",
    }


def test_bad_image_files_fail_alone_on_demand_and_in_a_job(http: httpx.Client, root: Path) -> None:
    folder = root / "bad-images"
    good = write_images(folder, ["good1.png", "good2.png"], seed=1)
    expected = bad_image_files(folder)
    bad = [str(folder / name) for name in expected]

    items = features(http, [good[0], *bad, good[1]])

    assert [i["status"] for i in items] == ["computed"] + ["failed"] * len(bad) + ["computed"]
    for item in items[1:-1]:
        name = Path(item["image"]).name
        assert item["image"] in item["error"] and expected[name] in item["error"].lower(), item
    spec = service_spec(http)
    assert all(read_entry(p, spec).outcome is Outcome.HIT for p in good)
    assert [p.name for p in cache_files(folder)] == ["good1.png.vggt_cache.pt", "good2.png.vggt_cache.pt"]

    write_images(folder, ["good3.png"], seed=2)
    view = wait_job(http, http.post("/precompute", json={"data_root": str(folder)}).json()["job_id"])

    assert (view["state"], view["computed"], view["skipped"], view["failed"]) == ("finished", 1, 2, len(bad))
    reasons = {Path(f["image"]).name: f["reason"].lower() for f in view["failures"]}
    assert set(reasons) == set(expected)
    assert all(expected[name] in reason for name, reason in reasons.items()), reasons
    assert len(cache_files(folder)) == 3 and temp_files(folder) == []


def test_paths_leaving_the_root_are_refused_and_nothing_is_written(
    http: httpx.Client, root: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    folder = root / "escape"
    good = write_images(folder, ["good.png"])[0]
    outside = tmp_path_factory.mktemp("outside-bad-input")
    write_images(outside, ["secret.png"])
    (folder / "linked-dir").symlink_to(outside, target_is_directory=True)
    escapes = [str(folder / "linked-dir" / "secret.png"), f"{folder}/{'../' * 20}etc/passwd"]

    for path in escapes:
        r = post_json(http, "/features", {"images": [good, path]})
        assert r.status_code == 403, (path, r.text)
        assert "outside the allowed roots" in r.json()["detail"] and path in r.json()["detail"]

    assert sorted(os.listdir(outside)) == ["secret.png"]
    assert cache_files(folder) == []  # the refused request computed nothing, not even its good image
    assert [i["status"] for i in features(http, [good])] == ["computed"]


def bytes_names(folder: Path) -> tuple[str, str, str]:
    """A plain image, a valid image and a junk file with non-UTF-8 names, as Python spells them."""
    plain = write_images(folder, ["plain.png"], seed=3)[0]
    donor = write_images(folder, ["donor.png"], seed=4)[0]
    raw = os.fsencode(folder)
    os.rename(donor, raw + b"/good-\xff.png")
    with open(raw + b"/bad-\xfe.png", "wb") as f:
        f.write(b"not an image")
    return plain, os.fsdecode(raw + b"/good-\xff.png"), os.fsdecode(raw + b"/bad-\xfe.png")


def test_non_utf8_file_names_are_served_or_fail_per_item(http: httpx.Client, root: Path) -> None:
    folder = root / "bytes-names"
    plain, good, bad = bytes_names(folder)

    items = features(http, [good, bad, plain])  # JSON carries them as \udcXX escapes

    assert [i["image"] for i in items] == [good, bad, plain]
    assert [i["status"] for i in items] == ["computed", "failed", "computed"]
    assert "cannot decode" in items[1]["error"]
    spec = service_spec(http)
    assert read_entry(good, spec).outcome is Outcome.HIT
    assert os.path.exists(os.fsencode(folder) + b"/good-\xff.png.vggt_cache.pt")

    view = wait_job(http, post_json(http, "/precompute", {"data_root": str(folder)}).json()["job_id"])

    assert (view["state"], view["computed"], view["skipped"], view["failed"]) == ("finished", 0, 2, 1), view
    assert [f["image"] for f in view["failures"]] == [f"{folder}/bad-\\xfe.png"]  # the bytes, readable
    manifest = json.loads((folder / "vggt_cache_manifest.json").read_text(encoding="utf-8"))
    assert manifest["failures"] == view["failures"]
    assert http.get("/status").status_code == 200


def test_non_utf8_names_in_refused_requests_get_a_4xx_never_a_500(http: httpx.Client, root: Path) -> None:
    folder = root / "bytes-refused"
    plain, good, _ = bytes_names(folder)

    outside = post_json(http, "/features", {"images": ["/etc/\udcff.png"]})
    assert outside.status_code == 403 and outside.json()["detail"].endswith("/etc/\\xff.png")
    not_a_name = post_json(http, "/features", {"images": [f"{folder}/\ud800.png", plain]})
    assert not_a_name.status_code == 422 and "surrogates not allowed" in not_a_name.json()["detail"][0]["msg"]
    raw_bytes = http.post(
        "/features", content=b'{"images": ["/x/\xff.png"]}', headers={"content-type": "application/json"}
    )
    assert raw_bytes.status_code == 400 and raw_bytes.json()["detail"]
    a_file = post_json(http, "/precompute", {"data_root": good})
    assert a_file.status_code == 404 and "\\xff" in a_file.json()["detail"]
    odd_dir = os.fsdecode(os.fsencode(folder) + b"/dir-\xfd")
    os.mkdir(odd_dir)
    odd_root = post_json(http, "/precompute", {"data_root": odd_dir})
    assert odd_root.status_code == 422 and "not valid UTF-8" in odd_root.json()["detail"][0]["msg"]
    assert cache_files(folder) == []


# Basic malformed bodies (bad JSON, wrong types, relative paths, 513 items) are in service/api/test_api.py;
# these are the ones whose error used to be a 500: input that JSON cannot echo back.
@pytest.mark.parametrize(
    "body, status, says",
    [
        (b'{"images": NaN}', 422, "valid list"),
        (b'{"images": ["/a.png"], "skip_existing": Infinity}', 422, "skip_existing"),
        (b'{"images": ["\\udcff"], "wait": "\\udcff"}', 422, "wait"),
        (b'{"images": ["/a\\u0000.png"]}', 422, "invalid path"),
        (json.dumps({"images": ["/a.png"] * 5000}).encode(), 413, "5000 images"),
    ],
    ids=["nan", "infinity", "surrogate-for-bool", "nul", "thousands-of-items"],
)
def test_malformed_requests_get_a_4xx_with_a_message(http: httpx.Client, body: bytes, status: int, says: str) -> None:
    r = http.post("/features", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert says in json.dumps(r.json()["detail"]), r.text
    assert http.get("/healthz").json()["status"] == "ok"


class _Payload:
    """Unpickling this runs a shell command: a cache file must never be unpickled with it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_and_misshapen_cache_files_are_never_trusted(http: httpx.Client, root: Path, server) -> None:
    folder = root / "poisoned"
    images = write_images(folder, [f"im{i}.png" for i in range(5)], seed=6)
    marker = root / "pwned"
    assert [i["status"] for i in features(http, images)] == ["computed"] * 5
    spec = service_spec(http)
    valid = torch.load(cache_path(images[4]), map_location="cpu", weights_only=True)

    Path(cache_path(images[0])).write_bytes(pickle.dumps({"features": _Payload(marker)}, protocol=2))
    torch.save({"features": _Payload(marker), "meta": valid["meta"]}, cache_path(images[1]))
    torch.save({"features": torch.zeros(3, 3, dtype=torch.bfloat16), "meta": valid["meta"]}, cache_path(images[2]))
    torch.save(
        {
            "features": valid["features"][:-1].clone(),
            "meta": {**valid["meta"], "shape": list(valid["features"][:-1].shape)},
        },
        cache_path(images[3]),
    )

    for image in images[:4]:
        assert read_entry(image, spec).outcome is Outcome.CORRUPT
    reader = FeatureCache(spec=spec, fallback="online")
    assert [t is None for t in reader.get_many(images)] == [True] * 4 + [False]
    assert reader.stats["corrupt"] == 4
    verify = [sys.executable, "-m", "vggt_cache.service.cli", "verify", str(folder), "--server", server.url, "--json"]
    before = subprocess.run(verify, cwd=REPO, capture_output=True, text=True, timeout=120)
    report = json.loads(before.stdout)
    assert before.returncode == 1 and report["counts"]["corrupt"] == 4 and report["counts"]["hit"] == 1
    assert {Path(p["image"]).name for p in report["problems"]} == {f"im{i}.png" for i in range(4)}

    items = features(http, images)

    assert [i["status"] for i in items] == ["computed"] * 4 + ["cached"]
    assert not marker.exists()
    after = subprocess.run(verify, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert after.returncode == 0, after.stdout
    assert all(read_entry(p, spec).outcome is Outcome.HIT for p in images)
