"""A data root's training samples: the one parser behind bulk jobs, `verify` and the training dataset.

A sample is an ordered clip of frames, its current view last. Three layouts hold them
(checked in JanusVLN's and NewJanusVLN's own code, see docs/janusvln.md):

- **sample files**: `*.jsonl` (one JSON object a line) and `*.json` files whose top level
  is an array of sample objects (JanusVLN's `create_data.py` output). A sample object names
  its frames as `images` (list or string), `image`, or `history_images` + `current_image`.
  Any other JSON (a per-step description, a manifest, an object) is not a sample file.
- **episode folders** (NewJanusVLN's `train_data_root`): frames `step_<n>_<ACTION>.<png|jpg|jpeg>`
  (any case), in numeric step order. Every step `j` is a sample of `H + 1` frames: steps
  `0..j` left-padded with copies of step 0 while `j <= H`, else `numpy.linspace(0, j, H + 1,
  dtype=int)` (positions in step order). JSON files inside an episode folder are its
  descriptions, never opened here.
- **images**: without either, every image file under the root is a sample of one frame
  (clips need samples to say what they are, so only `frame` attention can use these).

Sample files are read one sample at a time (a jsonl line, an element of the JSON array), each
at most `max_sample_bytes`: a file of any size costs the memory of one sample and of the
samples found. What cannot be read (bad JSON or UTF-8, nesting too deep, a sample too large, a
folder the walk cannot list) is a problem, reported where it is, and the rest is read.

A `*.jsonl` or `*.json` file is a sample file when its first sample object has one of the
sample keys (its frames, `conversations` or `instruction`): a training log next to the data
is not. Sample files win over episode folders (which are then reported as ignored), which win
over loose images. The walk is sorted and skips hidden folders and files, cache files and our
temporary files.
"""

from __future__ import annotations

import functools
import io
import itertools
import json
import logging
import os
import re
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

from vggt_cache.client.safeopen import OutsideRoots, nameable, open_regular
from vggt_cache.client.text import bounded
from vggt_cache.service.errors import UnusableInput
from vggt_cache.service.frametable import FrameTable
from vggt_cache.service.jsonstream import ArrayStream, MalformedSample, lines
from vggt_cache.service.paths import AllowedRoots
from vggt_cache.service.samplepaths import PathResolver, norm_path
from vggt_cache.service.walk import STEP_FRAME, Found, is_image, walk_root

DEFAULT_MAX_HISTORY = 8
# The longest history a sample may ask for: every known recipe fits (JanusVLN 8, VG-LLM up to 32 frames),
# and a clip of more frames than this is not a sample but a mistake (or memory for nobody else).
MAX_HISTORY_IMAGES = 64
# One sample (a jsonl line, an element of a JSON array) is read into memory whole; past this it is a problem.
MAX_SAMPLE_BYTES = 1 << 20
# The keys that make a JSON object a sample (its frames, or a conversation about them).
_SAMPLE_KEYS = ("images", "image", "current_image", "history_images", "conversations", "instruction")

log = logging.getLogger("vggt_cache")


@dataclass(frozen=True)
class Sample:
    """One training sample: resolved frames in clip order (the current view last; empty for text only)."""

    frames: tuple[str, ...]
    where: str  # "file:line", "file[index]" or, for an episode step, the step's image
    record: dict | None = None  # the sample object, or the episode step (see EpisodeStep.record)


@dataclass
class SampleSet:
    """Every sample of a data root, and what could not be used: (where, reason) pairs."""

    samples: list[Sample]
    malformed: list[tuple[str, str]]  # unreadable sample files, ill-typed samples, ambiguous episodes
    missing: list[tuple[str, str]]  # samples left out because a frame does not exist
    unlisted: list[tuple[str, str]]  # folders (or entries) the walk could not read: what they hold is unknown
    source: str  # jsonl | json | jsonl+json | episodes | images
    files: int  # sample files read, or episode folders, or image files
    max_history_images: int | None = None  # the history rule applied (episode folders only)
    ignored_episodes: int = 0  # episode folders left aside because sample files were found
    named_files: list[str] | None = None  # the sample files asked for, when they were named
    count: int | None = None  # samples read, when they were streamed (`SampleStream`) rather than kept

    @property
    def problems(self) -> list[tuple[str, str]]:
        return self.malformed + self.missing + self.unlisted

    @property
    def problem_count(self) -> int:
        return len(self.malformed) + len(self.missing) + len(self.unlisted)

    def first_problems(self, n: int) -> list[tuple[str, str]]:
        """`problems[:n]`, without copying them all (a streamed plan asks at every piece)."""
        return list(itertools.islice(itertools.chain(self.malformed, self.missing, self.unlisted), n))

    @property
    def num_samples(self) -> int:
        return len(self.samples) if self.count is None else self.count

    def describe(self) -> dict:
        """What a job view and a manifest say about where the work came from."""
        return {
            "source": self.source,
            "files": self.files,
            "samples": self.num_samples,
            "max_history_images": self.max_history_images,
            "ignored_episode_folders": self.ignored_episodes,
            "sample_files": self.named_files,
        }


def file_list(text: str) -> list[str]:
    """`a.jsonl, b/c.json` -> the sample files named (the `--data_files` flags of precompute and training)."""
    return [f.strip() for f in text.split(",") if f.strip()]


def check_history(max_history: int) -> int:
    """`max_history` if it is a usable history length (1 to MAX_HISTORY_IMAGES earlier frames), else ValueError.

    The one check of every entry point (CLI, API, jobs, verify, training).
    """
    if isinstance(max_history, bool) or not isinstance(max_history, int) or not 1 <= max_history <= MAX_HISTORY_IMAGES:
        raise UnusableInput(
            f"max_history_images must be an integer of at least 1 and at most {MAX_HISTORY_IMAGES}, "
            f"got {max_history!r}",
            loc=("body", "max_history_images"),
        )
    return max_history


def check_sample_bytes(limit: int) -> int:
    """`limit` if it is a usable bound on one sample's bytes, else ValueError."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1024:
        raise ValueError(f"max_sample_bytes must be an integer of at least 1024, got {limit!r}")
    return limit


def history_indices(step: int, max_history: int) -> list[int]:
    """Positions (in step order) of the frames of episode sample `step`, its own last (the rule above)."""
    check_history(max_history)
    return list(_history_indices(step, max_history))


@functools.lru_cache(maxsize=1 << 14)  # every episode asks the same (step, history) pairs: numpy once each
def _history_indices(step: int, max_history: int) -> tuple[int, ...]:
    if step <= max_history:
        return (0,) * (max_history - step) + tuple(range(step + 1))
    return tuple(np.linspace(0, step, max_history + 1, dtype=int).tolist())


def _string_list(value: object, key: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise MalformedSample(f"{key!r} must be a non-empty string or a list of them")
    try:
        joined: str | None = "".join(value)  # a TypeError unless every one is a str
    except TypeError:
        joined = None
    # All the names looked at once, in C (a sample names nine); a list that fails them is looked at name by name,
    # to say which and why.
    if joined is None or not all(value) or "\x00" in joined or not joined.isascii():
        for v in value:
            if not isinstance(v, str) or not v:
                raise MalformedSample(f"{key!r} must be a non-empty string or a list of them")
            _check_name(v, key)
    return value


def _check_name(name: str, key: str) -> None:
    """A name no file can have (a NUL; a lone surrogate, which no file name decodes to) is the sample's fault:
    said as one, before it reaches a path, a unit or the job store."""
    if not nameable(name):
        why = "a NUL byte" if "\x00" in name else "a lone surrogate"
        raise MalformedSample(f"{key!r} names a path no file can have ({why}): {bounded(name)}")


def _step_frame(name: str) -> re.Match[str]:
    found = STEP_FRAME.match(name)
    assert found is not None, name  # an episode's names are those STEP_FRAME matched
    return found


def sample_images(sample: object) -> tuple[list[str], str | None]:
    """The clip a sample object asks for (raw paths, in order) and its own data_path."""
    if not isinstance(sample, dict):
        raise MalformedSample("not a JSON object")
    data_path = sample.get("data_path")
    if data_path is not None:
        if not isinstance(data_path, str):
            raise MalformedSample("'data_path' must be a string")
        _check_name(data_path, "data_path")
    if "history_images" in sample or "current_image" in sample:
        current = sample.get("current_image")
        if not isinstance(current, str) or not current:
            raise MalformedSample("'current_image' must be a non-empty string")
        _check_name(current, "current_image")
        return [*_string_list(sample.get("history_images", []), "history_images"), current], data_path
    for key in ("images", "image"):
        if key in sample:
            return _string_list(sample[key], key), data_path
    return [], data_path  # a text-only sample needs no features


def _is_sample_object(value: object) -> bool:
    return isinstance(value, dict) and any(k in value for k in _SAMPLE_KEYS)


def _sample_file_size(path: str, table: FrameTable) -> int:
    """The size of sample file `path` from the table's one `lstat` of it; 0 when it is not a regular file there,
    or lies outside the table's roots (never stat-ed: its size must not show)."""
    if table.allowed is not None:
        try:
            table.contain(path)
        except (OutsideRoots, ValueError):
            return 0
    size, _, _, regular, _ = table.look(path)
    return size if regular else 0


def _open_sample_file(path: str, allowed: AllowedRoots | None) -> BinaryIO:
    """A buffered reader of a sample file: regular, and inside `allowed` when opened (NotRegularFile, OutsideRoots)."""
    return io.BufferedReader(open_regular(path, roots=None if allowed is None else allowed.real))


def _is_sample_jsonl(path: str, allowed: AllowedRoots | None, limit: int) -> bool:
    """A `*.jsonl` file is a sample file unless its first parsable line is an object of something else."""
    with _open_sample_file(path, allowed) as f:
        for _, line in lines(f, limit):
            if line is None:
                return True  # an oversized line: read it as samples, so it is reported
            if not line.strip():
                continue
            try:
                first = json.loads(line)
            except (ValueError, RecursionError):
                return True  # a broken line: read it as samples, so it is reported
            return not isinstance(first, dict) or _is_sample_object(first)
    return True


class _Reader:
    """Turns sample objects and episode steps into Samples, collecting problems as it goes."""

    def __init__(
        self,
        root: str,
        data_path: str | None,
        keep_records: bool,
        allowed: AllowedRoots | None,
        max_sample_bytes: int,
        table: FrameTable | None,
    ) -> None:
        self.resolver = PathResolver(root, data_path, allowed, table)
        self.allowed = allowed
        self.max_sample_bytes = max_sample_bytes
        self.keep_records = keep_records
        self.malformed: list[tuple[str, str]] = []
        self.missing: list[tuple[str, str]] = []
        self.open_file: BinaryIO | None = None  # the sample file being read (closed once read)

    def sample(self, obj: object, where: str, sample_dir: str) -> Sample | None:
        """The sample `obj`, or None (a problem recorded) when it is malformed or a frame is missing."""
        try:
            raw_clip, data_path = sample_images(obj)
        except MalformedSample as e:
            self.malformed.append((where, f"malformed sample: {e}"))
            return None
        frames, missing = self.resolver.clip(raw_clip, sample_dir, data_path)
        if missing is not None:
            self.missing.append((where, self.resolver.why_not(missing, sample_dir, data_path)))
            return None  # a clip with a hole would give its frames the wrong context
        record = obj if self.keep_records and isinstance(obj, dict) else None  # sample_images took a dict
        return Sample(tuple(frames), where, record)

    def _open(self, path: str) -> BinaryIO:
        self.open_file = _open_sample_file(path, self.allowed)
        return self.open_file

    def bytes_read(self) -> int:
        """Bytes read of the sample file being read (0 when none is)."""
        f = self.open_file
        return 0 if f is None or f.closed else f.tell()

    def read_jsonl(self, path: str, named: bool = False) -> Generator[Sample, None, bool]:
        """The samples of a `*.jsonl` sample file; returns False when it is not one (a `named` file always is)."""
        sample_dir = os.path.dirname(path)
        try:
            if not named and not _is_sample_jsonl(path, self.allowed, self.max_sample_bytes):
                return False
            with self._open(path) as f:
                for lineno, line in lines(f, self.max_sample_bytes):
                    where = f"{path}:{lineno}"
                    if line is None:
                        self.malformed.append(
                            (
                                where,
                                f"malformed sample: a line of more than "
                                f"{self.max_sample_bytes} bytes (max_sample_bytes), not read",
                            )
                        )
                        continue
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError too
                        reason = "nested too deeply to parse" if isinstance(e, RecursionError) else e
                        self.malformed.append((where, f"malformed sample: {reason}"))
                        continue
                    sample = self.sample(obj, where, sample_dir)
                    if sample is not None:
                        yield sample
        except OSError as e:
            self.malformed.append((path, f"cannot read sample file: {e.strerror or e}"))
        return True

    def read_json(self, path: str, named: bool = False) -> Generator[Sample, None, bool]:
        """The samples of a `*.json` sample file, one element at a time; returns False when it is not one (a
        problem when `named`).

        It is one when it holds an array whose first element is a sample object. An element that
        cannot be read ends the file's reading there: a problem, and the samples before it stay.
        """
        read = 0  # elements read: an error is at element `read`
        try:
            with self._open(path) as f:
                elements = ArrayStream(f, self.max_sample_bytes).elements()
                first = next(elements, None) if elements is not None else None
                if elements is None or not _is_sample_object(first):
                    if named:
                        self.malformed.append((path, "not a sample file: a JSON array of sample objects was expected"))
                    return named
                sample_dir = os.path.dirname(path)
                for obj in itertools.chain([first], elements):
                    sample = self.sample(obj, f"{path}[{read}]", sample_dir)
                    read += 1
                    if sample is not None:
                        yield sample
        except MalformedSample as e:
            self.malformed.append((f"{path}[{read}]", f"malformed sample file: {e}; the rest of the file was not read"))
        except OSError as e:
            self.malformed.append((path, f"cannot read sample file: {e.strerror or e}"))
        return True

    def read_episode(self, folder: str, names: list[str], max_history: int) -> Iterator[Sample]:
        steps = sorted((int(_step_frame(n).group(1)), n) for n in names)
        numbers = [n for n, _ in steps]
        if len(set(numbers)) != len(numbers):
            twice = sorted({n for n in numbers if numbers.count(n) > 1})
            self.malformed.append(
                (
                    folder,
                    f"more than one frame for step(s) {twice[:5]}: step order is ambiguous "
                    "(frames of one step are taken in name order)",
                )
            )
        frames = [norm_path(os.path.join(folder, name)) for _, name in steps]
        for j, (number, name) in enumerate(steps):
            clip = tuple(frames[i] for i in _history_indices(j, max_history))
            record = None
            if self.keep_records:
                record = {
                    "episode": folder,
                    "step": number,
                    "action": _step_frame(name).group(2).upper(),
                    "image": frames[j],
                }
            yield Sample(clip, frames[j], record)


class SampleStream:
    """The samples under a data root, read as they are iterated: a sample file, or an episode folder, at a time.

    The walk is done when it is made; the samples, and the problems met reading them, come as the
    stream is iterated (once). `sample_set()` then says what was read, as `find_samples` does.
    """

    def __init__(
        self,
        data_root: str,
        max_history_images: int = DEFAULT_MAX_HISTORY,
        data_path: str | None = None,
        files: Sequence[str] | None = None,
        keep_records: bool = False,
        allowed: AllowedRoots | None = None,
        max_sample_bytes: int = MAX_SAMPLE_BYTES,
        table: FrameTable | None = None,
    ) -> None:
        """See `find_samples`."""
        self.max_history_images = check_history(max_history_images)
        check_sample_bytes(max_sample_bytes)
        root = norm_path(data_root)
        if not os.path.isdir(root):
            raise UnusableInput(f"data root is not a directory: {root}")
        self.root = root
        self.named_files = list(files) if files else None
        self.table = table = FrameTable(allowed) if table is None else table
        self.reader = _Reader(root, data_path, keep_records, allowed, max_sample_bytes, table)
        if files:
            self.found = Found()
            for f in files:
                path = norm_path(os.path.join(root, f))
                (self.found.jsonl if path.endswith(".jsonl") else self.found.json).append(path)
        else:
            self.found = walk_root(root, allowed, table)
        self.count = 0  # samples read so far
        self.loose_images = False  # the samples are now loose images: no sample files, no episode folders
        self._kinds: list[str] = []
        self._files = 0
        self._files_read = 0  # sample files read to their end
        self._bytes_before: list[int] | None = None  # the sample files' sizes summed before each, in reading order
        # Episode steps or loose images, once they are read: (the samples before them, their number).
        self._frames: tuple[int, int] | None = None
        self._told: tuple[int, int] | None = None  # problems `new_problems` gave: malformed, missing
        self._reading: tuple[str, int] | None = None  # the kind of sample file being read, from which sample

    @property
    def source(self) -> str:
        """The layout read so far (`SampleSet.source`; "" before the first sample is read)."""
        kinds = self._kinds
        if self._reading is not None and self.count > self._reading[1]:  # sample files of a kind give samples
            kinds = [*kinds, self._reading[0]]
        return "+".join(kinds)

    def read_fraction(self) -> float:
        """How much of the root's samples were read, 0 to 1: episode steps and loose images by their number, sample
        files by their bytes. A job's view scales its total by it while it plans."""
        if self._frames is not None:
            before, frames = self._frames
            return min(1.0, (self.count - before) / frames) if frames else 1.0
        if self._bytes_before is None:  # one look a sample file, at the first ask
            sizes = (_sample_file_size(p, self.table) for p in itertools.chain(self.found.jsonl, self.found.json))
            self._bytes_before = list(itertools.accumulate(sizes, initial=0))
        total = self._bytes_before[-1]
        if not total:
            return 0.0
        return min(1.0, (self._bytes_before[self._files_read] + self.reader.bytes_read()) / total)

    def new_problems(self) -> list[tuple[str, str]]:
        """The problems met since the last call (the walk's unlisted folders in the first answer)."""
        malformed, missing = self.reader.malformed, self.reader.missing
        first = self._told is None
        m, n = self._told or (0, 0)
        self._told = (len(malformed), len(missing))
        return malformed[m:] + missing[n:] + (self.found.unlisted if first else [])

    def __iter__(self) -> Iterator[Sample]:
        for sample in self._samples():
            self.count += 1
            yield sample

    def _samples(self) -> Iterator[Sample]:
        reader, found, named = self.reader, self.found, bool(self.named_files)
        for kind, paths, read in (("jsonl", found.jsonl, reader.read_jsonl), ("json", found.json, reader.read_json)):
            sample_files, self._reading = 0, (kind, self.count)
            for path in paths:
                sample_files += yield from read(path, named)
                self._files_read += 1
            self._reading = None
            if sample_files:
                self._kinds.append(kind)
                self._files += sample_files
        if self._kinds:
            if found.episodes:
                log.warning(
                    "%s: %d episode folder(s) ignored, because sample files were found (e.g. %s); "
                    "name the sample files to use, or remove them",
                    self.root,
                    len(found.episodes),
                    found.episodes[0][0],
                )
        elif found.episodes:
            self._kinds.append("episodes")
            self._files = len(found.episodes)
            self._frames = (self.count, sum(len(names) for _, names in found.episodes))
            for folder, names in found.episodes:
                yield from reader.read_episode(folder, names, self.max_history_images)
        else:
            self._kinds.append("images")
            self.loose_images = True
            images = [(folder, [n for n in names if is_image(n)]) for folder, names in found.images]
            self._files = sum(len(names) for _, names in images)
            self._frames = (self.count, self._files)
            for folder, names in images:
                for name in names:
                    path = os.path.join(folder, name)
                    yield Sample((norm_path(path),), path)

    def sample_set(self, samples: list[Sample] | None = None) -> SampleSet:
        """What the stream read (`samples`: those it gave, when they were kept), as far as it has been read."""
        reader, source = self.reader, self.source
        episodes, sample_files = source == "episodes", source not in ("episodes", "images")
        return SampleSet(
            [] if samples is None else samples,
            reader.malformed,
            reader.missing,
            self.found.unlisted,
            source,
            self._files,
            self.max_history_images if episodes else None,
            len(self.found.episodes) if sample_files else 0,
            self.named_files if sample_files else None,
            self.count if samples is None else None,
        )


def find_samples(
    data_root: str,
    max_history_images: int = DEFAULT_MAX_HISTORY,
    data_path: str | None = None,
    files: Sequence[str] | None = None,
    keep_records: bool = False,
    allowed: AllowedRoots | None = None,
    max_sample_bytes: int = MAX_SAMPLE_BYTES,
    table: FrameTable | None = None,
) -> SampleSet:
    """Every sample under `data_root` (see the module docstring); `files` names sample files instead.

    `files` are relative to `data_root` unless absolute. Unreadable or ill-typed samples and
    missing images are `problems`, and the rest are still read; a sample with a missing frame is
    left out whole. `keep_records` keeps each sample's JSON object (the training dataset needs
    its text; a bulk job only needs the frames). `allowed`: the service's allowed roots, which the
    walk does not leave and every sample file must lie inside when opened; a FIFO or other
    non-regular sample file is a problem at once, never waited on. Sample files are read one
    sample at a time, each at most `max_sample_bytes`; folders the walk cannot list are problems.
    `table`: the plan's frame table (`service.frametable`), so a frame found here is not stat-ed again.
    """
    stream = SampleStream(
        data_root, max_history_images, data_path, files, keep_records, allowed, max_sample_bytes, table
    )
    return stream.sample_set(list(stream))
