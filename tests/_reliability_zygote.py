"""A process that imports bam once, then forks one child per command: a `bam` that starts at once.

The kill test runs `bam train`, `bam mix` and `bam run` dozens of times and SIGKILLs them at random
moments. A fresh interpreter spends seconds importing torch and transformers before any work, so
most random moments would land in imports and the test would take minutes. This process imports
everything and never computes (no thread pool exists for fork to break); each child it forks is a
real process running `bam.cli.main(argv)`, killed by its pid like any other.

Protocol: one JSON object per line on stdin, one JSON answer per line on stdout.
  {"run": [argv...], "log": path}  ->  {"pid": N}          fork a child running `bam argv...`
  {"poll": N}                      ->  {"status": S|null}  S: exit code, or -signal if killed
  {"wait": N}                      ->  {"status": S}       like poll, but blocks until it ends
"""

from __future__ import annotations

import json
import os
import sys
import traceback

# What the commands import lazily, imported here once so that children start with it (the report's
# plots use matplotlib's Agg backend; the zygote is started with MPLBACKEND=Agg).
import matplotlib.pyplot  # noqa: F401

import bam.formats.model_dir
import bam.cli
import bam.mix.mixing
import bam.study.study
import bam.study.report
import bam.data.tokenizer
import bam.train.loop


def run_child(argv: list[str], log: str) -> None:
    """In the forked child: stdout and stderr to `log`, run the command, exit with its code."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    code = 1
    try:
        code = bam.cli.main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001  (printed to the log; the exit code says it failed)
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code or 0)


def status_of(wait_status: int) -> int:
    return -os.WTERMSIG(wait_status) if os.WIFSIGNALED(wait_status) else os.WEXITSTATUS(wait_status)


def main() -> None:
    for line in sys.stdin:
        request = json.loads(line)
        if "run" in request:
            pid = os.fork()
            if pid == 0:
                run_child(request["run"], request["log"])
            answer = {"pid": pid}
        else:
            pid = request.get("poll", request.get("wait"))
            done, wait_status = os.waitpid(pid, os.WNOHANG if "poll" in request else 0)
            answer = {"status": status_of(wait_status) if done else None}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
