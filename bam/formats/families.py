"""Each Hugging Face family's config as ours and back: what a family's options mean in bam's one model.

`translate_config` reads a dense checkpoint's transformers config (import, bam/formats/hf.py) into
our config fields, refusing by name each feature our model cannot express rather than silently
dropping it. `family_config` is the way back (export, bam/formats/export.py): a family's own config
for our dense config, checked by translating it again, so what each family can express is stated
once, here, by import.

Supported: Llama, Mistral, Qwen2, Qwen3 (sequential block, RMSNorm; Qwen3 with per-head q/k norms),
OLMo 2 (norms on the sublayers' outputs, q/k norms over all heads), Granite (embedding, residual,
attention and logit multipliers), SmolLM3 (NoPE layers), Cohere (parallel block, LayerNorm without
bias, interleaved RoPE, logit scale), Cohere2 (Cohere's block with sliding-window layers, RoPE in
those only), each with plain RoPE or any RoPE scaling transformers implements for it (llama3,
linear, dynamic, yarn, longrope), and sliding-window attention where the family has it (Mistral in
every layer, Qwen2/Qwen3/SmolLM3/Cohere2 in the layers their `layer_types` call sliding).
Gemma, Gemma 2 and Gemma 3 (text): GeGLU, norms x * (1 + w), scaled embeddings, and from Gemma 2
sandwich norms, query scaling, logit soft-capping and sliding layers (see _gemma_fields).
Phi-3 (3.5, Phi-4-mini): fused qkv_proj and gate_up_proj read as our q/k/v and gate_up_proj,
partial rotary embeddings, LongRoPE, a sliding window in every layer. GPT-NeoX (Pythia): LayerNorm
with a bias, a non-gated MLP with biases, q/k/v and output biases, partial rotary embeddings, the
parallel block with a norm per sublayer or the sequential one (_gpt_neox_fields); its interleaved
query_key_value read as our q/k/v (fused_rows).
Recognised but refused, because every checkpoint of the family needs something our model lacks:
Phi (1, 1.5, 2: a bias on the LM head); the error lists each missing feature.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import PreTrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from bam.errors import BamError
from bam.modeling.config import ROPE_TYPES, BamConfig

SEQUENTIAL_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "olmo2", "granite", "smollm3", "phi3",
                       "gemma", "gemma2", "gemma3_text")
GEMMA_FAMILIES = ("gemma", "gemma2", "gemma3_text")
PARALLEL_FAMILIES = ("cohere", "cohere2")
# GPT-NeoX (Pythia) has either block, as its use_parallel_residual says (_gpt_neox_fields).
SUPPORTED_FAMILIES = SEQUENTIAL_FAMILIES + PARALLEL_FAMILIES + ("gpt_neox",)
# Families we know and whose checkpoints we cannot express today (see `_missing_features`): they
# get an error naming every missing feature instead of "model_type not supported".
REFUSED_FAMILIES = ("phi",)
# Families whose attention applies RoPE to the first partial_rotary_factor of each head's dims only.
PARTIAL_ROTARY_FAMILIES = ("phi3", "gpt_neox")


def _refuse(path: Path, family: str, feature: str) -> None:
    raise BamError(f"{path}: {family} checkpoint uses {feature}, which bam's model cannot express")


def _rope_parameters(hf: PreTrainedConfig, path: Path, family: str) -> dict:
    """The checkpoint's RoPE description as transformers standardized it (a bare `rope_theta` and
    a legacy `rope_scaling` already folded in), for our config to compute with transformers' own
    RoPE functions. Nested by layer type (transformers' form: Gemma 3's local and global RoPE), it
    stays so, for the types the layers have, unless those all have the same RoPE."""
    rope = copy.deepcopy(getattr(hf, "rope_parameters", None) or {})
    types = sorted(set(getattr(hf, "layer_types", None) or ()))
    if not any(key in types for key in rope):
        return _checked_rope(rope, path, family)
    missing = [layer_type for layer_type in types if not rope.get(layer_type)]
    if missing:
        raise BamError(f"{path}/config.json: field rope_parameters has no RoPE for layer type {missing[0]!r}")
    by_type = {layer_type: _checked_rope(rope[layer_type], path, family) for layer_type in types}
    first = next(iter(by_type.values()))
    return first if all(other == first for other in by_type.values()) else by_type


def _checked_rope(rope: dict, path: Path, family: str) -> dict:
    """One RoPE description (`rope_parameters`, or one layer type's in Gemma 3), refused by name
    unless our Rope computes it."""
    rope_type = rope.get("rope_type", "default")
    if rope_type not in ROPE_TYPES:
        _refuse(path, family, f"rope_type={rope_type!r} (bam computes {', '.join(ROPE_TYPES)})")
    if rope.get("partial_rotary_factor", 1.0) != 1.0 and family not in PARTIAL_ROTARY_FAMILIES:
        # the other families' attention rotates every dim: their classes cannot run such a config
        _refuse(path, family, f"partial rotary embeddings (partial_rotary_factor={rope['partial_rotary_factor']})")
    if "rope_theta" not in rope:
        raise BamError(f"{path}/config.json: field rope_theta missing")
    return rope


def _missing_features(hf: PreTrainedConfig) -> list[str]:
    """What a Phi (1, 1.5, 2) checkpoint needs that our model lacks: a bias on the LM head, always,
    and LayerNorms with a bias on each head's queries and keys with qk_layernorm. (The rest of it,
    a parallel block with a LayerNorm with bias, a non-gated MLP and attention with biases, partial
    rotary embeddings, our config expresses, as for GPT-NeoX.)"""
    features = ["a bias on the LM head"]
    if getattr(hf, "qk_layernorm", False):
        features.append("qk_layernorm=True (LayerNorms with a bias on each head's queries and keys)")
    return features


def translate_config(hf: PreTrainedConfig, path: Path) -> dict:
    """Our config fields for a dense HF model, or BamError naming the unsupported feature."""
    family = hf.model_type
    if family in REFUSED_FAMILIES:
        _refuse(path, family, "; ".join(_missing_features(hf)))
    if family not in (*GEMMA_FAMILIES, "gpt_neox") and getattr(hf, "hidden_act", "silu") != "silu":
        _refuse(path, family, f"hidden_act={hf.hidden_act!r} (only SwiGLU with silu)")
    if getattr(hf, "mlp_bias", False):
        _refuse(path, family, "mlp_bias=True")
    window_fields = _sliding_window(hf, path, family)
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
        source_model_type=family,  # for `bam export --format source`
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
        if family in GEMMA_FAMILIES:
            fields.update(_gemma_fields(hf, path, family))
        if family == "phi3" and fields["rope_parameters"]["rope_type"] == "longrope":
            # its generate() recomputes the cache on passing the original context (with plain RoPE
            # too, where that changes nothing, so we leave it out there)
            fields.update(cache_reset_length=hf.original_max_position_embeddings)
    elif family == "gpt_neox":
        fields.update(_gpt_neox_fields(hf))
    else:
        fields.update(block="parallel", norm="layernorm", norm_eps=hf.layer_norm_eps,
                      logit_scale=float(hf.logit_scale), qkv_bias=bool(getattr(hf, "attention_bias", False)))
        if fields["qkv_bias"]:
            _refuse(path, family, "attention_bias=True (a bias on o_proj)")
        if family == "cohere2":  # RoPE in the sliding layers only: the global layers have no positions
            fields.update(nope_layers=[i for i, kind in enumerate(hf.layer_types) if kind != "sliding_attention"]
                          or None)
    fields.update(window_fields)
    return fields


def _gpt_neox_fields(hf: PreTrainedConfig) -> dict:
    """GPT-NeoX (Pythia) as transformers' GPTNeoX classes compute it: LayerNorms with a bias; a
    non-gated MLP with biases (dense_h_to_4h, hidden_act, dense_4h_to_h); biases on q, k, v and the
    output projection (attention_bias); RoPE on the first rotary_pct of each head's dims (in
    rope_parameters); with use_parallel_residual x + Attn(Norm1(x)) + FFN(Norm2(x)), else Llama's
    sequential block."""
    parallel = bool(hf.use_parallel_residual)
    return dict(block="parallel" if parallel else "sequential", parallel_ffn_norm=parallel, norm="layernorm",
                norm_bias=True, norm_eps=hf.layer_norm_eps, hidden_act=hf.hidden_act, ffn_gated=False, ffn_bias=True,
                qkv_bias=bool(hf.attention_bias), attn_output_bias=bool(hf.attention_bias))


def _gemma_fields(hf: PreTrainedConfig, path: Path, family: str) -> dict:
    """What Gemma adds to Llama's block, as transformers' Gemma classes compute it.

    Every Gemma: GeGLU (hidden_act, Gemma 2/3's hidden_activation), RMSNorm computing x * (1 + w) in
    fp32 (norm_weight_offset 1), token embeddings times sqrt(hidden_size), held as an fp32 tensor
    (embedding_multiplier: that fp32 value) and cast to the embeddings' dtype in the lookup
    (embedding_multiplier_in_lookup). Gemma 2 and 3: sandwich norms, softmax scale
    query_pre_attn_scalar^-0.5, final logit soft-capping, sliding layers (_sliding_window). Gemma 2
    also caps the attention logits; Gemma 3 normalizes each head's query and key (with the offset)
    and gives its local and global layers their own RoPE (_rope_parameters). Gemma 3's attention
    never reads attn_logit_softcapping (transformers passes it to no attention function), so
    neither do we.
    """
    if getattr(hf, "use_bidirectional_attention", False):
        _refuse(path, family, "use_bidirectional_attention=True (bam's attention is causal)")
    if getattr(hf, "attention_bias", False):
        _refuse(path, family, "attention_bias=True (a bias on o_proj)")
    fields = dict(hidden_act=hf.hidden_act if family == "gemma" else hf.hidden_activation, norm_weight_offset=1.0,
                  embedding_multiplier=torch.tensor(hf.hidden_size**0.5).item(),
                  embedding_multiplier_in_lookup=True)
    if family == "gemma":
        return fields
    fields.update(norm_placement="sandwich", attention_scale=hf.query_pre_attn_scalar**-0.5,
                  final_logit_softcapping=hf.final_logit_softcapping)
    if family == "gemma2":
        fields.update(attn_logit_softcapping=hf.attn_logit_softcapping)
    else:
        fields.update(qk_norm=True)
    return fields


def _sliding_window(hf: PreTrainedConfig, path: Path, family: str) -> dict:
    """Our `sliding_window` and `layer_types` for the checkpoint's attention, as its own class masks it.

    Mistral and Phi-3 slide in every layer whenever their config has a window. The others slide in the layers
    their `layer_types` call sliding (transformers computes it from Qwen2/Qwen3's use_sliding_window
    and max_window_layers, which also null their window when off; SmolLM3's mask slides in those
    layers whatever use_sliding_window says).
    """
    window = getattr(hf, "sliding_window", None)
    if window is None or family not in ("mistral", "phi3", "qwen2", "qwen3", "smollm3", "cohere2", "gemma2",
                                        "gemma3_text"):
        return {}
    if family in ("mistral", "phi3"):
        return dict(sliding_window=window)
    types = getattr(hf, "layer_types", None)
    if types is None or len(types) != hf.num_hidden_layers:
        raise BamError(f"{path}/config.json: field layer_types: expected one entry per layer "
                       f"(num_hidden_layers={hf.num_hidden_layers}) with sliding_window={window}")
    if "sliding_attention" not in types:
        return {}
    return dict(sliding_window=window, layer_types=list(types))


def _nope_layers(hf: PreTrainedConfig, path: Path) -> list[int] | None:
    """SmolLM3's `no_rope_layers` (per layer: 1 applies RoPE, 0 is a NoPE layer) as our indices."""
    flags = hf.no_rope_layers
    if len(flags) < hf.num_hidden_layers:
        raise BamError(f"{path}/config.json: field no_rope_layers has {len(flags)} entries, expected one per "
                       f"layer (num_hidden_layers={hf.num_hidden_layers})")
    return [i for i in range(hf.num_hidden_layers) if not flags[i]] or None


# ---------------------------------------------------------------------------------------------
# Back to the family (bam/formats/export.py): the inverse of translate_config.
# Export translates the config built here back with translate_config and refuses the model unless
# that gives its own config again, so what each family can express is stated once, by import.


def _no_fields(config: BamConfig) -> dict:
    return {}


def _granite_fields(config: BamConfig) -> dict:
    scale = config.attention_scale
    return dict(embedding_multiplier=config.embedding_multiplier, residual_multiplier=config.residual_multiplier,
                attention_multiplier=config.head_dim ** -0.5 if scale is None else scale,  # None: SDPA's default
                logits_scaling=1.0 / config.logit_scale)


def _smollm3_fields(config: BamConfig) -> dict:
    nope = set(config.nope_layers or ())
    return dict(no_rope_layers=[int(i not in nope) for i in range(config.num_hidden_layers)],
                **_layer_types_window(config))


def _layer_types_window(config: BamConfig, switch: bool = True) -> dict:
    """The sliding layers as Qwen2, Qwen3, SmolLM3 and Cohere2 name them (what _sliding_window
    reads), with their use_sliding_window switch on (`switch`: Cohere2 has none)."""
    types = ["sliding_attention" if config.attention_window(i) else "full_attention"
             for i in range(config.num_hidden_layers)]
    if "sliding_attention" not in types:
        return {}
    fields = dict(sliding_window=config.sliding_window, layer_types=types)
    return dict(fields, use_sliding_window=True) if switch else fields


def _mistral_window(config: BamConfig) -> dict:
    """Mistral's window slides in every layer: written only when ours does (else the round trip refuses)."""
    slides = [config.attention_window(i) for i in range(config.num_hidden_layers)]
    return dict(sliding_window=config.sliding_window) if all(slides) else {}


def _phi3_fields(config: BamConfig) -> dict:
    """Phi-3's window slides in every layer (written only when ours does: else the round trip
    refuses); its LongRoPE's original context is a top-level field, which its config copies into
    rope_parameters over any value there."""
    fields = dict(hidden_act=config.hidden_act, **_mistral_window(config))
    original = config.rope_parameters.get("original_max_position_embeddings")
    if config.rope_parameters.get("rope_type") == "longrope" and original is not None:
        fields.update(original_max_position_embeddings=original)
    return fields


def _gpt_neox_export_fields(config: BamConfig) -> dict:
    """GPT-NeoX's own fields, the inverse of _gpt_neox_fields; rotary_pct (partial_rotary_factor)
    written explicitly, as its config defaults it to 0.25."""
    return dict(use_parallel_residual=config.parallel_ffn_norm, attention_bias=config.qkv_bias,
                hidden_act=config.hidden_act, rope_parameters={"partial_rotary_factor": 1.0, **config.rope_parameters})


def _gemma_export_fields(config: BamConfig, family: str) -> dict:
    """Gemma's own fields for our config, the inverse of _gemma_fields. What Gemma always has (the
    norm offset, sqrt(hidden_size) embeddings, sandwich norms, Gemma 3's q/k norms) it cannot switch
    off, so the round trip refuses a model without it. The softmax scale must be the inverse square
    root of an integer (query_pre_attn_scalar). Gemma 3's RoPE is written per layer type always (its
    config reads no other form); import folds equal ones back into one."""
    if family == "gemma":
        return dict(hidden_act=config.hidden_act)
    scale = config.attention_scale
    fields = dict(hidden_activation=config.hidden_act, final_logit_softcapping=config.final_logit_softcapping,
                  query_pre_attn_scalar=config.head_dim if scale is None else round(scale**-2),
                  **(_layer_types_window(config, switch=False)
                     or dict(layer_types=["full_attention"] * config.num_hidden_layers)))
    if family == "gemma2":
        return dict(fields, attn_logit_softcapping=config.attn_logit_softcapping)
    rope_by_type = config.rope_by_type()
    fields["rope_parameters"] = {kind: copy.deepcopy(rope_by_type.get(kind, rope_by_type.get(None)))
                                 for kind in ("sliding_attention", "full_attention")}
    return fields


# The families bam writes, each with its own config fields for our config beyond those every family
# shares (family_config): adding a family's export is one entry here, next to its import above.
FAMILY_EXPORT_FIELDS: dict[str, Callable[[BamConfig], dict]] = {
    "llama": _no_fields,
    "mistral": _mistral_window,
    "qwen2": _layer_types_window,
    "qwen3": _layer_types_window,
    "olmo2": _no_fields,
    "granite": _granite_fields,
    "smollm3": _smollm3_fields,
    "cohere": lambda config: dict(logit_scale=config.logit_scale),
    "cohere2": lambda config: dict(logit_scale=config.logit_scale, **_layer_types_window(config, switch=False)),
    **{family: lambda config, family=family: _gemma_export_fields(config, family) for family in GEMMA_FAMILIES},
    "phi3": _phi3_fields,
    "gpt_neox": _gpt_neox_export_fields,
}


def common_fields(config: BamConfig) -> dict:
    """The fields of our config that every transformers decoder config takes under the same names
    (the family exports here, Mixtral and Qwen2-MoE in bam/formats/export.py)."""
    return dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        max_position_embeddings=config.max_position_embeddings,
        hidden_act="silu",
        rms_norm_eps=config.norm_eps,
        rope_parameters=copy.deepcopy(config.rope_parameters),
        tie_word_embeddings=config.tie_word_embeddings,
        initializer_range=config.initializer_range,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )


def family_config(config: BamConfig, family: str) -> PreTrainedConfig:
    """`family`'s transformers config for our dense `config`: the shared fields its config class
    declares (the norm's epsilon under either name, no sliding window), `head_dim` (every family's
    attention reads it when present, as import does) and the family's own (FAMILY_EXPORT_FIELDS)."""
    config_class = CONFIG_MAPPING[family]
    shared = dict(common_fields(config), layer_norm_eps=config.norm_eps, sliding_window=None,
                  use_sliding_window=False)
    declared = {field.name for field in dataclasses.fields(config_class)}
    fields = {name: value for name, value in shared.items() if name in declared}
    fields.update(head_dim=config.head_dim, architectures=[MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[family]],
                  **FAMILY_EXPORT_FIELDS[family](config))
    return config_class(**fields)
