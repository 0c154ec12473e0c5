"""Metrics: one JSON object per line in OUT/metrics.jsonl, written by rank 0.

A resumed run first drops the records after the step it resumes from, so the file reads as the
uninterrupted run's.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

METRICS = "metrics.jsonl"


def _finite_or_none(value):
    """JSON has no NaN or inf: write null (a skipped step also says why)."""
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def trim_metrics(path: Path, last_step: int) -> None:
    """Keep the records of steps <= last_step: what follows the training state is about to be redone.

    A fresh start passes -1 and keeps nothing.
    """
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by a kill
        if isinstance(record, dict) and record.get("step", math.inf) <= last_step:
            kept.append(line)
    # One fixed name (one writer: rank 0 of the run that owns OUT); a copy left by a kill before
    # the rename is overwritten here by the next start.
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)


class MetricsLog:
    def __init__(self, path: Path | None):
        self.file = open(path, "a", encoding="utf-8") if path is not None else None

    def write(self, record: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(_finite_or_none(record)) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
