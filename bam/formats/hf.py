"""Import dense Hugging Face checkpoints as our model: a config translation and a tensor-name map.

An imported directory is read lazily, tensor by tensor, exactly like one of ours (a `ModelSource`),
so `bam mix`, `bam train` and `load_model` accept it directly. Each family's features that our
model cannot express are refused by name rather than silently dropped.

Supported: Llama, Mistral, Qwen2, Qwen3 (sequential block, RMSNorm; Qwen3 with per-head q/k norms),
OLMo 2 (norms on the sublayers' outputs, q/k norms over all heads), Granite (embedding, residual,
attention and logit multipliers), SmolLM3 (NoPE layers), Cohere (parallel block, LayerNorm without
bias, interleaved RoPE, logit scale), each with plain RoPE or any RoPE scaling transformers
implements for it (llama3, linear, dynamic, yarn, longrope).
Recognised but refused, because every checkpoint of these families needs something our model lacks:
GPT-NeoX and Phi (a non-gated GELU MLP, LayerNorm and projection biases, partial rotary
embeddings); the error lists each missing feature.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import AutoConfig, PreTrainedConfig

from bam.formats.names import DENSE_MLP, FAMILY_NAMES, LLAMA_NAMES, hf_name, layer_prefix
from bam.formats.source import ModelSource
from bam.io.tensor_files import SafetensorsFiles
from bam.modeling.config import ROPE_TYPES, config_from_dict
from bam.modeling.layout import Param, parameter_table
from bam.errors import BamError

SEQUENTIAL_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "olmo2", "granite", "smollm3")
PARALLEL_FAMILIES = ("cohere",)
SUPPORTED_FAMILIES = SEQUENTIAL_FAMILIES + PARALLEL_FAMILIES
# Families we know and whose checkpoints we cannot express today (see `_missing_features`): they
# get an error naming every missing feature instead of "model_type not supported".
REFUSED_FAMILIES = ("gpt_neox", "phi")


def _refuse(path: Path, family: str, feature: str) -> None:
    raise BamError(f"{path}: {family} checkpoint uses {feature}, which bam's model cannot express")


def _rope_parameters(hf: PreTrainedConfig, path: Path, family: str) -> dict:
    """The checkpoint's RoPE description as transformers standardized it (a bare `rope_theta` and
    a legacy `rope_scaling` already folded in), for our config to compute with transformers' own
    RoPE functions."""
    rope = copy.deepcopy(getattr(hf, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", "default")
    if rope_type not in ROPE_TYPES:
        _refuse(path, family, f"rope_type={rope_type!r} (bam computes {', '.join(ROPE_TYPES)})")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        _refuse(path, family, f"partial rotary embeddings (partial_rotary_factor={rope['partial_rotary_factor']})")
    if "rope_theta" not in rope:
        raise BamError(f"{path}/config.json: field rope_theta missing")
    return rope


def _missing_features(hf: PreTrainedConfig) -> list[str]:
    """What a GPT-NeoX or Phi checkpoint needs that our block (SwiGLU, bias-free norms) lacks.

    Both families always have a non-gated MLP (two matrices with biases, GELU by default),
    LayerNorms with a bias, and a bias on the attention output; the rest depends on the config.
    """
    rope = getattr(hf, "rope_parameters", None) or {}
    partial = rope.get("partial_rotary_factor", 1.0)
    features = [f"a non-gated MLP with biases and hidden_act={hf.hidden_act!r} (bam has SwiGLU only)",
                "LayerNorm with a bias"]
    if hf.model_type == "gpt_neox":
        if getattr(hf, "attention_bias", True):
            features.append("biases on the attention projections, the output projection included")
        if getattr(hf, "use_parallel_residual", True):
            features.append("a parallel block with two norms (bam's parallel block shares one)")
    else:  # phi
        features.append("biases on the attention output projection and the LM head")
        if getattr(hf, "qk_layernorm", False):
            features.append("qk_layernorm=True")
    if partial != 1.0:
        features.append(f"partial rotary embeddings (partial_rotary_factor={partial})")
    return features


def translate_config(hf: PreTrainedConfig, path: Path) -> dict:
    """Our config fields for a dense HF model, or BamError naming the unsupported feature."""
    family = hf.model_type
    if family in REFUSED_FAMILIES:
        _refuse(path, family, "; ".join(_missing_features(hf)))
    if getattr(hf, "hidden_act", "silu") != "silu":
        _refuse(path, family, f"hidden_act={hf.hidden_act!r} (only SwiGLU with silu)")
    if getattr(hf, "mlp_bias", False):
        _refuse(path, family, "mlp_bias=True")
    window = getattr(hf, "sliding_window", None)
    if window is not None and window < hf.max_position_embeddings and (
            family in ("mistral", "qwen2", "qwen3") and getattr(hf, "use_sliding_window", True)
            # SmolLM3's mask slides in the layers its layer_types call sliding (use_sliding_window
            # makes the NoPE layers such), whatever use_sliding_window says
            or family == "smollm3" and "sliding_attention" in (hf.layer_types or ())):
        _refuse(path, family, f"sliding-window attention (sliding_window={window})")
    if family in ("llama", "qwen3", "olmo2", "granite", "smollm3") and getattr(hf, "attention_bias", False):
        _refuse(path, family, "attention_bias=True (a bias on o_proj)")
    if family == "cohere" and getattr(hf, "use_qk_norm", False):
        _refuse(path, family, "use_qk_norm=True")

    heads = hf.num_attention_heads
    fields = dict(
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        intermediate_size=hf.intermediate_size,
        num_hidden_layers=hf.num_hidden_layers,
        num_attention_heads=heads,
        num_key_value_heads=getattr(hf, "num_key_value_heads", None) or heads,
        head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // heads,
        max_position_embeddings=hf.max_position_embeddings,
        rope_parameters=_rope_parameters(hf, path, family),
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        bos_token_id=getattr(hf, "bos_token_id", None),
        eos_token_id=getattr(hf, "eos_token_id", None),
        pad_token_id=getattr(hf, "pad_token_id", None),
        initializer_range=getattr(hf, "initializer_range", 0.02),
    )
    if family in SEQUENTIAL_FAMILIES:
        fields.update(block="sequential", norm="rmsnorm", norm_eps=hf.rms_norm_eps, qkv_bias=family == "qwen2",
                      qk_norm=family in ("qwen3", "olmo2"))
        if family == "olmo2":
            fields.update(norm_placement="post", qk_norm_scope="all")
        if family == "granite":
            fields.update(embedding_multiplier=float(hf.embedding_multiplier),
                          residual_multiplier=float(hf.residual_multiplier),
                          attention_scale=float(hf.attention_multiplier),
                          # Granite divides the logits by logits_scaling; the reciprocal is exact for
                          # a power of two (released checkpoints: 8, 16), else within an ulp
                          logit_scale=1.0 / hf.logits_scaling)
        if family == "smollm3":
            fields.update(nope_layers=_nope_layers(hf, path))
    else:
        fields.update(block="parallel", norm="layernorm", norm_eps=hf.layer_norm_eps,
                      logit_scale=float(hf.logit_scale), qkv_bias=bool(getattr(hf, "attention_bias", False)))
        if fields["qkv_bias"]:
            _refuse(path, family, "attention_bias=True (a bias on o_proj)")
    return fields


def _nope_layers(hf: PreTrainedConfig, path: Path) -> list[int] | None:
    """SmolLM3's `no_rope_layers` (per layer: 1 applies RoPE, 0 is a NoPE layer) as our indices."""
    flags = hf.no_rope_layers
    if len(flags) < hf.num_hidden_layers:
        raise BamError(f"{path}/config.json: field no_rope_layers has {len(flags)} entries, expected one per "
                       f"layer (num_hidden_layers={hf.num_hidden_layers})")
    return [i for i in range(hf.num_hidden_layers) if not flags[i]] or None


def interleaved_to_half_rope(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Reorder each head's rows so interleaved-pair RoPE (Cohere) becomes rotate-half RoPE (ours).

    Interleaved RoPE rotates dims (2i, 2i+1) by angle i; rotate-half rotates (i, i + Dh/2). Moving
    even dims to the first half and odd dims to the second, in both q and k, leaves every q.k
    product unchanged, so attention is exactly the same function.
    """
    perm = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])
    rows = weight.view(-1, head_dim, *weight.shape[1:])
    return rows[:, perm].reshape(weight.shape)


# Cohere's interleaved RoPE rotates the rows of these tensors (see interleaved_to_half_rope).
ROTARY_TENSORS = ("attn.q_proj.weight", "attn.q_proj.bias", "attn.k_proj.weight", "attn.k_proj.bias")


def hf_tensor_names(param: Param, family: str) -> tuple[str, ...]:
    """The checkpoint tensors that make our `param`, in order (bam/formats/names.py)."""
    if param.local in DENSE_MLP:
        return tuple(layer_prefix(param) + name for name in DENSE_MLP[param.local])
    return (hf_name(param, FAMILY_NAMES.get(family, LLAMA_NAMES)),)


def open_hf_model(path: Path, config_dict: dict, tokenizer_dir: Path | None) -> ModelSource:
    family = config_dict.get("model_type")
    if family not in SUPPORTED_FAMILIES + REFUSED_FAMILIES:
        raise BamError(f"{path}/config.json: model_type={family!r} is not supported "
                       f"(expected bam or one of {', '.join(SUPPORTED_FAMILIES)})")
    try:
        hf_config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (ValueError, TypeError, OSError) as err:
        raise BamError(f"{path}/config.json: not a valid {family} config ({err})")
    fields = translate_config(hf_config, path)
    config = config_from_dict({"model_type": "bam", **fields}, path / "config.json")
    files = SafetensorsFiles(path)
    available = set(files.names())
    table = parameter_table(config)

    def read_parts(name: str) -> Iterator[torch.Tensor]:
        """Our tensor `name` as the checkpoint's pieces, read one at a time: row blocks that
        concatenate into it (a dense MLP's gate and up matrices are our one expert's gate_up_proj)."""
        param = table[name]
        for hf_name_ in hf_tensor_names(param, family):
            if hf_name_ not in available:
                raise BamError(f"{path}: tensor {hf_name_} missing from the {family} checkpoint")
            tensor = files.get(hf_name_)
            if family == "cohere" and param.local in ROTARY_TENSORS:
                tensor = interleaved_to_half_rope(tensor, config.head_dim)
            yield tensor

    def read_tensor(name: str) -> torch.Tensor:
        pieces = list(read_parts(name))
        tensor = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        # A dense checkpoint's MLP is our one expert: [2F, D] -> [1, 2F, D], [D, F] -> [1, D, F]
        return tensor[None] if table[name].role == "ffn_experts" else tensor

    return ModelSource(path, family, config, list(table), read_tensor, tokenizer_dir, read_parts=read_parts)
