"""What is decided before the app sees a request, as plain ASGI middleware: Host, framing, the token, the body.

In this order, each before any byte of the body is read: a Host that names neither this machine
nor an allowed name is a 421 (a page of another origin rebound to our address by DNS sends its
own name); a request with both Content-Length
and Transfer-Encoding is a 400 (RFC 9112 section 6.3: its framing is ambiguous); without the
service's token, a 401 (FastAPI would read and parse the body before a route's dependency
runs); a POST, PUT or PATCH without a JSON content type, a 415 (a cross-origin page can send
text/plain or form bodies without asking first, never JSON); a declared length over the limit, a
413. Then the body is read here, counting the bytes actually received: over the limit, a 413;
not received whole within `timeout_s` (stalled, or dripped a byte at a time), a 408; more than
`buffer_bytes` held by all requests together, a 503. Every refusal closes the connection,
since the rest of its body is never read. The app gets the body whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
from collections.abc import Iterator

from starlette.types import ASGIApp, Message, Receive, Scope, Send

PUBLIC_PATHS = frozenset({"/", "/healthz", "/readyz"})  # the probes and the (data-free) status page shell
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class Busy(RuntimeError):
    """More expensive requests at once than admitted: a 429 with Retry-After."""


class Admission:
    """At most `limit` expensive requests at once (the event loop's own count: no lock); the next is Busy."""

    def __init__(self, limit: int, what: str) -> None:
        self.limit = limit
        self.what = what
        self.active = 0

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        if self.active >= self.limit:
            raise Busy(f"{self.active} {self.what} in progress, the most admitted at once; retry shortly")
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1


class RequestGuard:
    def __init__(
        self,
        app: ASGIApp,
        token: str | None,
        max_bytes: int,
        timeout_s: float,
        buffer_bytes: int,
        hosts: frozenset[str] | None = None,
    ) -> None:
        self.app = app
        self.hosts = hosts  # None: any Host
        self.token = token
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.buffer_bytes = buffer_bytes
        self.buffered = 0  # body bytes held by requests in progress (one event loop: no lock)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        host = headers.get(b"host")
        if self.hosts is not None and host is not None and not host_allowed(host, self.hosts):
            await _refuse(
                send,
                421,
                "this service does not answer to the host name in the request's Host header "
                "(the operator may allow it with --allowed-host)",
            )
            return
        if b"content-length" in headers and b"transfer-encoding" in headers:
            await _refuse(
                send,
                400,
                "both Content-Length and Transfer-Encoding given: the body's framing is "
                "ambiguous (RFC 9112 section 6.3)",
            )
            return
        if self.token is not None and scope["path"] not in PUBLIC_PATHS and not self._authorised(headers):
            await _refuse(
                send,
                401,
                "missing or wrong bearer token (Authorization: Bearer <token>)",
                {"WWW-Authenticate": "Bearer"},
            )
            return
        if scope["method"] in BODY_METHODS and not _is_json(headers.get(b"content-type", b"")):
            await _refuse(send, 415, "send the body as JSON, with Content-Type: application/json")
            return
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await _refuse(send, 413, f"request body is larger than {self.max_bytes} bytes")
            return
        held = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        try:
            chunks = []
            while True:
                try:
                    message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
                except asyncio.TimeoutError:  # TimeoutError itself only from Python 3.11
                    await _refuse(send, 408, f"request body not received whole within {self.timeout_s:g} s")
                    return
                if message["type"] != "http.request":
                    return  # the client went away
                chunk = message.get("body", b"")
                held += len(chunk)
                self.buffered += len(chunk)
                if held > self.max_bytes:
                    await _refuse(send, 413, f"request body is larger than {self.max_bytes} bytes")
                    return
                if self.buffered > self.buffer_bytes:
                    await _refuse(send, 503, "too many request bodies in flight; retry shortly", {"Retry-After": "1"})
                    return
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
            await self.app(scope, _replay(b"".join(chunks), receive), send)
        finally:
            self.buffered -= held

    def _authorised(self, headers: dict[bytes, bytes]) -> bool:
        assert self.token is not None  # asked only when a token is set
        scheme, _, given = headers.get(b"authorization", b"").partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(given, self.token.encode())


def host_allowed(host: bytes, names: frozenset[str]) -> bool:
    """Whether a Host header (name or address, with or without a port) is one this service answers to.

    Any IP address is accepted: a browser sends an address only when it connected to that address itself.
    """
    text = host.decode("latin-1").strip().lower()
    if text.startswith("["):  # [v6] or [v6]:port
        return _is_address(text[1:].partition("]")[0])
    name = text.rpartition(":")[0] if ":" in text else text
    return _is_address(name) or name.rstrip(".") in names


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _is_json(content_type: bytes) -> bool:
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or (media.startswith(b"application/") and media.endswith(b"+json"))


def _replay(body: bytes, receive: Receive) -> Receive:
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if replayed:
            return await receive()  # after the body: wait for the disconnect, as the server would
        replayed = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


async def _refuse(send: Send, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    extra = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
                *extra,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
