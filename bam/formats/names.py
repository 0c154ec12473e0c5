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

# Llama and every family that kept its names: Mistral, Qwen2, Cohere, Granite, SmolLM3, and on
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
# Each family's map; a family not listed names its tensors as Llama does.
FAMILY_NAMES = {"qwen3": QWEN3_NAMES, "olmo2": OLMO2_NAMES}
DENSE_MLP = {
    "ffn.experts.gate_up_proj": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "ffn.experts.down_proj": ("mlp.down_proj.weight",),
}
MOE_MLP = {
    "ffn.experts.gate_up_proj": "mlp.experts.gate_up_proj",
    "ffn.experts.down_proj": "mlp.experts.down_proj",
    "ffn.router.weight": "mlp.gate.weight",
}


def layer_prefix(param: Param) -> str:
    return "" if param.layer is None else f"model.layers.{param.layer}."


def hf_name(param: Param, names: dict[str, str] = LLAMA_NAMES) -> str:
    """`param`'s full name in a family that names it by `names`."""
    return layer_prefix(param) + names[param.local]
