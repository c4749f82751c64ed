"""Weights fingerprint ("sha256:<hex>" of the file), memoised by (path, size, mtime_ns) in a JSON sidecar."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger("vggt_cache")

_CHUNK = 8 << 20


def sidecar_path() -> Path:
    """`$VGGT_CACHE_HOME/fingerprints.json` (default `~/.cache/vggt-cache/fingerprints.json`)."""
    home = os.environ.get("VGGT_CACHE_HOME") or os.path.join("~", ".cache", "vggt-cache")
    return Path(home).expanduser() / "fingerprints.json"


def file_fingerprint(path: str | os.PathLike) -> str:
    """Fingerprint "sha256:<hex>" of the file's bytes, hashed once per (absolute path, size, mtime_ns)."""
    path = os.path.abspath(path)
    st = os.stat(path)
    sidecar = sidecar_path()
    entries = _read_sidecar(sidecar)
    entry = entries.get(path)
    if isinstance(entry, dict) and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns:
        return entry["fingerprint"]
    fingerprint = "sha256:" + _sha256_file(path)
    after = os.stat(path)
    if (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
        log.warning("%s changed while it was hashed; its fingerprint is not memoised", path)
        return fingerprint
    # Re-read so entries written by other processes meanwhile survive; forget deleted files.
    entries = {p: e for p, e in _read_sidecar(sidecar).items() if os.path.exists(p)}
    entries[path] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "fingerprint": fingerprint}
    _write_sidecar(sidecar, entries)
    return fingerprint


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _read_sidecar(sidecar: Path) -> dict:
    try:
        with open(sidecar, encoding="utf-8") as f:
            entries = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable fingerprint cache %s: %s", sidecar, exc)
        return {}
    return entries if isinstance(entries, dict) else {}


def _write_sidecar(sidecar: Path, entries: dict) -> None:
    """Atomic replace; a read-only cache home only costs a re-hash next time."""
    try:
        sidecar.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=sidecar.parent, prefix=".fingerprints-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(entries, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, sidecar)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as exc:
        log.warning("could not write fingerprint cache %s: %s", sidecar, exc)
