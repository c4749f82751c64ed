"""Following a job to its end: a progress bar on a terminal, the job's computed/skipped/failed counts."""

from __future__ import annotations

from collections.abc import Callable

from service.jobview import JobView


def follow_job(poll: Callable[[], JobView | None], done: Callable[[JobView | None], bool],
                pause: Callable[[], object], desc: str) -> JobView | None:
    """Show a job's progress until `done(view)`: a bar on a terminal, and its computed/skipped/failed counts.

    `poll` gives the job's view now (None while it cannot be had); `pause` waits before the next poll.
    """
    from tqdm import tqdm

    view = poll()
    with tqdm(total=None, unit="img", desc=desc, disable=None) as bar:
        while not done(view):
            pause()
            view = poll() or view
            if view is not None:
                bar.total = view.total or None
                bar.n = view.done
                bar.set_postfix(computed=view.computed, skipped=view.skipped, failed=view.failed, refresh=False)
                bar.refresh()
    return view
