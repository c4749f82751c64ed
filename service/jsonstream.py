"""Reading JSON sample files a bounded piece at a time: jsonl lines and the elements of a JSON array."""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterator
from typing import BinaryIO

CHUNK_BYTES = 1 << 16  # sample files are read this much at a time
_BETWEEN = re.compile(r"[ \t\r\n]*,[ \t\r\n]*")  # what lies between two elements of an array


class MalformedSample(ValueError):
    """A sample object that is not one of the sample shapes (`service.samples`), or JSON that cannot be read."""


def lines(f: BinaryIO, limit: int) -> Iterator[tuple[int, bytes | None]]:
    """(line number, line) for every line of `f`; None for a line over `limit` bytes, skipped unread."""
    lineno = 0
    while line := f.readline(limit + 1):
        lineno += 1
        if len(line) > limit and not line.endswith(b"\n"):
            while line and not line.endswith(b"\n"):
                line = f.readline(CHUNK_BYTES)
            yield lineno, None
        else:
            yield lineno, line


class ArrayStream:
    """The elements of a JSON array, decoded one at a time from a buffer of at most about one element.

    `json.loads` of a whole file costs many times its size in memory; here a file of any size costs
    one element (at most `limit` bytes, else MalformedSample). Bad JSON, bad UTF-8 and nesting too
    deep for the parser are MalformedSample, raised where they are met.
    """

    def __init__(self, f: BinaryIO, limit: int) -> None:
        self.f, self.limit = f, limit
        self._utf8 = codecs.getincrementaldecoder("utf-8-sig")()
        self._decoder = json.JSONDecoder()
        self.buf, self.pos, self.eof, self.read_bytes = "", 0, False, 0
        self._bad: MalformedSample | None = None

    def _more(self, size: int = CHUNK_BYTES) -> None:
        if self._bad is not None:  # the parser needs what lies past bytes that are not UTF-8
            raise self._bad
        chunk = self.f.read(size)
        self.eof = not chunk
        try:
            text = self._utf8.decode(chunk, final=self.eof)
        except UnicodeDecodeError as e:  # what comes before the bad bytes is still parsed
            self._bad = MalformedSample(f"not valid UTF-8 near byte {self.read_bytes + e.start}")
            text, self.eof = chunk[: e.start].decode("utf-8", "ignore"), False
        self.read_bytes += len(chunk)
        self.buf = self.buf[self.pos :] + text
        self.pos = 0

    def _char(self) -> str:
        """The next character that is not whitespace ('' at the end), left in place."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in " \t\r\n":
                self.pos += 1
            if self.pos < len(self.buf) or self.eof:
                return self.buf[self.pos : self.pos + 1]
            self._more()

    def _value(self) -> object:
        while True:
            try:
                value, end = self._decoder.raw_decode(self.buf, self.pos)
            except RecursionError:
                raise MalformedSample("nested too deeply to parse") from None
            except ValueError as e:  # not valid, or not whole yet
                if self.eof:
                    raise MalformedSample(f"not valid JSON: {e}") from None
            else:
                if end - self.pos > self.limit:
                    raise MalformedSample(f"a sample of more than {self.limit} bytes (max_sample_bytes)")
                if end < len(self.buf) or self.eof:  # a number at the buffer's end may go on
                    self.pos = end
                    return value
            if len(self.buf) - self.pos > self.limit:
                raise MalformedSample(f"a sample of more than {self.limit} bytes (max_sample_bytes), or not valid JSON")
            # Doubling: an element is parsed O(log) times, and the buffer never holds much more than `limit`.
            self._more(min(max(CHUNK_BYTES, len(self.buf) - self.pos), self.limit + 1))

    def elements(self) -> Iterator[object] | None:
        """The array's elements in order, or None when the file does not hold an array."""
        if self._char() != "[":
            return None
        self.pos += 1
        return self._elements()

    def _elements(self) -> Iterator[object]:
        if self._char() == "]":
            return
        while True:
            yield self._value()
            between = _BETWEEN.match(self.buf, self.pos)
            if between is not None and between.end() < len(self.buf):  # the next element starts in the buffer
                self.pos = between.end()
                continue
            sep = self._char()
            self.pos += 1
            if sep == "]":
                return
            if sep != ",":
                raise MalformedSample(f"expected ',' or ']' near byte {self.read_bytes - len(self.buf) + self.pos}")
            self._char()
