"""Where a sample's image paths lead: resolved against the sample file, the data root or a `data_path`."""

from __future__ import annotations

import os
from collections.abc import Iterator

from vggt_cache.client.safeopen import OutsideRoots, absolute
from vggt_cache.client.text import shorten
from vggt_cache.service.frametable import FrameTable
from vggt_cache.service.paths import AllowedRoots

_UNSEEN = ""  # never a resolved path (None is an answer: not found)
MEMO_NAMES = 1 << 12  # answers kept per sample folder: a JSON array names its frames in a few neighbouring samples
MEMO_FOLDERS = 1 << 10  # (sample folder, data_path) pairs memoised


def norm_path(path: str) -> str:
    # Symlinks are kept as written: containment is checked where paths are opened. (abspath normalises.)
    return absolute(path)


def _joined(folder: str, raw: str) -> str:
    """`norm_path(os.path.join(folder, raw))` for a normalised absolute `folder` and a relative `raw` (a sample
    file names each frame: no `os.path.join`)."""
    return absolute(f"{folder}/{raw}") if folder != "/" else norm_path(os.path.join(folder, raw))


class PathResolver:
    """Resolves a sample's image path to an existing file, memoised per sample folder.

    Absolute paths are used as they are. A relative path is joined to `data_root/<data_path>`
    when the sample (first) or the run gives a `data_path`; otherwise it is looked up next to
    the sample file, then under the data root, and the first existing file wins. With `allowed`,
    a candidate outside them is never looked at: whether such a file exists must not show.
    """

    def __init__(
        self,
        data_root: str,
        data_path: str | None,
        allowed: AllowedRoots | None = None,
        table: FrameTable | None = None,
    ) -> None:
        self.data_root = data_root
        self.data_path = data_path
        self.allowed = allowed
        self.table = FrameTable(allowed) if table is None else table
        # (sample folder, data_path) -> raw name -> its answer; a sample file's names for a clip's frames are the
        # same few names again and again, each looked up in a dict here rather than resolved anew.
        self._memo: dict[tuple[str, str | None], dict[str, str | None]] = {}

    def candidates(self, raw: str, sample_dir: str, data_path: str | None) -> Iterator[str]:
        """Where `raw` may be, in the order looked at (each made only if the one before is not taken)."""
        if raw[:1] == "/":  # os.path.isabs(raw), without its call: made for each new name
            yield norm_path(raw)
            return
        if data_path is None:
            data_path = self.data_path
        if data_path is not None:
            yield norm_path(os.path.join(self.data_root, data_path, raw))
            return
        beside = _joined(sample_dir, raw)
        yield beside
        under_root = _joined(self.data_root, raw)
        if under_root != beside:
            yield under_root

    def permits(self, path: str) -> bool:
        """True without roots, or when `path` is inside them (decided from the name, before any stat of it)."""
        if self.allowed is None:
            return True
        try:
            self.table.contain(path)
        except (OutsideRoots, ValueError):
            return False
        return True

    def clip(self, raws: list[str], sample_dir: str, data_path: str | None) -> tuple[list[str], str | None]:
        """Each of `raws` resolved, in order, up to the first that is not found, and that one's raw name (None
        when every one resolved). An answer is the first existing candidate inside the roots; else the first
        outside them, unlooked at (the plan refuses it, in the same words whether it exists or not)."""
        memo = self._memo.get((sample_dir, data_path))
        if memo is None or len(memo) > MEMO_NAMES:  # bounded: a sample file's neighbouring samples share names
            if len(self._memo) > MEMO_FOLDERS:  # a data_path of its own in every sample, say
                self._memo.clear()
            memo = self._memo[(sample_dir, data_path)] = {}
        frames: list[str] = []
        for raw in raws:
            resolved = memo.get(raw, _UNSEEN)
            if resolved is _UNSEEN:
                resolved = memo[raw] = self._resolve(raw, sample_dir, data_path)
            if resolved is None:
                return frames, raw
            frames.append(resolved)
        return frames, None

    def _resolve(self, raw: str, sample_dir: str, data_path: str | None) -> str | None:
        outside = None
        for path in self.candidates(raw, sample_dir, data_path):
            if not self.permits(path):
                outside = outside or path
            elif self.table.is_file(path):
                return path
        return outside

    def why_not(self, raw: str, sample_dir: str, data_path: str | None) -> str:
        """Why `raw` did not resolve, its paths shortened (a name in a sample file can be of any length)."""
        looked = ", ".join(shorten(p) for p in self.candidates(raw, sample_dir, data_path))
        return f"image not found: {shorten(raw)} (looked for {looked})"
