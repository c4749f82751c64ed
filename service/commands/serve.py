"""`vggt-cache serve`: the port bound before the model loads, uvicorn with our connection guard, a graceful stop."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import logging
import os
import signal
import socket
from types import FrameType

from vggt_cache.service.collector import settle_start_up
from vggt_cache.service.commands.common import api_token, check_device, settings_of
from vggt_cache.service.errors import CommandError

log = logging.getLogger("vggt_cache")


def listen(host: str, port: int) -> socket.socket:
    """A socket listening on host:port (port 0: a free one); a port in use or a bad host is a CommandError."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise CommandError(
            f"--host {host}: {exc.strerror}; give an address of this machine "
            "(127.0.0.1, or 0.0.0.0 for every interface)"
        ) from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a restart reuses the port at once
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise CommandError(
                f"port {port} on {host} is already in use (another vggt-cache serve?): stop that "
                "process, or pass --port N"
            ) from None
        raise CommandError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


def serve(args: argparse.Namespace) -> int:
    import uvicorn
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    from vggt_cache.service.api import create_app
    from vggt_cache.service.api.connections import (
        ACCEPT_BACKLOG,
        connection_cap,
        guarded_protocol,
        raise_descriptor_limit,
    )
    from vggt_cache.service.runtime import ServiceRuntime

    settings = settings_of(args, api_token=api_token(args))
    check_device(settings.device)
    # Idle connections must not take the descriptors the engine needs for images and entries.
    protocol = guarded_protocol(
        AutoHTTPProtocol, settings.header_timeout_s, connection_cap(settings.max_connections, raise_descriptor_limit())
    )
    sock = listen(settings.host, settings.port)  # before the model loads: a port in use is said at once
    settings = dataclasses.replace(settings, port=sock.getsockname()[1])  # --port 0: the one given
    runtime = ServiceRuntime(settings, on_loaded=settle_start_up)  # settings_of has checked them
    app = create_app(runtime)  # its lifespan starts the runtime and, when uvicorn shuts down, stops it
    log.info(
        "Serving on http://%s:%d (allowed roots: %s; auth: %s)",
        settings.host,
        settings.port,
        ", ".join(runtime.allowed.given),
        "bearer token" if settings.api_token else "off",
    )
    # uvicorn shuts down gracefully on SIGTERM or SIGINT, then raises the signal again for the handler
    # it found: take it quietly, so the process exits 0 after the lifespan has stopped jobs and engine.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: None)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            runtime.begin_shutdown()  # the grace counts from the signal: requests and work share it
            super().handle_exit(sig, frame)

    Server(
        uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            log_level="warning",
            access_log=False,
            lifespan="on",
            http=protocol,
            backlog=ACCEPT_BACKLOG,
            # uvicorn annotates an int, but it waits with asyncio.timeout, which takes a float.
            timeout_graceful_shutdown=settings.shutdown_grace_s,  # type: ignore[arg-type]
        )
    ).run(sockets=[sock])
    log.info("Stopped")
    if not runtime.stopped_cleanly:
        # A device thread is still inside its forward: leave without waiting for it (or for the interpreter's
        # exit handlers, which join worker threads).
        logging.shutdown()
        os._exit(0)
    return 0
