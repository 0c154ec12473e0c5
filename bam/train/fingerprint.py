"""The run fingerprint: what a training state must share with the run that resumes from it.

It names the starting model by content, each domain by content and weight, and the settings that
change the maths; `--resume` refuses a training state whose fingerprint differs, naming the first
difference.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from bam.data.shards import TokenizedDomain
from bam.io.manifest import sha256_file
from bam.io.tensor_files import WEIGHTS_INDEX_NAME
from bam.train.config import TrainConfig

# Settings that change the maths of the run. grad_accum, world size, save/eval cadence and the
# like are left out: they change memory and speed, not the result, so a run may resume on a
# different number of GPUs.
MATH_FIELDS = ("max_steps", "batch_size", "seq_len", "lr", "warmup", "min_lr_ratio", "weight_decay",
               "clip", "seed", "aux_loss_coef", "z_loss_coef", "train_only")


def model_fingerprint(model_dir: Path) -> str:
    """sha256 over config.json and every weight file (or the GGUF file): the identity of the starting model."""
    digest = hashlib.sha256()
    files = [model_dir] if model_dir.is_file() else [model_dir / "config.json", model_dir / WEIGHTS_INDEX_NAME,
                                                     *sorted(model_dir.glob("*.safetensors")),
                                                     *sorted(model_dir.glob("*.gguf"))]
    for path in files:
        if path.is_file():
            digest.update(f"{path.name}:{sha256_file(path)}\n".encode())
    return digest.hexdigest()


def run_fingerprint(cfg: TrainConfig, domains: list[TokenizedDomain], weights: list[float]) -> dict:
    train = {name: getattr(cfg, name) for name in MATH_FIELDS}
    if cfg.adapter is not None:  # (only then: the fingerprints of runs without one stay as they were)
        train["adapter"] = cfg.adapter_fields()
    return {
        "model": model_fingerprint(Path(cfg.model)),
        "data": {d.name: {"weight": w, "content": d.meta.get("key")} for d, w in zip(domains, weights)},
        "train": train,
    }


def first_difference(old, new, path: str = "") -> str | None:
    """A readable description of the first place two fingerprints differ, or None."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(old) + [k for k in new if k not in old]:
            where = f"{path}.{key}" if path else str(key)
            if key not in old:
                return f"{where} is new"
            if key not in new:
                return f"{where} is missing"
            found = first_difference(old[key], new[key], where)
            if found:
                return found
        return None
    if old != new:
        def show(v):
            return f"{v[:12]}..." if isinstance(v, str) and len(v) == 64 else repr(v)
        return f"{path}: {show(old)} in the checkpoint, {show(new)} now"
    return None
