"""The `bam` command. Each verb group lives in bam/commands/; this file only dispatches.

A `BamError` (bad input) prints one line and exits 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from bam.errors import BamError

# Modules under bam.commands, each with `register(subparsers)` adding its verbs; a verb's parser
# sets `func` to a function taking the parsed args.
COMMAND_MODULES = ("mix", "train", "pipeline")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bam", description="Branch-Attend-Mix: dense experts -> one MoE.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for input errors")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"bam.commands.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"bam.commands.{name}":
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
        print(f"bam {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"bam {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
