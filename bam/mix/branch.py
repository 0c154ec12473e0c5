"""Branching (METHOD.md section 3): one copy of the seed model per expert domain, each to be
trained on its own domain and mixed later, plus a manifest recording the seed and its hash."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from bam.formats.model_dir import load_model, open_model, save_model
from bam.io.atomic import atomic_output_dir
from bam.io.manifest import MANIFEST_NAME, sha256_file, verify_manifest, write_manifest
from bam.io.tensor_files import SafetensorsFiles

BRANCH_MANIFEST = "branch.json"
# Top-level files of our own model directory (weights, config, tokenizer) that `branch` copies byte
# for byte.
MODEL_FILE_SUFFIXES = (".json", ".safetensors", ".txt", ".model", ".jinja")


def branch(seed: str | Path, experts: list[str], out: str | Path) -> Path:
    """DIR/<domain>/ for every expert (each a full model directory) and DIR/branch.json, atomically.

    Our own checkpoints are copied byte for byte (after checking the seed against its manifest,
    so a corrupt seed is not multiplied); an imported Hugging Face seed is converted once to our
    format and that is copied, so every expert loads the same way. Each expert directory gets its
    own manifest.
    """
    seed = Path(seed)
    source = open_model(seed)
    weight_files = sorted({Path(p).name for p in _weight_files(seed)})
    manifest = {
        "format": 1,
        "seed": {"path": str(seed.resolve()), "family": source.family,
                 "sha256": {name: sha256_file(seed / name) for name in weight_files}},
        "experts": {name: {"path": name} for name in experts},
    }
    with atomic_output_dir(out) as tmp:
        first = tmp / experts[0]
        if source.family == "bam":
            verify_manifest(seed)
            first.mkdir()
            for path in sorted(seed.iterdir()):
                if (path.is_file() and not path.name.startswith(".") and path.suffix in MODEL_FILE_SUFFIXES
                        and path.name != MANIFEST_NAME):
                    shutil.copy2(path, first / path.name)
            write_manifest(first)
        else:
            save_model(load_model(seed), first, source.tokenizer_dir)
        for name in experts[1:]:
            shutil.copytree(first, tmp / name)
        (tmp / BRANCH_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return Path(out)


def _weight_files(directory: Path) -> list[Path]:
    return sorted(set(SafetensorsFiles(directory).file_of.values()))
