"""A peer tool in a virtualenv of its own (bench/.venv-NAME, gitignored): mergekit for the mixing
benchmark, kvpress for kv_compression.

Peers pull in their own dependencies and may pin other transformers versions than ours, so they
never go into the project's environment. The install is: create the venv, `pip install torch==<our
torch version>` first (the CPU wheel: pip then picks no other torch, and no CUDA build, for the
peer), then the peer's packages. Each step's output goes to bench/.cache/NAME-install.log; if
anything fails, `ensure` returns the reason and the log's tail instead of raising, and the benchmark
records it and still measures bam.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.common import BENCH_DIR, CACHE_DIR, log


def torch_requirement() -> str:
    """The torch we run, without its local label (2.13.0+cpu -> torch==2.13.0)."""
    return f"torch=={torch.__version__.split('+')[0]}"


@dataclass(frozen=True)
class PeerEnv:
    name: str  # the venv is bench/.venv-{name}
    packages: tuple[str, ...]  # installed after torch
    recorded: tuple[str, ...]  # the packages whose installed versions a result records
    ready: str = "python"  # the venv's executable whose presence means "installed"

    @property
    def venv(self) -> Path:
        return BENCH_DIR / f".venv-{self.name}"

    @property
    def install_log(self) -> Path:
        return CACHE_DIR / f"{self.name}-install.log"

    def bin(self, name: str) -> Path:
        return self.venv / ("Scripts" if sys.platform == "win32" else "bin") / name

    def run(self, cmd: list[str], timeout: float = 1800) -> None:
        """Run an install step, its output appended to the install log; raises on failure."""
        self.install_log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.install_log, "ab") as out:
            out.write(f"\n$ {' '.join(map(str, cmd))}\n".encode())
            out.flush()
            subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=True, timeout=timeout)

    def log_tail(self, n: int = 1500) -> str:
        try:
            return self.install_log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def installed_versions(self) -> dict:
        code = (f"import importlib.metadata as m, json; "
                f"print(json.dumps({{p: m.version(p) for p in {self.recorded!r}}}))")
        out = subprocess.run([str(self.bin("python")), "-c", code], capture_output=True, text=True, timeout=300,
                             check=False)
        if out.returncode != 0:
            raise RuntimeError(out.stderr.strip()[-500:])
        return json.loads(out.stdout.strip().splitlines()[-1])

    def ensure(self, install: bool = True, prepare=None) -> dict:
        """{"venv", "versions", "exe": the ready executable} when installed (installing it first if
        allowed), else {"venv", "error": reason}. `prepare(info)` runs before a fresh install (e.g.
        to record the peer's own requirements)."""
        exe = self.bin(self.ready)
        info: dict = {"venv": str(self.venv)}
        if exe.exists():
            try:
                return {**info, "versions": self.installed_versions(), "exe": str(exe)}
            except (RuntimeError, subprocess.SubprocessError) as err:
                info["warning"] = f"existing venv unusable ({err}); reinstalling"
        if not install:
            return {**info, "error": f"{self.name} is not installed in {self.venv} "
                                     f"(run `python -m bench.{self.name}_env` to install it)"}
        try:
            log(f"[bench] installing {self.name} into {self.venv} (log: {self.install_log})")
            self.install_log.parent.mkdir(parents=True, exist_ok=True)
            self.install_log.write_text("")
            if prepare is not None:
                prepare(info)
            if not self.bin("python").exists():
                self.run([sys.executable, "-m", "venv", str(self.venv)])
            self.run([str(self.bin("python")), "-m", "pip", "install", torch_requirement()])
            self.run([str(self.bin("python")), "-m", "pip", "install", *self.packages])
            info["versions"] = self.installed_versions()
            if not exe.exists():
                raise RuntimeError(f"pip installed {' '.join(self.packages)} but {exe} is missing")
            info["exe"] = str(exe)
        except (subprocess.SubprocessError, RuntimeError, OSError, StopIteration) as err:
            info["error"] = f"{self.name} could not be installed: {err}; pip log tail: {self.log_tail()}"
        return info

