"""Admission, priorities, lanes and dynamic batching: the decode queue and the groups ready for a device.

Both are served on-demand first, under one lock. Admission decides in that lock too: an
on-demand submission over its limit and a non-blocking bulk submission into a full backlog
are refused whole (`QueueFull`), so no check-then-submit race lets a queue grow past its bound.

A flight may carry a lane (a device's index): its device takes it, so the clips of one stretch
of episodes meet the patch cache that holds their frames. A device whose lane has nothing
left, decoding or decoded, takes any lane's work rather than wait. Jobs without a lane
(on-demand requests, frame mode) go to whichever device is free.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

from vggt_cache.service.engine.work import Flight, Priority, QueueFull

GroupKey = tuple[tuple[int, ...], "int | None"]  # ([S, 3, H, W] of a flight's images, its lane)


@dataclass(eq=False)
class Group:
    """Decoded flights of one priority and lane that can share a forward: same [S, 3, H, W]."""

    flights: deque[Flight] = field(default_factory=deque)
    frames: int = 0

    @property
    def oldest(self) -> float:
        return self.flights[0].ready_at


class Scheduler:
    """The decode queue and the ready groups, both served on-demand first, under one lock.

    Bulk admission is bounded: `admit` blocks while `bulk_limit` frames of bulk
    work wait for a device (decoding or decoded), so a bulk backlog never sits
    in front of an on-demand request for more than about one batch.
    """

    def __init__(self, max_batch_frames: int, max_wait_s: float, bulk_limit: int, hint_limit: int = 0) -> None:
        self.max_batch_frames = max_batch_frames
        self.max_wait_s = max_wait_s
        self.bulk_limit = bulk_limit
        self.hint_limit = hint_limit  # room for prefetch hints above the job runners' backlog
        self._lock = threading.Lock()
        self._decode_cv = threading.Condition(self._lock)
        self._ready_cv = threading.Condition(self._lock)
        self._space_cv = threading.Condition(self._lock)
        self._decode: dict[Priority, deque[Flight]] = {p: deque() for p in Priority}
        self._ready: dict[Priority, dict[GroupKey, Group]] = {p: {} for p in Priority}
        self._waiting = {p: 0 for p in Priority}  # units not yet on a device
        self._waiting_frames = {p: 0 for p in Priority}
        self._decoding: Counter[tuple[Priority, int | None]] = Counter()  # queued for decode or being decoded
        self._in_lane: Counter[int | None] = Counter()  # flights of a lane not yet on a device
        self._idle_devices = 0  # devices blocked in next_batch, nothing due for them
        self._closed = False

    def admit(
        self, flights: Sequence[Flight], priority: Priority, block: bool = True, max_units: int | None = None
    ) -> list[Flight]:
        """Queue flights for decoding; returns those refused because the scheduler closed.

        Bulk work waits (`block`, a job runner) while `bulk_limit` frames of bulk work are
        waiting for a device. A non-blocking bulk submission (a prefetch hint) never waits:
        it is admitted whole while the bulk backlog stays within `bulk_limit + hint_limit`
        frames, else refused whole (`QueueFull`). `max_units` caps the units of `priority`
        waiting (on-demand requests): past it the submission is refused whole. An empty queue
        always admits, so a submission larger than a limit still gets through.
        """
        with self._lock:
            waiting, frames = self._waiting[priority], self._waiting_frames[priority]
            if max_units is not None and waiting and waiting + len(flights) > max_units:
                raise QueueFull(f"{priority.name.lower()} queue is full ({waiting} units waiting)")
            wait_for_room = priority is Priority.BULK and block
            if (
                priority is Priority.BULK
                and not block
                and frames
                and (frames + sum(j.n_frames for j in flights) > self.bulk_limit + self.hint_limit)
            ):
                raise QueueFull(f"bulk queue is full ({frames} frames waiting)")
            for i, flight in enumerate(flights):
                if wait_for_room:
                    while (
                        not self._closed
                        and self._waiting_frames[priority] > 0
                        and (self._waiting_frames[priority] + flight.n_frames > self.bulk_limit)
                    ):
                        self._space_cv.wait()
                if self._closed:
                    return list(flights[i:])
                self._decode[priority].append(flight)
                self._waiting[priority] += 1
                self._waiting_frames[priority] += flight.n_frames
                self._decoding[priority, flight.lane] += 1
                self._in_lane[flight.lane] += 1
                self._decode_cv.notify()
            return []

    def next_to_decode(self) -> Flight | None:
        """The oldest flight of the most urgent priority; None once closed."""
        with self._lock:
            while not self._closed:
                for p in Priority:
                    if self._decode[p]:
                        return self._decode[p].popleft()
                self._decode_cv.wait()
            return None

    def decoded(self, flight: Flight, runnable: bool) -> bool:
        """Hand a decoded flight to the devices (runnable) or retire it; True if handed on (False: not runnable,
        or the scheduler closed or the flight was withdrawn while it was decoded)."""
        with self._lock:
            p = flight.priority
            self._decoding[p, flight.lane] -= 1
            if runnable and not self._closed and not flight.withdrawn:
                assert flight.images is not None  # decoded: runnable
                flight.ready_at = time.monotonic()
                group = self._ready[p].setdefault((tuple(flight.images.shape), flight.lane), Group())
                group.flights.append(flight)
                group.frames += flight.n_frames
                self._ready_cv.notify_all()
                return True
            self._in_lane[flight.lane] -= 1
            self._retire(p, 1, flight.n_frames)
            # One flight fewer decoding can make a forming batch due.
            self._ready_cv.notify_all()
            return False

    def next_batch(self, lane: int | None = None) -> list[Flight] | None:
        """Block until a batch is due for the device of `lane`; None once closed.

        A group is due when it is full, when its oldest flight has waited
        `max_wait_s` for company, or when no flight of its priority and lane is
        still decoding (no company is coming). While on-demand work is forming a
        batch, bulk work waits too: starting a bulk batch would delay the
        on-demand one by a whole forward. The device takes groups without a lane
        and its own lane's; once its lane has nothing left, any lane's.
        """
        with self._lock:
            while not self._closed:
                timeout = None
                for p in Priority:
                    groups = {key: g for key, g in self._ready[p].items() if self._may_take(lane, key[1])}
                    if not groups:
                        continue
                    now = time.monotonic()
                    due = [
                        (key, g)
                        for key, g in groups.items()
                        if self._decoding[p, key[1]] == 0
                        or g.frames >= self.max_batch_frames
                        or now >= g.oldest + self.max_wait_s
                    ]
                    if due:
                        key, _ = min(due, key=lambda kg: kg[1].oldest)
                        return self._take(p, key)
                    timeout = min(g.oldest for g in groups.values()) + self.max_wait_s - now
                    break
                self._idle_devices += 1
                try:
                    self._ready_cv.wait(timeout)
                finally:
                    self._idle_devices -= 1
            return None

    def _may_take(self, lane: int | None, group_lane: int | None) -> bool:
        return group_lane is None or lane is None or group_lane == lane or self._in_lane[lane] == 0

    def _take(self, p: Priority, key: GroupKey) -> list[Flight]:
        group = self._ready[p][key]
        batch = [group.flights.popleft()]
        frames = batch[0].n_frames
        while group.flights and frames + group.flights[0].n_frames <= self.max_batch_frames:
            flight = group.flights.popleft()
            batch.append(flight)
            frames += flight.n_frames
        group.frames -= frames
        if not group.flights:
            del self._ready[p][key]
        self._in_lane[key[1]] -= len(batch)
        self._retire(p, len(batch), frames)
        # A lane just emptied lets its device take other lanes' work.
        self._ready_cv.notify_all()
        return batch

    def _retire(self, p: Priority, units: int, frames: int) -> None:
        self._waiting[p] -= units
        self._waiting_frames[p] -= frames
        self._space_cv.notify_all()

    def close(self) -> list[Flight]:
        """Refuse further work; returns every flight still queued (decode queue and ready groups)."""
        with self._lock:
            self._closed = True
            dropped = self._remove(lambda flight: True)
            for cv in (self._decode_cv, self._ready_cv, self._space_cv):
                cv.notify_all()
            return dropped

    def withdraw(self, futures: Collection[Future]) -> list[Flight]:
        """Take the queued flights of `futures` out (decode queue and ready groups); returns them.

        Jobs on a device are past recall and finish; one being decoded is not run if flagged `withdrawn`
        before its decode ends (see `decoded`).
        """
        with self._lock:
            taken = self._remove(lambda flight: flight.future in futures)
            if taken:
                self._ready_cv.notify_all()  # fewer flights decoding can make a forming batch due
            return taken

    def _remove(self, match: Callable[[Flight], bool]) -> list[Flight]:
        removed: list[Flight] = []
        for p in Priority:
            queued = self._decode[p]
            taken = [flight for flight in queued if match(flight)]
            if taken:
                self._decode[p] = deque(flight for flight in queued if not match(flight))
                for flight in taken:
                    self._decoding[p, flight.lane] -= 1
                removed += taken
            for key, group in list(self._ready[p].items()):
                taken = [flight for flight in group.flights if match(flight)]
                if not taken:
                    continue
                group.flights = deque(flight for flight in group.flights if not match(flight))
                group.frames -= sum(flight.n_frames for flight in taken)
                if not group.flights:
                    del self._ready[p][key]
                removed += taken
        for flight in removed:
            self._in_lane[flight.lane] -= 1
            self._retire(flight.priority, 1, flight.n_frames)
        return removed

    def counts(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {
                "queued": {p.name.lower(): self._waiting[p] for p in Priority},
                "decoding": {
                    p.name.lower(): sum(n for (q, _), n in self._decoding.items() if q is p) for p in Priority
                },
            }

    def idle_devices(self) -> int:
        """Devices waiting in `next_batch` with nothing due for them."""
        with self._lock:
            return self._idle_devices

    def waiting(self, p: Priority) -> int:
        with self._lock:
            return self._waiting[p]
