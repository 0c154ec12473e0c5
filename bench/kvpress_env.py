"""kvpress (NVIDIA) in its own virtualenv (bench/.venv-kvpress, gitignored): the independent
reference for our dense SnapKV (bench/kv_compression.py).

kvpress pins its own transformers, so it is installed as a peer (bench/peer_env.py): torch first,
then kvpress.

`run_cases` runs bench/kvpress_snapkv.py inside the venv: the same retrieval cases (written by
bam.eval.retrieval as JSON), the model loaded by transformers from the same GGUF file, SnapKVPress
at the same budgets, greedy answers scored the same way.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from bench.common import BENCH_DIR
from bench.peer_env import PeerEnv

# gguf: transformers reads the same SmolLM2 GGUF file bam reads
KVPRESS = PeerEnv("kvpress", packages=("kvpress", "gguf"), recorded=("kvpress", "torch", "transformers", "gguf"))
SCRIPT = BENCH_DIR / "kvpress_snapkv.py"


def ensure(install: bool = True) -> dict:
    """{"exe": the venv's interpreter, "versions": ...} or {"error": reason}."""
    return KVPRESS.ensure(install)


def run_cases(cases_path: Path, out_path: Path, timeout: float = 3600) -> dict:
    """Run bench/kvpress_snapkv.py in the venv on a cases file; its JSON, or {"error": ...}."""
    info = ensure(install=False)
    if "error" in info:
        return info
    run = subprocess.run([info["exe"], str(SCRIPT), str(cases_path), str(out_path)], capture_output=True,
                         text=True, timeout=timeout, check=False)
    if run.returncode != 0:
        return {"error": f"kvpress_snapkv.py exited {run.returncode}: {run.stderr.strip()[-1500:]}"}
    return {**json.loads(out_path.read_text()), "versions": info["versions"]}


if __name__ == "__main__":  # python -m bench.kvpress_env: install the peer now
    print(json.dumps(ensure(install=True), indent=2))
