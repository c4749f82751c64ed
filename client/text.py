"""Text from file names and requests, made safe to store, serve, log and print.

Names come from other people's files: of any length, with bytes that are not UTF-8, newlines
or terminal escape sequences. `printable` makes one storable as UTF-8, `shorten` bounds it,
`bounded` does both (what the store and the HTTP errors keep), and `displayable` makes it one
inert line for a log or a terminal. `error_text` is the one way an exception becomes text.
"""

from __future__ import annotations

import re

MAX_TEXT = 1024  # characters of a stored or served string (a reason, a path in a message)

# C0 and C1 controls, DEL, the Unicode line breaks and the bidirectional overrides (which reorder a line).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(text: str) -> str:
    """`text` with undecodable file-name bytes shown as `\\xNN`: safe to store as UTF-8 (SQLite, JSON).

    Linux file names are bytes; Python carries the non-UTF-8 ones as lone surrogates,
    which no UTF-8 encoder accepts.
    """
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that no file name decodes to
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def shorten(text: str, limit: int = MAX_TEXT) -> str:
    """`text` if it has at most `limit` characters, else its head and tail around a marker saying how much went."""
    if len(text) <= limit:
        return text
    # The marker counts within the limit, so a shortened string is never shortened again (idempotent).
    keep = max(0, limit - len(f"…[{len(text)} characters omitted]…"))
    head = keep // 2
    tail = keep - head
    return f"{text[:head]}…[{len(text) - keep} characters omitted]…{text[len(text) - tail :]}"


def bounded(text: str, limit: int = MAX_TEXT) -> str:
    """`printable` and `shorten`: what a stored or served string holds."""
    return shorten(printable(text), limit)


def _escape(match: re.Match) -> str:
    char = match.group()
    return _NAMED.get(char) or (f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}")


def displayable(text: str) -> str:
    """`text` as one inert line: controls, line breaks and escape sequences shown as `\\n`, `\\x1b`, ...

    A file name with a newline cannot forge a log line, nor one with `ESC [` rewrite a terminal.
    """
    return _UNSAFE.sub(_escape, printable(text))


def error_text(exc: BaseException) -> str:
    """An exception as text: `Type: message`, or its message alone where that already says what failed.

    OSError messages carry their errno and file, and ValueError is how our own checks say why an
    input is unusable (`ImageError` names its image): the type would only be noise there.
    """
    if isinstance(exc, (ValueError, OSError)):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"
