"""The study's stage cache: one directory per stage under OUT/stages, named by a hash of everything the
stage depends on (its settings and its inputs' stage names), finished when it holds `done.json`; and
the run's log line and software versions that every stage record carries."""

from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path

import torch
import transformers


def _key(spec) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:12]


class Stages:
    """Stage directories named by what they depend on; `done.json` marks a finished one.

    Every record also carries `provenance`, what the study knows of its data and software when the
    stage finishes (Study.provenance): per domain the sha256 of the documents and their counts, the
    versions of Python, torch, transformers and the built-in corpus's sources.
    """

    def __init__(self, root: Path):
        self.root = root / "stages"
        self.provenance: dict = {}

    def dir(self, name: str, spec) -> Path:
        return self.root / f"{name}-{_key(spec)}"

    @staticmethod
    def done(directory: Path) -> dict | None:
        """The stage's record, or None if it has not finished (a torn marker counts as unfinished)."""
        try:
            return json.loads((directory / "done.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def finish(self, directory: Path, info: dict) -> dict:
        info = {**info, "provenance": self.provenance}
        tmp = directory / "done.json.tmp"
        tmp.write_text(json.dumps(info, indent=2, default=str))
        tmp.replace(directory / "done.json")
        return info


def log(message: str) -> None:
    print(f"[bam] {message}", flush=True)


def software_versions() -> dict:
    """What else the numbers depend on: torch picks its CPU kernels by architecture and vector
    instruction set (AVX2, AVX512, ...), and a kernel's float sums round in its own order."""
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "machine": platform.machine(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}
