"""How Hugging Face families name the tensors of bam's parameter layout: one conversion map per
naming scheme, read by import (bam/formats/hf.py) and export (bam/formats/export.py) alike.

Keys are a tensor's name inside its layer (`Param.local`, or the full name outside layers, see
bam/modeling/layout.py); values are the family's name in the same position. The FFN is the one
part that is not a rename: dense checkpoints store our one-expert `ffn.experts.gate_up_proj`
[1, 2F, D] as two matrices (gate rows first, then up) and `down_proj` [1, D, F] as one, which
`DENSE_MLP` names; MoE exports store the experts as they are (`MOE_MLP`).
"""

from __future__ import annotations

from bam.modeling.layout import Param

# Llama and every family that kept its names: Mistral, Qwen2, Cohere, Cohere2, Granite, SmolLM3, and on
# export Mixtral and Qwen2-MoE (their attention, norms and embeddings).
LLAMA_NAMES = {
    "model.embed_tokens.weight": "model.embed_tokens.weight",
    "model.norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
    "input_norm.weight": "input_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    **{f"attn.{proj}_proj.{kind}": f"self_attn.{proj}_proj.{kind}"
       for proj in ("q", "k", "v", "o") for kind in ("weight", "bias")},
}
# Qwen3: Llama's names, plus the per-head query and key norms (our `qk_norm`).
QWEN3_NAMES = {
    **LLAMA_NAMES,
    "attn.q_norm.weight": "self_attn.q_norm.weight",
    "attn.k_norm.weight": "self_attn.k_norm.weight",
}
# OLMo 2: Qwen3's q/k norm names (over all heads: our qk_norm_scope='all'), and norms on the
# sublayers' outputs instead of their inputs (our norm_placement='post').
OLMO2_NAMES = {
    **{ours: theirs for ours, theirs in QWEN3_NAMES.items()
       if ours not in ("input_norm.weight", "post_attention_norm.weight")},
    "attn_output_norm.weight": "post_attention_layernorm.weight",
    "ffn_output_norm.weight": "post_feedforward_layernorm.weight",
}
# Phi-3 (3.5, Phi-4-mini): Llama's names for embeddings, norms and o_proj; its fused MLP input
# `gate_up_proj` (gate rows first) is our one expert's as it is, and q, k, v are blocks of one fused
# `qkv_proj` (FUSED_NAMES).
PHI3_NAMES = {
    **{ours: theirs for ours, theirs in LLAMA_NAMES.items() if not ours.startswith(("attn.q_", "attn.k_", "attn.v_"))},
    "ffn.experts.gate_up_proj": "mlp.gate_up_proj.weight",
    "ffn.experts.down_proj": "mlp.down_proj.weight",
}
# Gemma 2: Llama's names, and the sandwich norms (our norm_placement='sandwich'). Its
# post_attention_layernorm is on the attention's output (our attn_output_norm, as in OLMo 2) and the
# FFN's input norm is pre_feedforward_layernorm (our post_attention_norm, Llama's name for it).
# (Gemma 1 names its tensors as Llama does.)
GEMMA2_NAMES = {
    **LLAMA_NAMES,
    "attn_output_norm.weight": "post_attention_layernorm.weight",
    "post_attention_norm.weight": "pre_feedforward_layernorm.weight",
    "ffn_output_norm.weight": "post_feedforward_layernorm.weight",
}
# Gemma 3: Gemma 2's names, plus the per-head query and key norms (Qwen3's names).
GEMMA3_NAMES = {
    **GEMMA2_NAMES,
    "attn.q_norm.weight": "self_attn.q_norm.weight",
    "attn.k_norm.weight": "self_attn.k_norm.weight",
}
# GPT-NeoX (Pythia): its own names, outside layers too; LayerNorm biases; the one norm before its FFN
# (post_attention_layernorm) is our ffn_input_norm in its parallel block (use_parallel_residual) and
# our post_attention_norm in its sequential one; q, k, v are interleaved in one query_key_value
# (FUSED_NAMES); its non-gated MLP is our one expert's up_proj and down_proj, with their biases.
GPT_NEOX_NAMES = {
    "model.embed_tokens.weight": "gpt_neox.embed_in.weight",
    "model.norm.weight": "gpt_neox.final_layer_norm.weight",
    "model.norm.bias": "gpt_neox.final_layer_norm.bias",
    "lm_head.weight": "lm_head.weight",  # "embed_out.weight" in its checkpoints: CHECKPOINT_ALIASES
    **{f"{ours}.{kind}": f"{theirs}.{kind}" for kind in ("weight", "bias")
       for ours, theirs in (("input_norm", "input_layernorm"), ("post_attention_norm", "post_attention_layernorm"),
                            ("ffn_input_norm", "post_attention_layernorm"), ("attn.o_proj", "attention.dense"))},
    "ffn.experts.up_proj": "mlp.dense_h_to_4h.weight",
    "ffn.experts.up_proj_bias": "mlp.dense_h_to_4h.bias",
    "ffn.experts.down_proj": "mlp.dense_4h_to_h.weight",
    "ffn.experts.down_proj_bias": "mlp.dense_4h_to_h.bias",
}
# Each family's map; a family not listed names its tensors as Llama does.
FAMILY_NAMES = {"qwen3": QWEN3_NAMES, "olmo2": OLMO2_NAMES, "phi3": PHI3_NAMES, "gemma2": GEMMA2_NAMES,
                "gemma3_text": GEMMA3_NAMES, "gpt_neox": GPT_NEOX_NAMES}
# Checkpoint names transformers renames on load (its conversion_mapping), tried when a name above is
# missing: GPT-NeoX's LM head is `embed_out` in its checkpoints (Pythia's, and what transformers'
# save_pretrained writes) and `lm_head` in transformers' model, which bam's export writes.
CHECKPOINT_ALIASES = {"lm_head.weight": ("embed_out.weight",)}
# Tensors a family stores fused: our name -> (their tensor, which of its q, k, v blocks: 0, 1, 2).
# Where each block's rows sit in it is the family's layout (bam/formats/hf.py fused_rows).
FUSED_NAMES = {
    "phi3": {f"attn.{proj}_proj.weight": ("self_attn.qkv_proj.weight", block) for block, proj in enumerate("qkv")},
    "gpt_neox": {f"attn.{proj}_proj.{kind}": (f"attention.query_key_value.{kind}", block)
                 for block, proj in enumerate("qkv") for kind in ("weight", "bias")},
}
DENSE_MLP = {
    "ffn.experts.gate_up_proj": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "ffn.experts.down_proj": ("mlp.down_proj.weight",),
}
MOE_MLP = {
    "ffn.experts.gate_up_proj": "mlp.experts.gate_up_proj",
    "ffn.experts.down_proj": "mlp.experts.down_proj",
    "ffn.router.weight": "mlp.gate.weight",
}


# Where a family's layers are, when not under "model.layers." as in Llama.
LAYERS = {"gpt_neox": "gpt_neox.layers."}


def layer_prefix(param: Param, family: str | None = None) -> str:
    return "" if param.layer is None else f"{LAYERS.get(family, 'model.layers.')}{param.layer}."


def hf_name(param: Param, names: dict[str, str] = LLAMA_NAMES, family: str | None = None) -> str:
    """`param`'s full name in a family that names it by `names` (and puts its layers where LAYERS says)."""
    return layer_prefix(param, family) + names[param.local]
