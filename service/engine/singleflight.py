"""Single-flight: a unit submitted while the same unit is in flight joins that flight.

Every submission gets a waiter future of its own. A waiter boards the open flight of its unit
when that flight serves it (see `Boarding.serves`), else a new flight; when the flight lands,
every waiter still aboard gets its outcome. A waiter cancelled by its caller (a client gone)
leaves; the flight itself is cancelled once no one waits for it, while still queued.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial

from vggt_cache.service.engine.work import (
    WITHDRAWN_MESSAGE,
    Flight,
    Priority,
    QueueFull,
    StartHook,
    Withdrawn,
    fail_future,
)
from vggt_cache.service.units import Unit


@dataclass(eq=False)
class Boarding:
    """A flight and the futures waiting for its result (each submission has its own)."""

    flight: Flight
    waiters: set[Future] = field(default_factory=set)
    open: bool = True  # new submissions may board; closed once landed or being withdrawn

    def serves(
        self, priority: Priority, skip_existing: bool, verify: bool, return_features: bool, overwrite: bool
    ) -> bool:
        """Whether this flight's result is what such a submission would get, at least as soon.

        An on-demand waiter does not board bulk work (it would wait behind the bulk backlog): it
        runs on its own, at its priority.
        """
        flight = self.flight
        return (
            self.open
            and flight.priority <= priority
            and flight.skip_existing == skip_existing
            and flight.verify >= verify
            and flight.return_features >= return_features
            and flight.overwrite == overwrite
        )


def _settle(waiter: Future, done: Future) -> None:
    """Give `waiter` the outcome of its flight's `done` future (unless its caller cancelled it)."""
    exc: BaseException | None = None if not done.cancelled() else Withdrawn("cancelled before it ran")
    exc = exc or done.exception()
    if exc is not None:
        fail_future(waiter, exc)
    elif waiter.set_running_or_notify_cancel():
        waiter.set_result(done.result())


@dataclass(frozen=True)
class Boarded:
    """What `SingleFlight.board` did with a submission."""

    waiters: list[Future]  # one per unit, in unit order
    new: list[Flight]  # the flights to admit
    joined: list[Future]  # the waiters that boarded earlier flights


class SingleFlight:
    """The open flight of each unit in the engine, and each waiter's flight until it is settled. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[Unit, Boarding] = {}
        self._boarding_of: dict[Future, Boarding] = {}
        self._joined = 0  # submissions that boarded a flight instead of running again

    @property
    def joined(self) -> int:
        with self._lock:
            return self._joined

    def board(
        self,
        units: list[Unit],
        priority: Priority,
        skip_existing: bool,
        verify: bool,
        return_features: bool,
        overwrite: bool,
        lanes: Sequence[int] | None,
        on_start: StartHook | None,
    ) -> Boarded:
        """A waiter per unit, each boarding the unit's flight if one serves it, else a new flight."""
        boarded = Boarded([], [], [])
        new: set[Future] = set()
        with self._lock:
            for i, unit in enumerate(units):
                waiter: Future = Future()
                boarding = self._open.get(unit)
                if boarding is not None and boarding.serves(
                    priority, skip_existing, verify, return_features, overwrite
                ):
                    if boarding.flight.future not in new:
                        boarded.joined.append(waiter)
                    self._joined += 1
                else:
                    flight = Flight(
                        unit,
                        priority,
                        Future(),
                        skip_existing,
                        verify,
                        return_features,
                        None if lanes is None else lanes[i],
                        overwrite,
                    )
                    boarding = self._open[unit] = Boarding(flight)
                    flight.future.add_done_callback(partial(self._land, boarding))
                    boarded.new.append(flight)
                    new.add(flight.future)
                if on_start is not None and on_start not in boarding.flight.on_start:
                    boarding.flight.on_start.append(on_start)
                boarding.waiters.add(waiter)
                self._boarding_of[waiter] = boarding
                waiter.add_done_callback(self._left)
                boarded.waiters.append(waiter)
        return boarded

    def unboard(self, boarded: Boarded) -> None:
        """Undo a refused submission: its new flights fail (with whoever boarded them meanwhile), its joins leave."""
        for waiter in boarded.joined:
            waiter.cancel()  # never running: `_left` takes it off its flight
        for flight in boarded.new:
            fail_future(flight.future, QueueFull("refused with the submission it belonged to"))

    def withdraw(self, futures: Iterable[Future], take_back: Callable[[set[Future]], list[Flight]]) -> int:
        """Take `futures` back: one whose flight others also wait for leaves it at once; a flight that only
        withdrawn futures wait for is closed and handed to `take_back` (which returns those it took out of
        the queue). Returns how many futures were taken back."""
        left: list[Future] = []
        alone: set[Future] = set()  # flights that only the withdrawn futures wait for
        with self._lock:
            for waiter in set(futures):
                boarding = self._boarding_of.get(waiter)
                if boarding is None:
                    continue
                if boarding.waiters - {waiter}:
                    boarding.waiters.discard(waiter)
                    del self._boarding_of[waiter]
                    left.append(waiter)
                else:
                    self._close(boarding)
                    boarding.flight.withdrawn = True  # one being decoded now is not run (see Scheduler.decoded)
                    alone.add(boarding.flight.future)
        for waiter in left:
            fail_future(waiter, Withdrawn(WITHDRAWN_MESSAGE))
        taken = take_back(alone)
        for flight in taken:
            fail_future(flight.future, Withdrawn(WITHDRAWN_MESSAGE))  # its waiter gets it through `_land`
        return len(left) + len(taken)

    def _land(self, boarding: Boarding, _done: Future) -> None:
        """The flight ended (`_done`, its future): every waiter still aboard gets its outcome."""
        with self._lock:
            self._close(boarding)
            waiters = list(boarding.waiters)
            boarding.waiters.clear()
            for waiter in waiters:
                self._boarding_of.pop(waiter, None)
        for waiter in waiters:
            _settle(waiter, boarding.flight.future)

    def _left(self, waiter: Future) -> None:
        """A waiter's caller cancelled it (a client gone): the flight is cancelled too once no one waits for it."""
        if not waiter.cancelled():
            return
        with self._lock:
            boarding = self._boarding_of.pop(waiter, None)
            if boarding is None:
                return
            boarding.waiters.discard(waiter)
            if boarding.waiters:
                return
            self._close(boarding)
        boarding.flight.future.cancel()  # only while queued: a flight being decoded or run finishes

    def _close(self, boarding: Boarding) -> None:
        """No one may board any more (under the lock)."""
        boarding.open = False
        if self._open.get(boarding.flight.unit) is boarding:
            del self._open[boarding.flight.unit]
