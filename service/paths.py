"""Path containment: every path the service touches must stay inside an allowed root.

Two names, two types, everywhere: `allowed` is an `AllowedRoots` (checks a name when a request
arrives); `roots` is a sequence of real paths, `AllowedRoots.real`, what `client.safeopen` checks
each descriptor against when it is opened (None: no containment).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from vggt_cache.client.safeopen import OutsideRoots, inside
from vggt_cache.client.text import printable, shorten
from vggt_cache.service.errors import UnusableInput


class InvalidPath(UnusableInput):
    """Not a path the service takes: empty, relative, or with a NUL byte."""


@dataclass(frozen=True)
class AllowedRoots:
    """The configured roots, both as written (a name may go through a symlink) and resolved."""

    given: tuple[str, ...]
    real: tuple[str, ...]

    @classmethod
    def of(cls, written: Sequence[str]) -> AllowedRoots:
        if not written:
            raise ValueError("at least one --allowed-root is required")
        given = tuple(os.path.normpath(os.path.abspath(os.path.expanduser(r))) for r in written)
        return cls(given=given, real=tuple(os.path.realpath(r) for r in given))

    def contain(self, path: str, writes_sibling: bool = True) -> str:
        """Return the normalised absolute `path` if it and what it resolves to are inside a root.

        The path is returned *unresolved* because the sibling cache file lives
        next to the name the caller uses; the name, its real location and the
        real folder a sibling cache file is written into must all be inside a root,
        so neither `..` nor a symlink can escape.
        """
        norm = self.named(path)
        if not self.holds(norm):
            raise OutsideRoots(f"path resolves (through a symlink) outside the allowed roots: {shorten(path)}")
        if writes_sibling and not self.holds(os.path.dirname(norm)):
            raise OutsideRoots(f"folder of {shorten(path)} resolves outside the allowed roots")
        return norm

    def holds(self, path: str) -> bool:
        """True when what `path` resolves to (through any symlinks) lies inside a root."""
        return inside(os.path.realpath(path), self.real)

    def named(self, path: str) -> str:
        """The normalised absolute `path` if its name (as written, nothing resolved) lies inside a root.

        Raises InvalidPath (empty, relative, a NUL byte, not encodable) or OutsideRoots.
        """
        if not isinstance(path, str) or not path or "\x00" in path:
            raise InvalidPath(f"invalid path {shorten(repr(path))}")
        if not os.path.isabs(path):
            raise InvalidPath(f"path must be absolute: {shorten(repr(path))}")
        try:
            os.fsencode(path)
        except UnicodeEncodeError as exc:  # a lone surrogate no file name decodes to
            raise InvalidPath(f"invalid path {shorten(printable(path))}: {exc.reason}") from None
        norm = os.path.normpath(path)
        if not inside(norm, self.given + self.real):
            raise OutsideRoots(f"path is outside the allowed roots: {shorten(path)}")
        return norm
