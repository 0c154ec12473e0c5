"""The `bam` command. Each verb group lives in a module beside this one; this file only dispatches.

Errors a user can act on print one line and exit 2, with nothing half-written left behind: a
`BamError` (bad input), an argument error, and an OSError from the environment (a file that cannot
be read, a full disk). `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from bam.errors import BamError

# Modules under bam.cli, each with `register(subparsers)` adding its verbs; a verb's parser
# sets `func` to a function taking the parsed args.
COMMAND_MODULES = ("mix", "train", "pipeline", "hf", "nexus")


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, except that a usage error is one line like every other error (usage is in --help).

    Subparsers are created with the parent's class, so every verb gets this behaviour.
    """

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="bam", description="Branch-Attend-Mix: dense experts -> one MoE.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for input errors")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"bam.cli.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"bam.cli.{name}":
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except BamError as err:
        if args.debug:
            raise
        print(f"bam {args.command}: error: {_one_line(str(err))}", file=sys.stderr)
        return 2
    except OSError as err:
        # The environment, not bam: a path that cannot be read or written. Code that expects such
        # errors raises BamError with more context; this keeps the rest to one line as well.
        if args.debug or err.errno is None:
            raise
        where = f"{err.filename}: " if err.filename else ""
        print(f"bam {args.command}: error: {where}{err.strerror or err} (--debug for details)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"bam {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


def _one_line(message: str) -> str:
    # A message built from another library's error can carry newlines; the user gets one line.
    return " ".join(message.splitlines())

