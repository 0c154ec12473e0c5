"""Import dense Hugging Face checkpoints as our model, and name our tensors back in a family's checkpoint.

An imported directory is read lazily, tensor by tensor, exactly like one of ours (a `ModelSource`),
so `bam mix`, `bam train` and `load_model` accept it directly. Its config is translated by
bam/formats/families.py (which also lists the families and what each needs); its tensors are
named by bam/formats/names.py, read here piece by piece: a dense MLP's gate and up matrices, the
rows of a fused q/k/v tensor (Phi-3, GPT-NeoX), interleaved-RoPE rows reordered (Cohere).
`family_tensor_plan` is the way back, for export.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from transformers import AutoConfig, PreTrainedConfig

from bam.errors import BamError
from bam.formats.families import REFUSED_FAMILIES, SUPPORTED_FAMILIES, translate_config
from bam.formats.names import (CHECKPOINT_ALIASES, DENSE_MLP, FAMILY_NAMES, FUSED_NAMES, LLAMA_NAMES, hf_name,
                               layer_prefix)
from bam.formats.source import ModelSource
from bam.io.tensor_files import SafetensorsFiles
from bam.modeling.config import BamConfig, config_from_dict
from bam.modeling.layout import Param, parameter_table, parameters


def _head_rows(weight: torch.Tensor, head_dim: int, order: torch.Tensor) -> torch.Tensor:
    """`weight` with each head's rows taken in `order`."""
    return weight.view(-1, head_dim, *weight.shape[1:])[:, order].reshape(weight.shape)


def _half_rope_order(head_dim: int) -> torch.Tensor:
    """Interleaved RoPE rotates dims (2i, 2i+1) by angle i; rotate-half rotates (i, i + Dh/2). Moving
    even dims to the first half and odd dims to the second, in both q and k, leaves every q.k
    product unchanged, so attention is exactly the same function."""
    return torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])


def interleaved_to_half_rope(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Each head's rows reordered so interleaved-pair RoPE (Cohere) becomes rotate-half RoPE (ours)."""
    return _head_rows(weight, head_dim, _half_rope_order(head_dim))


def half_to_interleaved_rope(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The inverse of interleaved_to_half_rope, for export: each head's rows back in Cohere's order."""
    return _head_rows(weight, head_dim, torch.argsort(_half_rope_order(head_dim)))


# Families with interleaved RoPE, which rotates the rows of these tensors (see interleaved_to_half_rope).
INTERLEAVED_ROPE_FAMILIES = ("cohere", "cohere2")
ROTARY_TENSORS = ("attn.q_proj.weight", "attn.q_proj.bias", "attn.k_proj.weight", "attn.k_proj.bias")


def fused_rows(family: str, config: BamConfig, block: int) -> list[tuple[int, int]]:
    """Where block `block` (0 q, 1 k, 2 v) of a family's fused attention input projection lies, as
    row ranges [start, stop): Phi-3 stacks [q; k; v] (its qkv_proj output sliced at H*A and
    H*A + H_kv*A); GPT-NeoX interleaves them per head, [q_h; k_h; v_h] for each head h (its
    `view(..., heads, 3 * head_size).chunk(3)`)."""
    a, heads = config.head_dim, config.num_attention_heads
    if family == "gpt_neox":
        return [(3 * h * a + block * a, 3 * h * a + (block + 1) * a) for h in range(heads)]
    widths = (heads * a, config.num_key_value_heads * a, config.num_key_value_heads * a)
    start = sum(widths[:block])
    return [(start, start + widths[block])]


def hf_tensor_names(param: Param, family: str) -> tuple[str, ...]:
    """The checkpoint tensors that make our `param`, in order (bam/formats/names.py); for one the
    family stores fused with others (FUSED_NAMES), the fused tensor (`hf_tensor_parts`: which rows)."""
    fused = FUSED_NAMES.get(family, {}).get(param.local)
    if fused is not None:
        return (layer_prefix(param, family) + fused[0],)
    names = FAMILY_NAMES.get(family, LLAMA_NAMES)
    if param.local in DENSE_MLP and param.local not in names:
        return tuple(layer_prefix(param, family) + name for name in DENSE_MLP[param.local])
    return (hf_name(param, names, family),)


def hf_tensor_parts(param: Param, family: str, config: BamConfig) -> list[tuple[str, list[tuple[int, int]] | None]]:
    """`hf_tensor_names`, each with the row ranges of it that belong to `param` (None: all of it)."""
    fused = FUSED_NAMES.get(family, {}).get(param.local)
    rows = None if fused is None else fused_rows(family, config, fused[1])
    return [(name, rows) for name in hf_tensor_names(param, family)]


def _read_rows(files, name: str, rows: list[tuple[int, int]] | None) -> list[torch.Tensor]:
    """Tensor `name`, or those row ranges of it (`get_rows`: a safetensors file reads only those
    rows' bytes, a GGUF file's tensors are sliced in memory)."""
    return [files.get(name)] if rows is None else files.get_rows(name, rows)


def check_family(family, where: str) -> None:
    if family not in SUPPORTED_FAMILIES + REFUSED_FAMILIES:
        raise BamError(f"{where}: model_type={family!r} is not supported "
                       f"(expected bam or one of {', '.join(SUPPORTED_FAMILIES)})")


def open_hf_model(path: Path, config_dict: dict, tokenizer_dir: Path | None) -> ModelSource:
    family = config_dict.get("model_type")
    check_family(family, f"{path}/config.json")
    try:
        hf_config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (ValueError, TypeError, OSError) as err:
        raise BamError(f"{path}/config.json: not a valid {family} config ({err})")
    return hf_model_source(path, hf_config, lambda: SafetensorsFiles(path), tokenizer_dir, path / "config.json")


def hf_model_source(path: Path, hf_config: PreTrainedConfig, open_files: Callable, tokenizer_dir: Path | None,
                    config_file: Path) -> ModelSource:
    """A checkpoint of a family transformers knows, as our model: `open_files()` gives its tensors
    under transformers' names (`names()`, `get(name)`, `get_rows`: a safetensors directory, or a
    GGUF file's tensors, bam/formats/gguf.py), opened only once the config is known to be one we
    can compute; `config_file` is where its config came from, for messages."""
    family = hf_config.model_type
    fields = translate_config(hf_config, path)
    config = config_from_dict({"model_type": "bam", **fields}, config_file)
    files = open_files()
    available = set(files.names())
    table = parameter_table(config)

    def read_parts(name: str) -> Iterator[torch.Tensor]:
        """Our tensor `name` as the checkpoint's pieces, read one at a time: row blocks that
        concatenate into it (a dense MLP's gate and up matrices are our one expert's gate_up_proj;
        a fused q/k/v tensor's rows of q, of k or of v)."""
        param = table[name]
        for hf_name_, rows in hf_tensor_parts(param, family, config):
            if hf_name_ not in available:  # the checkpoint may use the name transformers renames on load
                hf_name_ = next((alias for alias in CHECKPOINT_ALIASES.get(hf_name_, ()) if alias in available),
                                hf_name_)
            if hf_name_ not in available:
                raise BamError(f"{path}: tensor {hf_name_} missing from the {family} checkpoint")
            for tensor in _read_rows(files, hf_name_, rows):
                if family in INTERLEAVED_ROPE_FAMILIES and param.local in ROTARY_TENSORS:
                    tensor = interleaved_to_half_rope(tensor, config.head_dim)
                yield tensor

    def read_tensor(name: str) -> torch.Tensor:
        pieces = list(read_parts(name))
        tensor = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        # A dense checkpoint's MLP is our one expert: [2F, D] -> [1, 2F, D], [D, F] -> [1, D, F]
        return tensor[None] if table[name].role == "ffn_experts" else tensor

    return ModelSource(path, family, config, list(table), read_tensor, tokenizer_dir, read_parts=read_parts)


# ---------------------------------------------------------------------------------------------
# Back to the family (bam/formats/export.py): the inverse of read_parts.


def family_tensor_plan(config: BamConfig, family: str) -> dict[str, tuple[tuple[str, ...], Callable]]:
    """Checkpoint tensor name -> (our tensor, how to make it from ours): the inverse of read_parts.
    Our one FFN expert's gate_up_proj [1, 2F, D] is cut back into the family's gate and up
    matrices, interleaved-RoPE families get their row order back, and a fused q/k/v tensor (Phi-3,
    GPT-NeoX) is joined from our three."""
    plan, fused = {}, {}
    for param in parameters(config):
        names = hf_tensor_names(param, family)
        if param.local in FUSED_NAMES.get(family, {}):  # a block of a fused q/k/v tensor: joined below
            fused.setdefault(names[0], {})[FUSED_NAMES[family][param.local][1]] = param.name
            continue
        for k, name in enumerate(names):
            plan[name] = (param.name,), lambda tensor, param=param, k=k, n=len(names): _family_piece(
                tensor, param, family, config.head_dim, k, n)
    for name, blocks in fused.items():
        plan[name] = tuple(blocks[block] for block in range(3)), lambda *qkv: fuse_qkv(family, config, *qkv)
    return plan


def fuse_qkv(family: str, config: BamConfig, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The family's fused q/k/v tensor (weight or bias) from ours, the inverse of fused_rows:
    [q; k; v] (Phi-3), or per head [q_h; k_h; v_h] (GPT-NeoX)."""
    if family == "gpt_neox":
        heads = config.num_attention_heads
        return torch.stack([t.view(heads, -1, *t.shape[1:]) for t in (q, k, v)], dim=1).reshape(-1, *q.shape[1:])
    return torch.cat([q, k, v])


def _family_piece(tensor: torch.Tensor, param: Param, family: str, head_dim: int, k: int, n: int) -> torch.Tensor:
    """Piece k of n of our `param` in `family`'s checkpoint."""
    if param.role == "ffn_experts":  # our one expert [1, ...] -> the dense MLP's matrix
        tensor = tensor[0]
    if n > 1:  # row blocks, concatenated on import
        tensor = tensor.chunk(n)[k]
    if family in INTERLEAVED_ROPE_FAMILIES and param.local in ROTARY_TENSORS:
        tensor = half_to_interleaved_rope(tensor, head_dim)
    return tensor
