"""Request and response bodies of the HTTP API (pydantic lives here, at the edge, only)."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, Field, field_validator

from vggt_cache.service.jobs.view import JobState
from vggt_cache.service.samples import DEFAULT_MAX_HISTORY, check_history


class FeaturesRequest(BaseModel):
    """Images (each its own target) and/or clips (ordered frames; the spec's attention mode decides the targets)."""

    images: list[str] = Field(default_factory=list, description="absolute image paths")
    clips: list[list[str]] = Field(default_factory=list, description="ordered frames, target last")
    skip_existing: bool = Field(True, description="serve valid sibling files instead of recomputing")
    wait: bool = Field(True, description="false: queue at bulk priority and return 202 (prefetch)")


PATH_MAX = 4096  # Linux's: no longer path can be opened, so none is stored with a job


def _path_length(path: str) -> str:
    # Checked in Python, not as pydantic's max_length: that one refuses the lone surrogates of non-UTF-8 names.
    if len(path) > PATH_MAX:
        raise ValueError(f"a path of {len(path)} characters; the limit is {PATH_MAX}")
    return path


Path = Annotated[str, AfterValidator(_path_length)]


class PrecomputeRequest(BaseModel):
    data_root: Path
    skip_existing: bool = True
    verify: bool = False
    data_path: Path | None = Field(None, description="folder the samples' image paths are relative to")
    max_history_images: int = Field(
        DEFAULT_MAX_HISTORY, description="history frames per sample of an episode folder (step_<n>_<action>)"
    )
    dry_run: bool = Field(False, description="plan only: samples, entries valid / to compute, bytes, free space")
    force: bool = Field(False, description="start even if the new entries would not fit on the file system")
    data_files: list[Path] | None = Field(
        None, description="sample files to read (relative to data_root), instead of every one found"
    )
    overwrite: bool = Field(False, description="replace valid entries computed with another clip (else kept)")

    @field_validator("max_history_images")
    @classmethod
    def _history(cls, value: int) -> int:
        return check_history(value)  # the bound every entry point shares


class JobViewModel(BaseModel):
    """service.jobs.view.JobView at the HTTP edge."""

    job_id: str
    data_root: str
    state: JobState
    total: int
    computed: int
    skipped: int
    failed: int

    model_config = {"extra": "allow"}
