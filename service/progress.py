"""Following a job to its end: a bar on a terminal, plain `[INFO]` lines elsewhere, the same counts in both.

Rate and ETA are the job's own (`JobView.rate_per_s`, `eta_s`): entries computed, not skipped.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import TextIO

from vggt_cache.client.logs import LOGGER
from vggt_cache.service.jobs.view import JobView

log = logging.getLogger(LOGGER)
LOG_EVERY_S = 10.0  # off a terminal: a progress line this often
# tqdm's own rate and ETA would count skipped entries too: the postfix gives the job's.
BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"


def duration(seconds: float | None) -> str:
    """`1h 2m`, `3m 4s` or `5s`; `-` when unknown."""
    if seconds is None:
        return "-"
    s = round(seconds)
    h, m, sec = s // 3600, (s % 3600) // 60, s % 60
    return f"{h}h {m}m" if h else f"{m}m {sec}s" if m else f"{sec}s"


def counts_text(view: JobView) -> str:
    """`computed 5, skipped 2, failed 0, 3.1 img/s computed, eta 12s`: a bar's postfix and a line's tail."""
    text = f"computed {view.computed}, skipped {view.skipped}, failed {view.failed}"
    if view.rate_per_s is not None:
        text += f", {view.rate_per_s:g} img/s computed"
    if view.eta_s is not None:
        text += f", eta {duration(view.eta_s)}"
    return text


def progress_line(view: JobView) -> str:
    expected = view.expected_total  # while the job plans, about what the whole root holds (`~`)
    pct = f" ({100 * view.done / expected:.1f}%)" if expected else ""
    return f"{view.done}/{'~' if expected != view.total else ''}{expected or '?'}{pct}: {counts_text(view)}"


def follow_job(
    poll: Callable[[], JobView | None],
    done: Callable[[JobView | None], bool],
    pause: Callable[[], object],
    desc: str,
    stream: TextIO | None = None,
    log_every_s: float = LOG_EVERY_S,
) -> JobView | None:
    """Show a job's progress on `stream` (stderr) until `done(view)`; returns the last view.

    `poll` gives the job's view now (None while it cannot be had); `pause` waits before the next poll.
    On a terminal a bar (log lines printed above it, never inside); elsewhere (a file, `docker logs`)
    an `[INFO]` line every `log_every_s`.
    """
    stream = stream or sys.stderr
    follow = _follow_with_bar if stream.isatty() else _follow_with_lines
    return follow(poll, done, pause, desc, stream, log_every_s)


def _follow_with_bar(
    poll: Callable[[], JobView | None],
    done: Callable[[JobView | None], bool],
    pause: Callable[[], object],
    desc: str,
    stream: TextIO,
    log_every_s: float,
) -> JobView | None:
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    view = poll()
    with (
        logging_redirect_tqdm(loggers=[log]),
        tqdm(total=None, unit="img", desc=desc, file=stream, bar_format=BAR_FORMAT) as bar,
    ):
        while not done(view):
            pause()
            view = poll() or view
            if view is not None:
                bar.total = view.expected_total or None
                bar.n = view.done
                bar.set_postfix_str(counts_text(view), refresh=False)
                bar.refresh()
    return view


def _follow_with_lines(
    poll: Callable[[], JobView | None],
    done: Callable[[JobView | None], bool],
    pause: Callable[[], object],
    desc: str,
    stream: TextIO,
    log_every_s: float,
) -> JobView | None:
    view, last = poll(), time.monotonic()
    while not done(view):
        pause()
        view = poll() or view
        if view is not None and time.monotonic() - last >= log_every_s:
            log.info("%s: %s", desc, progress_line(view))
            last = time.monotonic()
    return view
