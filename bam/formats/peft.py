"""PEFT adapter directories: read onto their base as our model's adapter, and written from one.

A PEFT adapter directory holds adapter_config.json (PEFT's LoraConfig or IA3Config) and
adapter_model.safetensors, whose tensors are named by the base's modules in its Hugging Face family
(`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`, `...k_proj.ia3_l`). bam reads
one as the base with config.adapter set (bam/modeling/adapters.py) and writes what `bam train
--adapter` trained the same way, so `peft.PeftModel.from_pretrained(hf_base, DIR)` loads it and
computes the same function. Module names come from the family's name map (bam/formats/names.py,
through bam/formats/hf.py hf_tensor_names): our fused gate_up_proj's two LoRA pairs are Llama's
gate_proj and up_proj adapters. A base bam initialised is named as Llama (what `bam export
--format llama` writes).

`open_adapter` opens a directory on its base as one ModelSource (the base's tensors plus the
adapter's), and bam/formats/model_dir.py open_model does so for a directory holding an
adapter_config.json, with the base at the local directory in its `base_model_name_or_path`: so
`load_model`, `bam inspect`, `bam eval` and `bam train` take an adapter directory wherever they take a
model.

The base's identity: PEFT records only the base's name or path; bam also writes `bam_base.json`
(BASE_FILE: the base's path and its content fingerprint, sha256 over its config.json and weight
files, bam/train/fingerprint.py), which PEFT ignores. A later mix compares it with its seed's; a
directory without it (made by PEFT) is checked against the base by its tensors' shapes only.

Refused with one line naming the file and field: PEFT types other than LoRA and IA3, options bam's
model does not compute (DoRA, biases, modules_to_save, per-module ranks, layer subsets, ...),
target modules other than q/k/v/o and the FFN's (ADAPTER_TARGETS), families whose attention or FFN
input is one fused module (Phi-3, GPT-NeoX), and tensors whose names or shapes are not the base's.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from bam.errors import BamError, first_line
from bam.formats.hf import (INTERLEAVED_ROPE_FAMILIES, half_to_interleaved_rope, hf_tensor_names,
                            interleaved_to_half_rope)
from bam.formats.names import FUSED_NAMES
from bam.formats.source import ModelSource
from bam.io.atomic import atomic_output_dir
from bam.io.jsonfile import read_json
from bam.modeling.config import ADAPTER_TARGETS, BamConfig, config_from_dict
from bam.modeling.layout import Param, adapted_projections, parameters

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
BASE_FILE = "bam_base.json"
PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel / IA3Model -> the transformers model
PEFT_TYPES = {"LORA": "lora", "IA3": "ia3"}
# Families whose attention (or FFN input) is one fused module: a PEFT adapter on it is one pair for
# several of our projections, which bam does not split.
FUSED_FAMILIES = (*FUSED_NAMES, "phi3")
# PEFT config fields that do not change the adapted function, or only training (dropout,
# initialisation): any value is accepted. Every other field bam does not honour must be unset
# (null, false, empty, or bias "none"), or the adapter is refused naming it.
IGNORED_FIELDS = ("peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode",
                  "auto_mapping", "peft_version", "lora_dropout", "init_ia3_weights", "megatron_core",
                  "loftq_config", "eva_config", "corda_config", "lora_ga_config", "runtime_config",
                  "qalora_group_size")  # (the group size of QA-LoRA, refused by its use_qalora)
HONOURED_FIELDS = {"lora": ("r", "lora_alpha", "target_modules", "use_rslora", "init_lora_weights"),
                   "ia3": ("target_modules", "feedforward_modules")}
# LoRA initialisations that leave the base's weights as they are (PiSSA, OLoRA, LoftQ... change them).
BASE_KEEPING_INITS = (True, False, "gaussian")


def is_adapter_dir(path: Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_family(base: ModelSource) -> str:
    """The Hugging Face family whose module names the adapter uses: the base's (Llama's for a model
    bam initialised), refused where PEFT's modules are fused ones of ours."""
    family = base.family if base.family != "bam" else (base.config.source_model_type or "llama")
    if family in FUSED_FAMILIES:
        raise BamError(f"{base.path}: adapters on {family} models are not supported (its fused q/k/v or "
                       f"gate/up module is one PEFT adapter for several of bam's projections)")
    return family


def peft_tensor_map(config: BamConfig, family: str) -> dict[str, list[tuple[str, int | None]]]:
    """Our adapter tensor name -> its PEFT tensors, each with the piece of ours it is (None: all of
    it); in the layout's order."""
    table = {}
    for i in range(config.num_hidden_layers):
        for sublayer, weights in (("attn", "attn.{}.weight"), ("ffn", "ffn.experts.{}")):
            for name, _, _, _ in adapted_projections(config, sublayer):
                param = Param(f"model.layers.{i}." + weights.format(name), (), "", layer=i)
                modules = [PEFT_PREFIX + hf.removesuffix(".weight") for hf in hf_tensor_names(param, family)]
                pieces = [None] if len(modules) == 1 else list(range(len(modules)))
                ours = f"model.layers.{i}.{sublayer}.adapter.{name}"
                if config.adapter == "lora":
                    for kind in ("A", "B"):
                        table[f"{ours}_lora_{kind}"] = [(f"{m}.lora_{kind}.weight", p) for m, p in zip(modules, pieces)]
                else:
                    table[f"{ours}_ia3"] = [(f"{modules[0]}.ia3_l", None)]
    return table


def _module_names(config: BamConfig, family: str) -> list[str]:
    """PEFT's target_modules for config's adapter: the family's module names (their last component)."""
    names = {key.split(".")[-3 if key.endswith(".weight") else -2]
             for entries in peft_tensor_map(config, family).values() for key, _ in entries}
    return sorted(names)


def _rope_rows(name: str, family: str) -> bool:
    """Whether our adapter tensor `name` has rows in q/k's head order (an interleaved-RoPE family reorders them)."""
    return family in INTERLEAVED_ROPE_FAMILIES and name.rsplit(".", 1)[-1] in (
        "q_proj_lora_B", "k_proj_lora_B", "q_proj_ia3", "k_proj_ia3")


# ---------------------------------------------------------------------------------------------
# Reading


def adapter_fields(peft: dict, where: Path) -> dict:
    """Our config fields (adapter, adapter_targets, lora_rank, lora_alpha) for a PEFT adapter config,
    or BamError naming the field bam cannot compute."""
    def refuse(field: str, expected: str):
        raise BamError(f"{where}: field {field}={peft.get(field)!r}: expected {expected}")

    kind = PEFT_TYPES.get(peft.get("peft_type"))
    if kind is None:
        refuse("peft_type", f"one of {', '.join(PEFT_TYPES)}")
    for field, value in peft.items():
        unset = value in (None, False, {}, [], "none")
        if field not in IGNORED_FIELDS and field not in HONOURED_FIELDS[kind] and not unset:
            refuse(field, "it unset (an option bam's adapters do not compute)")
    allowed = ADAPTER_TARGETS[kind]
    modules = peft.get("target_modules")
    if modules == "all-linear" and kind == "lora":
        modules = list(allowed)
    if not isinstance(modules, list) or not modules or any(
            not isinstance(m, str) or m.split(".")[-1] not in allowed for m in modules):
        refuse("target_modules", f"a list of module names among {', '.join(allowed)}")
    targets = sorted({m.split(".")[-1] for m in modules}, key=allowed.index)
    if kind == "ia3":
        feedforward = peft.get("feedforward_modules") or []
        if not isinstance(feedforward, list) or sorted({m.split(".")[-1] for m in feedforward if isinstance(m, str)}) \
                != [t for t in targets if t == "down_proj"]:
            refuse("feedforward_modules", "down_proj exactly when it is targeted (bam rescales the output of "
                                          "q/k/v and the input of down_proj)")
        return {"adapter": "ia3", "adapter_targets": targets}
    if peft.get("init_lora_weights", True) not in BASE_KEEPING_INITS:
        refuse("init_lora_weights", "an initialisation that leaves the base's weights as they are (true, false "
                                    "or 'gaussian')")
    rank, alpha = peft.get("r"), peft.get("lora_alpha")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        refuse("r", "a positive integer")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
        refuse("lora_alpha", "a positive number")
    if peft.get("use_rslora"):  # scaling alpha / sqrt(r) is ours, alpha' / r, with alpha' = alpha sqrt(r)
        alpha = alpha * math.sqrt(rank)
    return {"adapter": "lora", "adapter_targets": targets, "lora_rank": rank, "lora_alpha": alpha}


def read_adapter(adapter_dir: Path, base: ModelSource) -> tuple[BamConfig, dict[str, torch.Tensor]]:
    """The base's config with the adapter, and the adapter's tensors under our names, checked
    against the base: every tensor present, none unknown, each of the base's shape."""
    adapter_dir = Path(adapter_dir)
    config_file, weights_file = adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS
    fields = adapter_fields(read_json(config_file), config_file)
    family = adapter_family(base)
    config = config_from_dict({**base.config.to_dict(), **fields}, config_file)
    table = peft_tensor_map(config, family)
    shapes = {param_name: shape for param_name, shape in _adapter_shapes(config)}
    try:
        with safe_open(str(weights_file), framework="pt") as f:
            stored = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError) as err:
        raise BamError(f"{weights_file}: not a readable safetensors file ({first_line(err)})") from None
    expected_keys = {key for entries in table.values() for key, _ in entries}
    unknown = sorted(set(stored) - expected_keys)
    if unknown:
        raise BamError(f"{weights_file}: tensor {unknown[0]} is not one bam expects for this {config.adapter} adapter "
                       f"on {base.path} (targets {', '.join(config.adapter_targets)}, "
                       f"{config.num_hidden_layers} layers of {family}): another base or target?")
    tensors = {}
    for name, entries in table.items():
        pieces = []
        for key, piece in entries:
            if key not in stored:
                raise BamError(f"{weights_file}: tensor {key} missing (an adapter of another base or target?)")
            tensor = stored[key]
            if config.adapter == "ia3":
                tensor = tensor.flatten()  # PEFT's [O, 1] (output) or [1, I] (feedforward input)
            expected = shapes[name][1:] if piece is not None else shapes[name]
            if tuple(tensor.shape) != tuple(expected):
                raise BamError(f"{weights_file}: tensor {key} has shape {tuple(stored[key].shape)}, expected "
                               f"{tuple(expected)} for base {base.path} (an adapter of another base?)")
            pieces.append(tensor)
        tensor = pieces[0] if len(pieces) == 1 else torch.stack(pieces)
        if _rope_rows(name, family):
            tensor = interleaved_to_half_rope(tensor, config.head_dim)
        tensors[name] = tensor
    return config, tensors


def _adapter_shapes(config: BamConfig) -> list[tuple[str, tuple[int, ...]]]:
    return [(param.name, param.shape) for param in parameters(config) if param.role == "adapter"]


def base_dir_of(adapter_dir: Path) -> Path:
    """The base model of an adapter directory: the local directory its config names in base_model_name_or_path."""
    config_file = Path(adapter_dir) / ADAPTER_CONFIG
    base_dir = read_json(config_file).get("base_model_name_or_path")
    if not isinstance(base_dir, str) or not Path(base_dir).is_dir():
        raise BamError(f"{config_file}: field base_model_name_or_path={base_dir!r}: expected the base model's "
                       f"local directory")
    return Path(base_dir)


def open_adapter(adapter_dir: Path, base: ModelSource) -> ModelSource:
    """A PEFT adapter directory on `base` (opened by bam/formats/model_dir.py open_model, usually at
    `base_dir_of(adapter_dir)`) as one model: the base's tensors plus the adapter's."""
    adapter_dir = Path(adapter_dir)
    config, tensors = read_adapter(adapter_dir, base)

    def read(name: str) -> torch.Tensor:
        return tensors[name] if name in tensors else base.tensor(name)

    def read_parts(name: str):
        return [tensors[name]] if name in tensors else base.tensor_parts(name)

    return ModelSource(adapter_dir, base.family, config, [*base.tensor_names, *tensors], read, base.tokenizer_dir,
                       read_parts=read_parts)


# ---------------------------------------------------------------------------------------------
# Writing


def save_adapter(model, out: Path | str, base: ModelSource, base_fingerprint: str, overwrite: bool = False) -> Path:
    """Write `model`'s adapter (config.adapter) as a PEFT adapter directory for `base`, atomically:
    adapter_config.json, adapter_model.safetensors and bam_base.json (the base's identity)."""
    config = model.config
    family = adapter_family(base)
    params = dict(model.named_parameters())
    tensors = {}
    for name, entries in peft_tensor_map(config, family).items():
        tensor = params[name].detach().to("cpu", torch.float32)
        if _rope_rows(name, family):
            tensor = half_to_interleaved_rope(tensor, config.head_dim)
        for key, piece in entries:
            part = tensor if piece is None else tensor[piece]
            if config.adapter == "ia3":  # PEFT's shapes: [1, I] for a feedforward module's input, else [O, 1]
                part = part[None] if key.endswith("down_proj.ia3_l") else part[:, None]
            tensors[key] = part.contiguous()
    modules = _module_names(config, family)
    base_path = str(Path(base.path).resolve())  # where `open_adapter` finds it again, whatever the cwd
    peft = {"peft_type": config.adapter.upper(), "task_type": "CAUSAL_LM", "base_model_name_or_path": base_path,
            "target_modules": modules, "inference_mode": True, "modules_to_save": None, "fan_in_fan_out": False}
    if config.adapter == "lora":
        alpha = config.lora_alpha
        peft.update(r=config.lora_rank, lora_alpha=int(alpha) if float(alpha).is_integer() else alpha,
                    lora_dropout=0.0, bias="none", use_rslora=False, use_dora=False, init_lora_weights=True)
    else:
        peft.update(feedforward_modules=[m for m in modules if m == "down_proj"], init_ia3_weights=True)
    identity = {"base": {"path": base_path, "family": family, "fingerprint": base_fingerprint}}
    with atomic_output_dir(Path(out), overwrite=overwrite) as tmp:
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(peft, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / BASE_FILE).write_text(json.dumps(identity, indent=2) + "\n", encoding="utf-8")
    return Path(out)


def base_identity(adapter_dir: Path) -> dict | None:
    """What bam recorded of an adapter's base (bam_base.json's "base"), None for one PEFT made."""
    path = Path(adapter_dir) / BASE_FILE
    return read_json(path).get("base") if path.is_file() else None
