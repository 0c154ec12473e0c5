"""mix.json: how a mixed model was made (its sources, method and options), written beside its
weights by `mix`, extended by `add_expert` and by the finetune after adding an expert."""

from __future__ import annotations

import json
from pathlib import Path

PROVENANCE_NAME = "mix.json"


def read_provenance(model_dir: str | Path) -> dict:
    """The model directory's mix.json, or {} if it has none (a model that was not mixed)."""
    path = Path(model_dir) / PROVENANCE_NAME
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def write_provenance(model_dir: Path, provenance: dict) -> None:
    (model_dir / PROVENANCE_NAME).write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
