"""Figures the engine keeps about itself: a sliding window of events, a per-interval history, memory."""

from __future__ import annotations

import os
from collections import deque

STATS_WINDOW_S = 30.0
HISTORY_INTERVAL_S = 5.0
HISTORY_INTERVALS = 120  # ten minutes of 5 s intervals: the status page's throughput chart


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


class History:
    """Amounts per fixed interval (a ring of the last `intervals`), e.g. entries computed every 5 s.

    Not thread-safe: its owner locks.
    """

    def __init__(self, interval_s: float = HISTORY_INTERVAL_S, intervals: int = HISTORY_INTERVALS) -> None:
        self.interval_s = interval_s
        self.intervals = intervals
        self._counts: deque[list[float]] = deque(maxlen=intervals + 1)  # [interval index, amount]

    def add(self, now: float, amount: float) -> None:
        index = int(now // self.interval_s)
        if self._counts and self._counts[-1][0] == index:
            self._counts[-1][1] += amount
        else:
            self._counts.append([index, amount])

    def per_second(self, now: float) -> list[float]:
        """The last `intervals` complete intervals, oldest first: amount per second, 0 where nothing happened."""
        current = int(now // self.interval_s)
        amounts = {int(i): amount for i, amount in self._counts}
        return [round(amounts.get(i, 0.0) / self.interval_s, 3) for i in range(current - self.intervals, current)]


def process_rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # peak, where /proc is missing
