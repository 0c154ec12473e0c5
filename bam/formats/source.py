"""What every model format is opened as: our parameter names -> tensors, read lazily."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bam.modeling.config import BamConfig

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)


@dataclass
class ModelSource:
    """A checkpoint seen as our parameter names -> tensors, whatever format it is stored in."""

    path: Path
    family: str  # "bam" for ours, else the transformers model_type it was imported from
    config: BamConfig
    tensor_names: list[str]
    read: Callable[[str], torch.Tensor]
    tokenizer_dir: Path | None = None
    notes: list[str] = field(default_factory=list)
    # For formats that store one of our tensors in pieces (an imported Llama's FFN gate and up
    # projections): name -> those pieces, read lazily. Absent: every tensor is one piece.
    read_parts: Callable[[str], Iterable[torch.Tensor]] | None = None

    def tensor(self, name: str) -> torch.Tensor:
        return self.read(name)

    def tensor_parts(self, name: str) -> Iterable[torch.Tensor]:
        """Tensor `name` as row blocks whose row-major concatenation is `tensor(name)` (the form
        StreamingSafetensorsWriter.write takes), without concatenating the stored pieces."""
        return [self.read(name)] if self.read_parts is None else self.read_parts(name)
