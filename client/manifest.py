"""`<data_root>/vggt_cache_manifest.json`: what the last job over a data root did.

The service writes it when a job ends (counts, spec, preset, plan, model, timing,
failures); `vggt-cache verify` reads the spec and the history rule back from it, and
a `FeatureCache` without a spec takes the spec of the nearest one above an image, up to
its data root. A manifest is read like any file someone else may have planted: a regular
file of bounded size, opened non-blocking (a FIFO cannot hang the reader).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence

from vggt_cache.client.safeopen import DEFAULT_FILE_MODE, atomic_write, open_regular, temp_of
from vggt_cache.client.text import bounded

MANIFEST_NAME = "vggt_cache_manifest.json"
MANIFEST_VERSION = 1
MAX_FAILURES = 1000  # keeps the file readable for datasets with many bad images
# Far above what a manifest of MAX_FAILURES failures holds; a larger file is not ours and is not parsed.
MAX_MANIFEST_BYTES = 64 * 1024 * 1024


def manifest_path(data_root: str) -> str:
    return os.path.join(data_root, MANIFEST_NAME)


def _capped_failures(failures: list) -> tuple[list[dict], int]:
    pairs = (f if isinstance(f, dict) else {"image": f[0], "reason": f[1]} for f in failures[:MAX_FAILURES])
    listed = [{**f, "image": bounded(str(f["image"])), "reason": bounded(str(f["reason"]))} for f in pairs]
    return listed, max(0, len(failures) - MAX_FAILURES)


def is_manifest_temp_file(name: str) -> bool:
    """True for the name of a temporary file a manifest write goes through (left behind if its process was killed)."""
    return temp_of(name) == MANIFEST_NAME


def write_manifest(
    data_root: str, record: dict, roots: Sequence[str] | None = None, mode: int = DEFAULT_FILE_MODE
) -> str:
    """Write `record` (counts, spec, model, timing, failures, ...) atomically; return the path.

    `roots` (real paths): the data root must lie inside one when it is opened for the write.
    `mode`: the file's permissions, whatever the writer's umask.

    `failures` may hold dicts or (image, reason) pairs; only the first MAX_FAILURES
    are listed, each string `bounded`, and `failures_omitted` counts the rest: of the list given, or of the
    record's `failed` count when the caller passed only the first ones.
    """
    body = {"manifest_version": MANIFEST_VERSION, **record}
    body["failures"], omitted = _capped_failures(list(record.get("failures", [])))
    body["failures_omitted"] = max(omitted, int(record.get("failed", 0)) - len(body["failures"]))
    text = json.dumps(body, indent=2, ensure_ascii=False) + "\n"  # before any file is touched

    path = manifest_path(data_root)
    atomic_write(path, lambda f: f.write(text.encode("utf-8")), roots, mode=mode)
    return path


_seen: dict[str, tuple[int, int, dict | None]] = {}  # path -> (mtime_ns, size, body): re-read when it changes
_seen_lock = threading.Lock()


def nearest_manifest(path: str | os.PathLike, root: str | os.PathLike | None) -> tuple[str, dict] | None:
    """(manifest path, body) of the nearest manifest at or above `path`'s folder and at or below `root`, or None.

    `root` (the data root) bounds the search: a manifest planted in a parent folder (`/tmp`, a
    shared mount) is never used; None, or a `path` outside `root`: only `path`'s own folder is
    looked at. One `stat` per folder level; a manifest is parsed again only when it changed, so
    one written after the first lookup is seen. An unreadable manifest raises ValueError.
    """
    folder = os.path.dirname(os.path.abspath(path))
    top = folder if root is None else os.path.abspath(root)
    if folder != top and not folder.startswith(top.rstrip(os.sep) + os.sep):
        top = folder
    while True:
        candidate = manifest_path(folder)
        try:
            st = os.stat(candidate)
        except OSError:
            st = None
        if st is not None:
            with _seen_lock:
                known = _seen.get(candidate)
            if known is None or known[:2] != (st.st_mtime_ns, st.st_size):
                known = (st.st_mtime_ns, st.st_size, read_manifest(folder))
                with _seen_lock:
                    _seen[candidate] = known
            if known[2] is not None:
                return candidate, known[2]
        if folder == top:
            return None
        folder = os.path.dirname(folder)


def read_manifest(data_root: str) -> dict | None:
    """The manifest as written, or None when there is none; ValueError when it is unreadable
    (not a regular file, over MAX_MANIFEST_BYTES, not readable, not a JSON object)."""
    path = manifest_path(data_root)
    try:
        with open_regular(path, MAX_MANIFEST_BYTES) as f:
            data = f.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ValueError(f"unreadable manifest {path}: {e.strerror or e}") from e
    if len(data) > MAX_MANIFEST_BYTES:  # grew after its size was checked
        raise ValueError(f"unreadable manifest {path}: over {MAX_MANIFEST_BYTES} bytes")
    try:
        body = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # RecursionError: arrays nested thousands deep
        raise ValueError(f"corrupt manifest {path}: {e}") from e
    if not isinstance(body, dict):
        raise ValueError(f"corrupt manifest {path}: expected a JSON object, got {type(body).__name__}")
    return body
