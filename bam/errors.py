"""The one exception type a user sees as a one-line message (the CLI prints it and exits 2)."""


class BamError(Exception):
    """A problem with the user's input: names the file, field or tensor and what was expected."""


def first_line(err: BaseException) -> str:
    """The first line of another library's error message (or its type), to quote inside ours."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
