"""Request and response bodies of the HTTP API (pydantic lives here, at the edge, only)."""

from __future__ import annotations

from pydantic import BaseModel, Field, field_validator

from service.jobview import JobState
from service.samples import DEFAULT_MAX_HISTORY, check_history


class FeaturesRequest(BaseModel):
    """Images (each its own target) and/or clips (ordered frames; the spec's attention mode decides the targets)."""

    images: list[str] = Field(default_factory=list, description="absolute image paths")
    clips: list[list[str]] = Field(default_factory=list, description="ordered frames, target last")
    skip_existing: bool = Field(True, description="serve valid sibling files instead of recomputing")
    wait: bool = Field(True, description="false: queue at bulk priority and return 202 (prefetch)")


class PrecomputeRequest(BaseModel):
    data_root: str
    skip_existing: bool = True
    verify: bool = False
    data_path: str | None = Field(None, description="folder the samples' image paths are relative to")
    max_history_images: int = Field(DEFAULT_MAX_HISTORY,
                                    description="history frames per sample of an episode folder (step_<n>_<action>)")
    dry_run: bool = Field(False, description="plan only: samples, entries valid / to compute, bytes, free space")
    force: bool = Field(False, description="start even if the new entries would not fit on the file system")
    data_files: list[str] | None = Field(None, description="sample files to read (relative to data_root), "
                                                           "instead of every one found")

    @field_validator("max_history_images")
    @classmethod
    def _history(cls, value: int) -> int:
        return check_history(value)  # the bound every entry point shares


class JobViewModel(BaseModel):
    """service.jobview.JobView at the HTTP edge."""

    job_id: str
    data_root: str
    state: JobState
    total: int
    computed: int
    skipped: int
    failed: int

    model_config = {"extra": "allow"}
