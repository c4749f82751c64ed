"""The connections the event loop holds: a deadline for each request's headers, a cap, descriptors, accept errors.

uvicorn closes a kept-alive connection after `timeout_keep_alive`, but never one that has not sent a
byte, nor one that sends its headers slowly: enough of them take every file descriptor, and then
the engine cannot open an image or write an entry. So each connection must deliver a request's
headers within `header_timeout_s` of its opening or of its last response; past `max_connections`
a new connection closes the oldest idle one (or, none idle, is answered 503); the descriptor limit
is raised to the hard limit at start; and asyncio's traceback per failed accept becomes a line a minute.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import resource
import time
from typing import Any, cast

log = logging.getLogger("vggt_cache")
# Descriptors kept for the engine (images, entries, SQLite, libraries) when the cap must fit the limit.
DESCRIPTOR_RESERVE = 128
# The listen backlog, which asyncio also takes as the number of connections accepted in one go, before
# any of them is seen by `connection_made` (and so by the cap): the cap leaves room for one such burst.
ACCEPT_BACKLOG = 64
ACCEPT_REPORT_S = 60.0
_BUSY_BODY = b'{"detail": "too many connections in progress; retry shortly"}'
BUSY_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
    b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY)
)


def guarded_protocol(
    base: type[asyncio.Protocol], header_timeout_s: float, max_connections: int
) -> type[asyncio.Protocol]:
    """`base` (uvicorn's h11 or httptools protocol) with a header deadline and a cap on open connections.

    Relies on what both of uvicorn's HTTP/1.1 protocols have: `loop`, `transport`, `cycle` (the
    request in progress once its headers are parsed, `response_complete` once answered) and
    `on_response_complete`.
    """
    held: dict[Any, None] = {}  # open connections of this server, oldest first

    class Guarded(base):  # type: ignore[valid-type, misc]
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            held[self] = None
            if len(held) > max_connections and not _close_oldest_idle(held, self):
                del held[self]
                cast(asyncio.Transport, transport).write(BUSY_RESPONSE)  # a stream's transport
                transport.close()
                return
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            held.pop(self, None)
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.in_request():
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.in_request():  # a pipelined request may have started in there
                self._arm()

        def in_request(self) -> bool:
            return self.cycle is not None and not self.cycle.response_complete

        def close_idle(self) -> None:
            self._disarm()
            self.transport.close()

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(header_timeout_s, self._expire)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expire(self) -> None:
            self._deadline = None
            if not self.in_request():  # no request's headers within the deadline: nothing to answer
                held.pop(self, None)
                self.transport.close()

    Guarded.__name__ = Guarded.__qualname__ = f"Guarded{base.__name__}"
    return Guarded


def _close_oldest_idle(held: dict[Any, None], newcomer: Any) -> bool:
    for connection in held:
        if connection is not newcomer and not connection.in_request():
            del held[connection]  # before its connection_lost: the next newcomer must not count it
            connection.close_idle()
            return True
    return False


def raise_descriptor_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit (logged); returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard <= soft:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:
        log.warning("Cannot raise the file descriptor limit from %d to %d: %s", soft, hard, exc)
        return soft
    log.info("File descriptor limit raised from %d to %d (the hard limit)", soft, hard)
    return hard


def connection_cap(max_connections: int, descriptors: int) -> int:
    """`max_connections`, lowered to leave the engine its descriptors (logged when lowered)."""
    room = max(1, descriptors - max(DESCRIPTOR_RESERVE, descriptors // 4) - ACCEPT_BACKLOG)
    if room < max_connections:
        log.warning(
            "At most %d open connections (--max-connections %d does not fit a descriptor limit of %d)",
            room,
            max_connections,
            descriptors,
        )
        return room
    return max_connections


class AcceptErrors:
    """A loop exception handler: asyncio reports each accept that failed for want of descriptors or memory
    (with a traceback, every retry); this says it once a minute with the count. Anything else goes on."""

    ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

    def __init__(self, interval_s: float = ACCEPT_REPORT_S) -> None:
        self.interval_s = interval_s
        self.count = 0
        self._last = -float("inf")

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if not (isinstance(exc, OSError) and exc.errno in self.ERRNOS):
            loop.default_exception_handler(context)
            return
        self.count += 1
        now = time.monotonic()
        if now - self._last >= self.interval_s:
            log.error(
                "Cannot accept connections: %s (%d times since the last report; said at most once every %g s)",
                exc.strerror,
                self.count,
                self.interval_s,
            )
            self.count = 0
            self._last = now
