"""A headless Chromium driven over its DevTools pipe: open a page, run JavaScript in it (no extra packages).

`--remote-debugging-pipe` makes Chromium read DevTools commands from fd 3 and write answers to fd 4,
each a JSON message ended by a NUL byte.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import subprocess
import time
from typing import Any

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_S = 30.0


def render(url: str, profile: str) -> str:
    """The DOM after the page's scripts ran (virtual time lets its fetch and timers complete)."""
    assert CHROMIUM is not None, "no chromium on this machine"
    cmd = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=5000", "--dump-dom", url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout


def _high(fd: int) -> int:
    """`fd` moved to 10 or above, clear of the 3 and 4 the child needs (and inheritable)."""
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    os.set_inheritable(moved, True)
    return moved


class Browser:
    """One headless Chromium; `page(url)` opens a tab, `evaluate` runs JavaScript in it."""

    def __init__(self, profile: str, width: int = 1280, height: int = 900) -> None:
        to_chromium, self._send_fd = os.pipe()
        self._recv_fd, from_chromium = os.pipe()
        to_chromium, from_chromium = _high(to_chromium), _high(from_chromium)
        self.proc = subprocess.Popen(
            [
                "bash",
                "-c",
                f'exec "$0" "$@" 3<&{to_chromium} 4>&{from_chromium}',
                CHROMIUM,
                *FLAGS,
                "--remote-debugging-pipe",
                f"--user-data-dir={profile}",
                f"--window-size={width},{height}",
                "about:blank",
            ],
            pass_fds=(to_chromium, from_chromium),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_chromium)
        os.close(from_chromium)
        self._buffer = b""
        self._id = 0
        self._session: str | None = None

    def send(self, method: str, **params: Any) -> dict:
        """One DevTools command (in the open page's session once there is one); its result."""
        self._id += 1
        message: dict[str, Any] = {"id": self._id, "method": method, "params": params}
        if self._session and not method.startswith("Target."):
            message["sessionId"] = self._session
        os.write(self._send_fd, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            reply = self._next(deadline)
            if reply.get("id") == self._id:  # anything else is an event: not needed here
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def _next(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._recv_fd], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer")
            chunk = os.read(self._recv_fd, 1 << 16)
            if not chunk:
                raise RuntimeError("Chromium closed its DevTools pipe")
            self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        return json.loads(message)

    def page(self, url: str) -> None:
        target = self.send("Target.createTarget", url=url)["targetId"]
        self._session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = self.send("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = TIMEOUT_S) -> Any:
        """Evaluate until the value is truthy (the page loads, then polls its service); fail after `timeout`.

        An exception (the page not loaded yet: no such element) counts as not yet.
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                value, error = self.evaluate(expression), None
            except RuntimeError as exc:
                value, error = None, exc
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {expression} ({error})")
            time.sleep(0.05)  # polling a page that refreshes itself, with a deadline

    def close(self) -> None:
        os.close(self._send_fd)
        os.close(self._recv_fd)
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
