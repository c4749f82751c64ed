"""Figures the engine keeps about itself: a sliding window of events, and the process's memory."""

from __future__ import annotations

import os
from collections import deque

STATS_WINDOW_S = 30.0


class Window:
    """Intervals (start, end, amount) of the last `STATS_WINDOW_S` seconds: busy time, frames computed."""

    def __init__(self) -> None:
        self._events: deque[tuple[float, float, float]] = deque()  # (start, end, amount)

    def add(self, start: float, end: float, amount: float) -> None:
        self._events.append((start, end, amount))
        while self._events and self._events[0][1] < end - STATS_WINDOW_S:
            self._events.popleft()

    def total(self, since: float) -> float:
        return sum(amount for _, end, amount in self._events if end >= since)

    def overlap(self, since: float) -> float:
        return sum(end - max(start, since) for start, end, _ in self._events if end > since)


def process_rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # peak, where /proc is missing
