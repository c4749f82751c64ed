"""What a job is asked to do (`JobOptions`, stored with it) and the service's bounds on every job (`JobLimits`)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

from vggt_cache.service.paths import AllowedRoots
from vggt_cache.service.samples import DEFAULT_MAX_HISTORY, check_history
from vggt_cache.service.settings import ServiceSettings

_DEFAULTS = ServiceSettings()  # the one place job settings have their defaults


@dataclass(frozen=True)
class JobOptions:
    """One job's options, as `POST /precompute` and `vggt-cache precompute` take them.

    `force`: start even when the plan says the new entries will not fit on the file system.
    `overwrite`: replace valid entries computed with another clip (else kept, and counted `kept`).
    `data_files`: the sample files to read (relative to the data root unless absolute), not every one.
    """

    skip_existing: bool = True
    verify: bool = False
    data_path: str | None = None
    max_history_images: int = DEFAULT_MAX_HISTORY
    force: bool = False
    data_files: tuple[str, ...] | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        check_history(self.max_history_images)
        if self.data_files is not None and not isinstance(self.data_files, tuple):
            object.__setattr__(self, "data_files", tuple(self.data_files))

    def to_dict(self) -> dict[str, Any]:
        """As stored with the job and shown in its view (`options`)."""
        d = dataclasses.asdict(self)
        d["data_files"] = None if self.data_files is None else list(self.data_files)
        return d

    @classmethod
    def of(cls, given: object) -> JobOptions:
        """The options named alike on `given`: a `POST /precompute` body, `vggt-cache precompute`'s flags."""
        return cls(**{f.name: getattr(given, f.name) for f in dataclasses.fields(cls)})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JobOptions:
        """Options as stored or shown; a key missing (a state dir of an older release) takes its default."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def contain(self, data_root: str, allowed: AllowedRoots) -> None:
        """The folders the options name (the sample files, `data_path`) are inside the roots (OutsideRoots):
        an absolute `data_path` must not take the samples' images out of them."""
        named = [*(self.data_files or ())]
        if self.data_path is not None:
            named.append(self.data_path)
        for name in named:
            allowed.contain(os.path.normpath(os.path.join(data_root, name)), writes_sibling=False)


@dataclass(frozen=True)
class Retention:
    """How many ended jobs (with their units and failures) the store keeps, and for how long."""

    keep: int = _DEFAULTS.job_retention
    days: float = _DEFAULTS.job_retention_days


@dataclass(frozen=True)
class JobLimits:
    """The service's bounds on every job: a unit of more than `max_frames_per_sample` frames is failed at
    planning; a sample of a sample file over `max_sample_bytes` is a problem of the plan; an image over
    `max_image_bytes` is counted unreadable; `retention`: ended jobs kept (pruned at start and after each job)."""

    max_frames_per_sample: int = _DEFAULTS.max_frames_per_sample
    max_sample_bytes: int = _DEFAULTS.max_sample_bytes
    max_image_bytes: int = _DEFAULTS.max_image_bytes
    retention: Retention = Retention()

    @classmethod
    def of(cls, settings: ServiceSettings) -> JobLimits:
        return cls(
            settings.max_frames_per_sample,
            settings.max_sample_bytes,
            settings.max_image_bytes,
            Retention(settings.job_retention, settings.job_retention_days),
        )
