"""Errors a caller's input causes, as opposed to bugs: the HTTP edge answers them 4xx, a bug stays a 500."""


class UnusableInput(ValueError):
    """A path, data root or request field that cannot be used; the message says why (422)."""
