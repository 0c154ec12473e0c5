"""Shared inputs for the training tests: real text from this machine, a tokenizer, a tiny seed model.

The text is the Python standard library: source files (domain "code") and prose (the licence
and the pydoc help topics, domain "prose"), cut into paragraph-aligned documents of ~1.5 kB so
every domain has enough documents for a non-empty validation split. Built once per test process
(the tokenizer takes a few seconds) and reused by test_train, test_eval and test_distributed.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

STDLIB = Path(sysconfig.get_paths()["stdlib"])
VOCAB = 512


@dataclass(frozen=True)
class Assets:
    root: Path
    code: Path  # code.jsonl
    prose: Path  # prose.jsonl
    tokenizer: Path
    seed: Path  # a tiny dense model with the tokenizer
    cache: Path  # tokenized-shard cache shared by every run

    def data(self, *names: str) -> list[str]:
        return [f"{name}={getattr(self, name)}" for name in names]


def paragraphs(text: str, size: int = 1500) -> list[str]:
    docs, current = [], ""
    for block in text.split("\n\n"):
        current += block + "\n\n"
        if len(current) >= size:
            docs.append(current)
            current = ""
    if current.strip():
        docs.append(current)
    return docs


def write_jsonl(path: Path, docs: list[str]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}) + "\n")
    return path


def code_documents() -> list[str]:
    files = sorted((STDLIB / "json").glob("*.py")) + sorted((STDLIB / "email").glob("*.py"))[:8]
    return [doc for f in files for doc in paragraphs(f.read_text(encoding="utf-8"))]


def prose_documents() -> list[str]:
    import pydoc_data.topics as topics

    docs = paragraphs((STDLIB / "LICENSE.txt").read_text(encoding="utf-8"))
    for key in sorted(topics.topics)[:40]:
        docs += paragraphs(topics.topics[key])
    return docs


@functools.lru_cache(maxsize=None)
def build_assets() -> Assets:
    from bam.cli import main
    from bam.data.tokenizer import train_tokenizer

    root = Path(tempfile.mkdtemp(prefix="bam-train-tests-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    code = write_jsonl(root / "code.jsonl", code_documents())
    prose = write_jsonl(root / "prose.jsonl", prose_documents())
    tokenizer = root / "tokenizer"
    train_tokenizer(code_documents() + prose_documents(), VOCAB, tokenizer)
    seed = root / "seed"
    assert main(["init", "--preset", "tiny", "--tokenizer", str(tokenizer), "--out", str(seed)]) == 0
    return Assets(root, code, prose, tokenizer, seed, root / "cache")


def bam_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "bam.cli", *map(str, args)]


def run_bam(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(bam_cmd(*args), capture_output=True, text=True, timeout=timeout, env=_env())


def torchrun(nproc: int, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", "-m", "bam.cli", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env())


def _env() -> dict:
    # Same thread count in every process: results do not depend on it, but speed on 2 cores does.
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line being written right now
    return records


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def tensors(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(model_dir) / "model.safetensors"))
