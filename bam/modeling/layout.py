"""The parameter layout of a BamConfig: every tensor's name and shape.

This is the one place the layout is written out as a table: code that needs the tensors of a
model it has not built (mixing, adding an expert, export) reads them here rather than spelling
the names out again. The arrangement inside each tensor (expert-major stacking, the fused
gate/up projection) is the one bam/modeling/config.py describes.
"""

from __future__ import annotations

from bam.modeling.config import BamConfig


def parameter_shapes(config: BamConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every stored parameter of `BamForCausalLM(config)`, in module order, the
    tied lm_head left out: the names and order of its `named_parameters()`.

    Computed from the config (the layout bam/modeling/config.py describes) rather than by building the
    model on the meta device, so mixing never imports the model and transformers' modeling code
    (seconds of a `bam mix` run). tests/test_mix.py checks it against the model for every variant.
    """
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    q_width = config.n_attn_experts * config.num_attention_heads * config.head_dim
    kv_width = config.n_kv_experts * config.num_key_value_heads * config.head_dim
    n_ffn = config.n_ffn_experts
    shapes = {"model.embed_tokens.weight": (v, d)}
    for i in range(config.num_hidden_layers):
        layer = f"model.layers.{i}."
        shapes[layer + "input_norm.weight"] = (d,)
        if config.block == "sequential":
            shapes[layer + "post_attention_norm.weight"] = (d,)
        for proj, width in (("q", q_width), ("k", kv_width), ("v", kv_width)):
            shapes[layer + f"attn.{proj}_proj.weight"] = (width, d)
            if config.qkv_bias:
                shapes[layer + f"attn.{proj}_proj.bias"] = (width,)
        shapes[layer + "attn.o_proj.weight"] = (d, q_width)
        if config.n_attn_experts > 1:
            shapes[layer + "attn.router.weight"] = (config.n_attn_experts, d)
        if config.ffn_router == "nexus":
            m, h = config.nexus_embed_dim, config.nexus_hidden_dim
            shapes[layer + "ffn.router.domain_embeddings"] = (n_ffn, m)
            shapes[layer + "ffn.router.gate_up_proj"] = (2 * h, m)
            shapes[layer + "ffn.router.down_proj"] = (d, h)
        elif n_ffn > 1:  # one expert takes every token: no linear router (bam/modeling/moe.py)
            shapes[layer + "ffn.router.weight"] = (n_ffn, d)
        shapes[layer + "ffn.experts.gate_up_proj"] = (n_ffn, 2 * f, d)
        shapes[layer + "ffn.experts.down_proj"] = (n_ffn, d, f)
        if config.ffn_shared_expert:
            shapes[layer + "ffn.shared_expert.gate_up_proj"] = (2 * f, d)
            shapes[layer + "ffn.shared_expert.down_proj"] = (d, f)
    shapes["model.norm.weight"] = (d,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, d)
    return shapes
