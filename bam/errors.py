"""The one exception type a user sees as a one-line message (the CLI prints it and exits 2), and the
few helpers that word such messages the same way everywhere."""

from __future__ import annotations

from collections.abc import Iterable


class BamError(Exception):
    """A problem with the user's input: names the file, field or tensor and what was expected."""


def need(ok: bool, name: str, value, expected: str) -> None:
    """BamError `NAME=VALUE: expected EXPECTED` unless `ok`: the one shape of a bad-value message."""
    if not ok:
        raise BamError(f"{name}={value!r}: expected {expected}")


def first_duplicate(names: Iterable[str]) -> str | None:
    """The first name that occurs twice, or None: for "domain X is given twice" checks."""
    seen: set[str] = set()
    for name in names:
        if name in seen:
            return name
        seen.add(name)
    return None


def first_line(err: BaseException) -> str:
    """The first line of another library's error message (or its type), to quote inside ours."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
