"""Following a job: a bar on a terminal with log lines above it, plain `[INFO]` lines elsewhere."""

from __future__ import annotations

import io
import logging
import sys
from collections.abc import Iterator

import pytest

from vggt_cache.client.logs import setup_logging
from vggt_cache.service.jobs.view import JobState, JobView
from vggt_cache.service.progress import follow_job


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def view(computed: int, skipped: int, state: JobState = JobState.RUNNING, read: float | None = None) -> JobView:
    """A job of 10 entries; `read`: still planning, that share of its root read (`total` is what is planned)."""
    total = 10 if read is None else round(10 * read)
    return JobView(
        "j1",
        "/data",
        state,
        total,
        computed,
        skipped,
        0,
        (computed + skipped) / 10,
        1.5,
        4.0,
        "d",
        {},
        read is None,
        False,
        0.0,
        0.0,
        None,
        None,
        None if read is None else {"read_fraction": read},
    )


def views() -> Iterator[JobView]:
    yield view(0, 0, read=0.2)
    yield view(2, 1, read=0.5)
    yield view(8, 2, JobState.FINISHED)


def stderr(monkeypatch: pytest.MonkeyPatch, out: io.StringIO) -> io.StringIO:
    """`out` as stderr, our logger writing to it (in the test itself: pytest sets stderr anew for the call)."""
    logger = logging.getLogger("vggt_cache")
    for name in ("handlers", "propagate", "level"):  # put back as they were after the test
        monkeypatch.setattr(logger, name, list(logger.handlers) if name == "handlers" else getattr(logger, name))
    monkeypatch.setattr(sys, "stderr", out)
    setup_logging()
    return out


def test_on_a_terminal_a_bar_with_the_jobs_counts_and_log_lines_above_it(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = stderr(monkeypatch, Terminal())
    seen = views()
    last = follow_job(
        lambda: next(seen),
        lambda v: not v.state.active,
        lambda: logging.getLogger("vggt_cache").info("a line while the bar is drawn"),
        "precompute",
    )
    text = stream.getvalue()
    assert last.computed == 8
    assert "computed 2, skipped 1, failed 0, 1.5 img/s computed, eta 4s" in text
    assert "\r" in text  # a bar, redrawn
    lines = [segment for segment in text.split("\n") if "[INFO]" in segment]
    assert len(lines) == 2
    assert all(segment.split("\r")[-1] == "[INFO] a line while the bar is drawn" for segment in lines), text


def test_elsewhere_plain_progress_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = stderr(monkeypatch, io.StringIO())
    seen = views()
    follow_job(lambda: next(seen), lambda v: not v.state.active, lambda: None, "precompute", log_every_s=0)
    assert stream.getvalue().splitlines() == [
        "[INFO] precompute: 3/~10 (30.0%): computed 2, skipped 1, failed 0, 1.5 img/s computed, eta 4s",
        "[INFO] precompute: 10/10 (100.0%): computed 8, skipped 2, failed 0, 1.5 img/s computed, eta 4s",
    ]
