"""Recording a running job's results as they land, on a thread of its own."""

from __future__ import annotations

import threading
from collections.abc import Callable


class Recorder:
    """A thread calling `record(True)` (which blocks a while for results and returns how many units it took)
    until `finish`'s count is in: the runner blocks in `Engine.submit` while the bulk backlog is full, and the
    job's counts must move meanwhile."""

    def __init__(self, record: Callable[[bool], int], done: Callable[[], None] = lambda: None) -> None:
        """`done`: called on the thread as it ends (it releases what the thread held, e.g. a connection)."""
        self._record = record
        self._done = done
        self._expected: int | None = None
        self._recorded = 0
        self._stopped = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def start(self, name: str) -> None:
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        try:  # record() waits at most a second for a result, so the flags are seen
            while not self._stopped.is_set() and (self._expected is None or self._recorded < self._expected):
                self._recorded += self._record(True)
        except BaseException as exc:  # raised again on the runner's thread
            self._error = exc
        finally:
            self._done()

    def finish(self, submitted: int) -> None:
        """Wait until the results of all `submitted` units are recorded; raise what recording raised."""
        assert self._thread is not None, "start() first"
        self._expected = submitted
        self._thread.join()
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        """Stop recording (after `finish`, or when submitting failed) and wait for the thread."""
        self._stopped.set()
        if self._thread is not None:
            self._thread.join()
