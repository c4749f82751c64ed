"""Errors a caller's input causes, as opposed to bugs: the HTTP edge answers them 4xx, the CLI one line."""

from __future__ import annotations

from collections.abc import Sequence


class UnusableInput(ValueError):
    """A path, data root or request field that cannot be used; the message says why (422).

    `loc` names the request field, as in a validation error's `{"loc", "msg", "type"}`.
    """

    def __init__(self, message: str, loc: Sequence[str | int] = ("body",)) -> None:
        super().__init__(message)
        self.loc = tuple(loc)


class CommandError(Exception):
    """A command cannot go on: the message says what is wrong and what to do (one `[ERROR]` line, no traceback)."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code
