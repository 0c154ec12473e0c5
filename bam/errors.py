"""The one exception type a user sees as a one-line message (the CLI prints it and exits 2)."""


class BamError(Exception):
    """A problem with the user's input: names the file, field or tensor and what was expected."""
