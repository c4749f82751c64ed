"""Scanning a data root into the units of work of a bulk precompute job."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

from service.units import ATTENTION_MODES, Unit

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
SAMPLE_SUFFIX = ".jsonl"
_CACHE_MARK = ".vggt_cache.pt"


@dataclass
class ScanResult:
    units: list[Unit]
    problems: list[tuple[str, str]]  # (where, reason): "file:line" or a path
    source_kind: str  # "jsonl" | "images"
    num_samples: int  # JSON samples read (jsonl) or image files found (images)
    # Targets that more than one distinct clip produces: a sibling file holds one
    # context, so such images flip between contexts (the last one computed wins).
    conflicts: int = 0


class _Malformed(ValueError):
    """A sample line that is not one of the seed's shapes."""


def _norm(path: str) -> str:
    # Symlinks are kept as written: containment is checked where paths are served.
    return os.path.normpath(os.path.abspath(path))


def _hidden(name: str) -> bool:
    return name.startswith((".", "~"))


def walk_files(root: str) -> Iterator[tuple[str, list[str]]]:
    """(folder, sorted file names) for every non-hidden folder, sorted, symlink loops cut."""
    seen: set[str] = set()
    for folder, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not _hidden(d))
        yield folder, sorted(f for f in filenames if not _hidden(f))


def _is_image(name: str) -> bool:
    return _CACHE_MARK not in name and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _string_list(value: object, key: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise _Malformed(f"{key!r} must be a non-empty string or a list of them")
    return value


def sample_images(sample: object) -> tuple[list[str], str | None]:
    """The clip a sample asks for (raw paths, in order) and its own data_path."""
    if not isinstance(sample, dict):
        raise _Malformed("not a JSON object")
    data_path = sample.get("data_path")
    if data_path is not None and not isinstance(data_path, str):
        raise _Malformed("'data_path' must be a string")
    if "history_images" in sample or "current_image" in sample:
        current = sample.get("current_image")
        if not isinstance(current, str) or not current:
            raise _Malformed("'current_image' must be a non-empty string")
        return _string_list(sample.get("history_images", []), "history_images") + [current], data_path
    for key in ("images", "image"):
        if key in sample:
            return _string_list(sample[key], key), data_path
    return [], data_path  # a text-only sample needs no features


class PathResolver:
    """Resolves a sample's image path to an existing file, memoised per (path, bases)."""

    def __init__(self, data_root: str, data_path: str | None) -> None:
        self.data_root = data_root
        self.data_path = data_path
        self._memo: dict[tuple[str, str, str | None], str | None] = {}

    def candidates(self, raw: str, jsonl_dir: str, data_path: str | None) -> list[str]:
        if os.path.isabs(raw):
            return [_norm(raw)]
        data_path = data_path if data_path is not None else self.data_path
        if data_path is not None:
            return [_norm(os.path.join(self.data_root, data_path, raw))]
        return list(dict.fromkeys(_norm(os.path.join(base, raw)) for base in (jsonl_dir, self.data_root)))

    def resolve(self, raw: str, jsonl_dir: str, data_path: str | None) -> str | None:
        key = (raw, jsonl_dir, data_path)
        if key not in self._memo:
            found = [p for p in self.candidates(raw, jsonl_dir, data_path) if os.path.isfile(p)]
            self._memo[key] = found[0] if found else None
        return self._memo[key]


class UnitPlanner:
    """Turns resolved clips into deduplicated units, in first-seen order."""

    def __init__(self, attention: str) -> None:
        self.attention = attention
        self.units: list[Unit] = []
        self._seen: set[tuple[str, ...]] = set()
        self._owner: dict[str, tuple[str, ...]] = {}
        self._conflicted: set[str] = set()

    def add_clip(self, frames: list[str]) -> None:
        clips = [(f,) for f in frames] if self.attention == "frame" else [tuple(frames)]
        for clip in clips:
            if clip in self._seen:
                continue
            self._seen.add(clip)
            unit = Unit.for_clip(self.attention, clip)
            self.units.append(unit)
            for target in unit.targets:
                if self._owner.setdefault(target, clip) != clip:
                    self._conflicted.add(target)

    @property
    def conflicts(self) -> int:
        return len(self._conflicted)


def _scan_jsonl(files: list[str], root: str, attention: str, data_path: str | None) -> ScanResult:
    resolver = PathResolver(root, data_path)
    planner = UnitPlanner(attention)
    problems: list[tuple[str, str]] = []
    num_samples = 0
    for path in files:
        jsonl_dir = os.path.dirname(path)
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    raw_clip, sample_data_path = sample_images(json.loads(line))
                except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError too
                    problems.append((where, f"malformed sample: {e}"))
                    continue
                num_samples += 1
                clip, complete = [], True
                for raw in raw_clip:
                    resolved = resolver.resolve(raw, jsonl_dir, sample_data_path)
                    if resolved is None:
                        looked = ", ".join(resolver.candidates(raw, jsonl_dir, sample_data_path))
                        problems.append((where, f"image not found: {raw} (looked for {looked})"))
                        complete = False
                    else:
                        clip.append(resolved)
                # A clip with a hole would give its frames the wrong context; lone frames stand alone.
                if clip and (complete or attention == "frame"):
                    planner.add_clip(clip)
    return ScanResult(planner.units, problems, "jsonl", num_samples, planner.conflicts)


def scan_data_root(data_root: str, attention: str, data_path: str | None = None) -> ScanResult:
    """The units of work under `data_root` for `attention` mode.

    Samples: every `*.jsonl` below the root (sorted walk; hidden files and folders
    skipped). Each line is a JSON object with `images` (list or string), `image`,
    or `history_images` + `current_image`; its frames in that order form a clip.
    Lines without image fields are text-only and skipped; unreadable or
    ill-typed lines and missing images are `problems` ("file:line", reason); a
    clip with a missing frame is left out (in `frame` mode only that image is).

    Path rule: absolute paths are used as they are. A relative path is joined to
    `data_root/<data_path>` when the sample (first) or the argument gives a
    `data_path` (itself relative to `data_root` unless absolute). Otherwise it is
    looked up next to the jsonl file first, then under `data_root`; the first
    existing file wins. Paths are made absolute and normalised, symlinks kept.

    Units: `frame` -> one per unique image; `sequence` -> one per unique clip, all
    frames targets; `causal` -> one per unique clip, its last frame the target.

    Without any jsonl, image files (jpg/jpeg/png/bmp/webp/tif/tiff, any case;
    hidden, `~` temp and cache files skipped) are the work, in `frame` mode only:
    clips need samples to say what they are.
    """
    if attention not in ATTENTION_MODES:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION_MODES)}, got {attention!r}")
    root = _norm(data_root)
    if not os.path.isdir(root):
        raise ValueError(f"data root is not a directory: {root}")
    sample_files: list[str] = []
    images: list[str] = []
    for folder, names in walk_files(root):
        for name in names:
            if name.endswith(SAMPLE_SUFFIX):
                sample_files.append(os.path.join(folder, name))
            elif _is_image(name):
                images.append(os.path.join(folder, name))
    if sample_files:
        return _scan_jsonl(sample_files, root, attention, data_path)
    if attention != "frame":
        raise ValueError(
            f"{attention} attention needs clips: no *.jsonl samples found under {root} "
            "(an image folder alone is only work for frame attention)"
        )
    return ScanResult([Unit.frame(p) for p in images], [], "images", len(images))


def shard(units: list[Unit], rank: int, world_size: int) -> list[Unit]:
    """This rank's share: every `world_size`-th unit from `rank` (balanced to within one)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
    return units[rank::world_size]
