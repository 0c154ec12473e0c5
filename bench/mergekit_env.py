"""mergekit in its own virtualenv (bench/.venv-mergekit, gitignored, bench/peer_env.py), for the mixing
benchmark.

Before installing, mergekit's metadata (`pip download mergekit --no-deps`) is read and its torch /
transformers requirements are recorded; an older transformers pinned by mergekit is fine inside its
venv.
"""

from __future__ import annotations

import json

import re
import sys
import tempfile
import zipfile
from pathlib import Path

from bench.peer_env import PeerEnv

MERGEKIT = PeerEnv("mergekit", packages=("mergekit",), recorded=("mergekit", "torch", "transformers"),
                   ready="mergekit-moe")


def mergekit_requirements(python: str = sys.executable) -> dict:
    """mergekit's version and its torch/transformers requirements, from `pip download --no-deps`."""
    with tempfile.TemporaryDirectory() as tmp:
        MERGEKIT.run([python, "-m", "pip", "download", "mergekit", "--no-deps", "-d", tmp], timeout=600)
        wheels = list(Path(tmp).glob("mergekit-*.whl"))
        if not wheels:
            return {"error": "pip download produced no wheel (sdist only?)"}
        with zipfile.ZipFile(wheels[0]) as zf:
            meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
            text = zf.read(meta).decode("utf-8", "replace")
    version = re.search(r"^Version: (.+)$", text, re.MULTILINE)
    requires = re.findall(r"^Requires-Dist: (.+)$", text, re.MULTILINE)
    pick = lambda pkg: [r for r in requires if re.match(rf"{pkg}\b", r) and "extra ==" not in r]
    return {"version": version.group(1).strip() if version else None, "wheel": wheels[0].name,
            "requires_torch": pick("torch"), "requires_transformers": pick("transformers")}


def ensure(install: bool = True) -> dict:
    """{"exe": path-to-mergekit-moe, "versions": ..., "requirements": ...} or {"error": reason}."""
    return MERGEKIT.ensure(install, prepare=lambda info: info.update(requirements=mergekit_requirements()))


if __name__ == "__main__":  # python -m bench.mergekit_env: install the peer now
    print(json.dumps(ensure(install=True), indent=2))
