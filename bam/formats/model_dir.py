"""Model directories: open any supported one as a stream of tensors, load it, save one atomically.

A model directory is an ordinary Hugging Face one: config.json, model.safetensors (or shards with
model.safetensors.index.json), tokenizer files, and, when we wrote it, manifest.json. Opening
reads config.json (verified at once) and the weights' headers; each weight file is verified when
its first tensor is read (bam.io.tensor_files). Directories without a manifest (Hugging Face
checkpoints from elsewhere) load unverified.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from bam.errors import BamError
from bam.formats.gguf import gguf_file_of, gguf_tokenizer_dir, open_gguf_model
from bam.formats.peft import base_dir_of, is_adapter_dir, open_adapter
from bam.formats.source import TOKENIZER_FILES, ModelSource
from bam.io.atomic import atomic_output_dir
from bam.io.jsonfile import read_json
from bam.io.manifest import read_manifest, verify_file
from bam.io.tensor_files import WEIGHTS_NAME, SafetensorsFiles, StreamingSafetensorsWriter
from bam.modeling.config import BamConfig, config_from_dict


def read_config_dict(path: Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise BamError(f"{path}: no such file or directory")
    if not path.is_dir():
        raise BamError(f"{path}: expected a model directory (config.json + safetensors weights) or a .gguf file")
    if not (path / "config.json").exists():
        raise BamError(f"{path}: not a model directory (no config.json)")
    manifest = read_manifest(path)
    if manifest is not None and "config.json" in manifest:  # small: checked at once, not lazily
        verify_file(path / "config.json", manifest["config.json"])
    return read_json(path / "config.json")


def open_model(path: str | Path) -> ModelSource:
    """Open one of our checkpoints, a supported Hugging Face dense checkpoint (see bam/formats/hf.py)
    or a GGUF file of one (bam/formats/gguf.py).

    Reads config.json and the weights' headers only; each weight file is verified against the
    directory's manifest (if any) when its first tensor is read.
    """
    path = Path(path)
    gguf_file = gguf_file_of(path)
    if gguf_file is not None:
        return open_gguf_model(gguf_file)
    if is_adapter_dir(path) and not (path / "config.json").exists():  # PEFT's: its base plus the adapter
        return open_adapter(path, open_model(base_dir_of(path)))
    config_dict = read_config_dict(path)
    model_type = config_dict.get("model_type")
    tokenizer_dir = path if any((path / f).exists() for f in TOKENIZER_FILES) else None
    if model_type != BamConfig.model_type:
        from bam.formats.hf import open_hf_model  # noqa: PLC0415  (hf imports need transformers' configs)

        return open_hf_model(path, config_dict, tokenizer_dir)
    config = config_from_dict(config_dict, path / "config.json")
    files = SafetensorsFiles(path)
    return ModelSource(path, "bam", config, files.names(), files.get, tokenizer_dir)


def tokenizer_dir_of(path: str | Path) -> Path | None:
    """Where the tokenizer of the model at `path` is to be looked for: the model directory itself,
    or for a GGUF file the tokenizer converted from it (None if the file holds none)."""
    gguf_file = gguf_file_of(Path(path))
    if gguf_file is None and is_adapter_dir(path) and not (Path(path) / "config.json").exists():
        return tokenizer_dir_of(base_dir_of(path))  # a PEFT adapter: its base's tokenizer
    return Path(path) if gguf_file is None else gguf_tokenizer_dir(gguf_file)



def load_model(path: str | Path, dtype: torch.dtype = torch.float32, adapter: dict | None = None):
    """Build a BamForCausalLM from any checkpoint `open_model` accepts, checking every tensor's shape.
    `adapter`: config fields of a new adapter to put on it (adapter, adapter_targets, lora_rank,
    lora_alpha; bam/modeling/adapters.py), initialised as PEFT does, so the model computes as before."""
    from bam.modeling.adapters import Adapter  # noqa: PLC0415
    from bam.modeling.model import BamForCausalLM  # noqa: PLC0415

    source = open_model(path)
    config = source.config
    if adapter is not None:
        if config.adapter is not None:
            raise BamError(f"{source.path}: already has an adapter ({config.adapter}); a new one goes on its base")
        config = config_from_dict({**config.to_dict(), **adapter}, f"{source.path} with a new adapter")
    with torch.device("meta"):
        model = BamForCausalLM(config)
    new_adapters = [module for module in model.modules() if isinstance(module, Adapter)] if adapter else []
    for module in new_adapters:  # the new adapter's tensors: made here, not read
        for name, param in list(module.named_parameters()):
            module.register_parameter(name, torch.nn.Parameter(torch.empty(param.shape, dtype=dtype)))
        module.reset_parameters()
    expected = {name: param for name, param in model.named_parameters() if param.device.type == "meta"}
    missing = [name for name in expected if name not in source.tensor_names]
    if missing:
        raise BamError(f"{source.path}: tensor {missing[0]} missing ({len(missing)} missing in all)")
    state = {}
    for name, param in expected.items():
        tensor = source.tensor(name)
        if tuple(tensor.shape) != tuple(param.shape):
            raise BamError(f"{source.path}: tensor {name} has shape {tuple(tensor.shape)}, "
                           f"expected {tuple(param.shape)} from config.json")
        state[name] = tensor.to(dtype)
    model.load_state_dict(state, strict=False, assign=True)
    if source.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.eval()
    return model


def init_model(config: BamConfig, out: str | Path, tokenizer_dir: Path | None, seed: int):
    """A freshly initialised BamForCausalLM(config), drawn from torch's generator seeded with `seed`,
    saved to `out` with the tokenizer's files; returns the model (`bam init`, the study's seed)."""
    from bam.modeling.model import BamForCausalLM  # noqa: PLC0415

    torch.manual_seed(seed)
    model = BamForCausalLM(config)
    save_model(model, out, tokenizer_dir)
    return model


def copy_tokenizer(src: Path | None, dst: Path) -> None:
    if src is None:
        return
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)


def save_model(model, out: str | Path, tokenizer_dir: Path | None = None, overwrite: bool = False) -> Path:
    """Write config.json + model.safetensors (+ tokenizer files) atomically."""
    out = Path(out)
    tensors = dict(model.named_parameters())  # named_parameters lists a tied weight once
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        model.config.save_pretrained(tmp)
        specs = {name: (t.dtype, tuple(t.shape)) for name, t in tensors.items()}
        with StreamingSafetensorsWriter(tmp / WEIGHTS_NAME, specs) as writer:
            for name, tensor in tensors.items():
                writer.write(name, tensor)
        copy_tokenizer(tokenizer_dir, tmp)
    return out
