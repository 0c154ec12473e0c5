"""What a model costs, from its config alone: parameters, FLOPs per token, KV-cache bytes (METHOD.md 5).

Notation: d = hidden_size, L = layers, V = vocab, H / H_kv = query / key-value heads of one attention
expert, Dh = head_dim, Na = attention experts, Nkv = K/V projections per layer (1 with kv_shared,
else Na), E = routed FFN experts, k = ffn_top_k, d_ff = intermediate_size, m / h' = the Nexus
domain-embedding and projection widths. q = H*Dh and kv = H_kv*Dh are
one expert's query and key/value widths; with multi-head attention and Dh = d/H both equal d, which
is how METHOD.md writes the formulas.
Adapters (METHOD.md 7; bam/modeling/adapters.py): r = lora_rank; a targeted projection p maps I_p to
O_p (LoRA on the fused gate/up is two projections, gate and up). With adapter experts
(config.adapter_experts) every expert is the seed plus an adapter of its own, and the seed's weights
are stored and applied once: Cq = Ckv = 1 copies of the q/o and k/v weights (else Cq = Na and
Ckv = Nkv) and kf = 1 FFN computed per token (else kf = k). Na' = the attentions computed: Na when
attention experts mix their outputs (BAM), 1 when they mix their parameters (attn_mixing=
'parameters', MoLoRA/MoV: one attention of gate-mixed projections). n_p = the experts whose update a
token computes on projection p: 1 for one adapter on a dense model; with adapter experts Na on q/o
and Nkv on k/v (either mixing: mixing parameters applies every expert's A, then the gated sum through
the B's, the same count), k on the FFN's (a token's top-k experts).

Parameters (counted from the parameter layout table, bam/modeling/layout.py)
- total: every stored parameter; a tied LM head is the embedding and is counted once. Adapter
  experts hold the seed's weights once and one adapter per expert.
- active (per token): the parameters a token touches. Of the E FFN experts only the k it is routed
  to count; every attention expert counts, because soft routing runs all of them (the top-k
  attention ablation computes all of them too before zeroing gates; mixing parameters puts every
  expert's q/k/v/o into the mixed ones). Embeddings, LM head, norms and
  routers count, so a dense model's active == total (the convention behind Mixtral's "12.9B active").
  An always-on shared expert is active for every token. A Nexus router counts its fixed domain
  embeddings (E*m, stored but never trained) and its projection (2h'*m + d*h'). With adapter
  experts every token uses the seed's weights in full and every attention adapter, and of the FFN
  adapters only its top-k experts'. One adapter on a dense model is active in full.

FLOPs per token, inference, 2 per multiply-accumulate; per layer (METHOD.md section 5, whose
formulas these are for full experts mixing outputs: Cq = Na, Ckv = Nkv, Na' = Na, kf = k):
    attention router     2 * Na * d                   only when Na > 1 (BTX has none)
    Q, K, V projections  2 * d * (Cq*q + 2*Ckv*kv)    = 6Nd^2 with KV experts, 2Nd^2 + 4d^2 shared
    scores and mixing    2 * Na' * n_ctx * q          METHOD's 2N*n_ctx*d: one count per query width
    output projections   2 * Cq * q * d               = 2Nd^2
    FFN router           2 * E * d                    linear: only when E > 1 (METHOD writes 2Nd);
                                                      nexus: the scores h . e_i, always
    FFN                  2 * 3 * kf * d * d_ff        SwiGLU: gate, up and down matrices (2 * 2 * ...
                                                      for a non-gated MLP, ffn_gated=False)
    shared expert        2 * 3 * d * d_ff             only with ffn_shared_expert
    adapters             sum_p n_p * 2*r*(I_p + O_p)  LoRA: A then B, over the targeted projections;
                                                      (IA)3: 0, its vectors scale elementwise
plus the LM head, 2 * d * V, once per token. Full experts mixing parameters compute every expert's
projections (Cq = Na) and one attention (Na' = 1). The Nexus projection e_i = W2 SwiGLU(W1 d_i) does not
depend on the token: it costs `nexus_projection_flops` per layer once per forward pass (and could
be cached at inference), so it is not in the per-token count. Not counted (all O(d) per layer,
O(Na*d) for the gates): norms, RoPE, softmax, the activation, gating products (mixing parameters:
the gated sums of the experts' projections or (IA)3 vectors), (IA)3's elementwise scaling, biases,
the embedding lookup. These are the FLOPs the method needs: adapter experts' implementation also
multiplies zero blocks (block-diagonal updates, bam/modeling/adapters.py), 2 r O Na (Na - 1) for each
of q/k/v mixing outputs and 2 r q Na (Na - 1) for o, which are left out. Training = 3x inference
(forward + backward).

KV-cache bytes per token: L * 2 (K and V) * Nc * H_kv * Dh * dtype_bytes, Nc = config.n_kv_caches:
Nkv K/V sets when attention experts mix outputs, 1 when they mix parameters (keys and values are
mixed before they are cached). A sliding-window layer's cache
(transformers' sliding-window cache layer, which DynamicCache(config=...) makes for it) keeps only
its last sliding_window - 1 positions, so with such layers the bytes per token of an n_ctx-token
context are kv_cache_bytes(config, n_ctx) / n_ctx: each sliding layer counts min(n_ctx, window - 1).
"""

from __future__ import annotations

from bam.modeling.config import BamConfig, full_experts_config
from bam.modeling.layout import Param, adapted_projections, layer_parameters, parameters

TRAINING_FLOPS_FACTOR = 3  # backward costs about twice the forward


def _query_width(config: BamConfig) -> int:
    return config.num_attention_heads * config.head_dim


def _kv_width(config: BamConfig) -> int:
    return config.num_key_value_heads * config.head_dim


# ---------------------------------------------------------------------------------------------
# Parameters


# Which part of a layer's parameter count each role of the layout (bam/modeling/layout.py) is.
_COST_PART = {"norm": "norms", "attn_query": "attention", "attn_key_value": "attention", "attn_output": "attention",
              "attn_router": "attn_router", "ffn_router": "ffn_router", "nexus_projection": "ffn_router",
              "domain_embeddings": "ffn_router", "ffn_experts": "ffn", "shared_expert": "shared_expert",
              "adapter": "adapter"}


def _per_routed_ffn_expert(config: BamConfig, param: Param) -> bool:
    """Whether `param` stacks one slice per routed FFN expert, of which a token uses its top-k: the
    experts' weights, or with adapter experts their FFN adapters (the seed's FFN is one copy, used
    by every token)."""
    if config.adapter_experts:
        return param.role == "adapter" and param.local.startswith("ffn.")
    return param.role == "ffn_experts"


def layer_params(config: BamConfig, active: bool = False) -> dict[str, int]:
    """Parameters of one layer by part, counted from the layout table; `active` counts only the
    top-k of the routed FFN experts (of their adapters, with adapter experts)."""
    parts = dict.fromkeys(("norms", "attention", "attn_router", "ffn_router", "ffn", "shared_expert", "adapter"), 0)
    for param in layer_parameters(config, 0):
        n = param.numel()
        if active and _per_routed_ffn_expert(config, param):
            n = n // config.n_ffn_experts * config.ffn_top_k
        parts[_COST_PART[param.role]] += n
    return parts


def embedding_params(config: BamConfig) -> int:
    """Embedding, LM head (unless tied to the embedding) and the final norm."""
    return sum(param.numel() for param in parameters(config) if param.layer is None)


def params_total(config: BamConfig) -> int:
    return embedding_params(config) + config.num_hidden_layers * sum(layer_params(config).values())


def params_active(config: BamConfig) -> int:
    return embedding_params(config) + config.num_hidden_layers * sum(layer_params(config, active=True).values())


# ---------------------------------------------------------------------------------------------
# FLOPs and KV cache


def layer_flops(config: BamConfig, n_ctx: int) -> dict[str, int]:
    """Inference FLOPs of one layer for one token attending to n_ctx positions, by term."""
    d, na = config.hidden_size, config.n_attn_experts
    q, kv = _query_width(config), _kv_width(config)
    # the weight copies applied (one seed's with adapter experts) and the attentions computed
    cq, ckv = config.n_weight_copies(na), config.n_weight_copies(config.n_kv_experts)
    attentions = 1 if config.attn_mixing == "parameters" else na
    e = config.n_ffn_experts
    has_ffn_router = e > 1 or config.ffn_router == "nexus"
    ffn_passes = 1 if config.adapter_experts else config.ffn_top_k  # the seed's FFN once for all k experts
    matrices = 3 if config.ffn_gated else 2  # gate, up, down; GPT-NeoX's non-gated MLP has no gate
    return {
        "attn_router": 2 * na * d if na > 1 else 0,
        "qkv_projections": 2 * d * (cq * q + 2 * ckv * kv),
        "attention_scores_and_mixing": 2 * attentions * n_ctx * q,
        "output_projections": 2 * cq * q * d,
        "ffn_router": 2 * e * d if has_ffn_router else 0,
        "ffn": 2 * matrices * ffn_passes * d * config.intermediate_size,
        "shared_expert": 2 * matrices * d * config.intermediate_size if config.ffn_shared_expert else 0,
        "adapters": adapter_flops(config),
    }


def adapter_flops(config: BamConfig) -> int:
    """One layer's LoRA updates for one token: A then B, 2*r*(I + O) per projection (each piece of
    the fused gate/up) and per expert whose update the token computes. (IA)³ scales elementwise: 0."""
    if config.adapter != "lora":
        return 0
    total = 0
    for sublayer in ("attn", "ffn"):
        for name, i, o, pieces in adapted_projections(config, sublayer):
            if not config.adapter_experts:
                experts = 1
            elif sublayer == "attn":  # soft routing: every expert's (mixing parameters too: all A's, then B's)
                experts = config.projection_experts(name)
            else:
                experts = config.ffn_top_k
            total += experts * pieces * 2 * config.lora_rank * (i + o)
    return total


def nexus_projection_flops(config: BamConfig) -> int:
    """FLOPs of one layer's e_i = W2 SwiGLU(W1 d_i) for all E experts: once per forward pass, not per token."""
    if config.ffn_router != "nexus":
        return 0
    e, m, h = config.n_ffn_experts, config.nexus_embed_dim, config.nexus_hidden_dim
    return 2 * e * m * 2 * h + 2 * e * h * config.hidden_size


def flops_per_token(config: BamConfig, n_ctx: int, training: bool = False) -> int:
    """All layers plus the LM head; training multiplies by 3."""
    inference = config.num_hidden_layers * sum(layer_flops(config, n_ctx).values())
    inference += 2 * config.hidden_size * config.vocab_size  # LM head
    return inference * (TRAINING_FLOPS_FACTOR if training else 1)


def kv_cache_bytes_per_token(config: BamConfig, dtype_bytes: int = 2, n_ctx: int | None = None) -> int | float:
    """Per token of context; with sliding-window layers it depends on the context, so `n_ctx` is needed."""
    if not any(config.attention_window(i) for i in range(config.num_hidden_layers)):
        return config.num_hidden_layers * 2 * config.n_kv_caches * _kv_width(config) * dtype_bytes
    if n_ctx is None:
        raise ValueError("kv_cache_bytes_per_token: a model with sliding-window layers needs n_ctx")
    return kv_cache_bytes(config, n_ctx, dtype_bytes) / n_ctx


def kv_cache_bytes(config: BamConfig, n_ctx: int, dtype_bytes: int = 2) -> int:
    """The KV cache of one sequence of n_ctx tokens, as transformers' DynamicCache(config=...) keeps it."""
    positions = 0
    for i in range(config.num_hidden_layers):
        window = config.attention_window(i)
        # A window of 1 keeps everything: the sliding cache layer's slice [-(window - 1):] is [0:].
        positions += n_ctx if window is None or window == 1 else min(n_ctx, window - 1)
    return positions * 2 * config.n_kv_caches * _kv_width(config) * dtype_bytes


def kv_positions_kept(budget: int | float, n_prompt: int) -> int:
    """Prompt positions each K/V head keeps under a SnapKV budget (bam/modeling/kv_compression.py):
    `budget` tokens (int), or the fraction `budget` (float) of the prompt rounded down; at most the prompt."""
    return min(int(budget * n_prompt) if isinstance(budget, float) else budget, n_prompt)


def compressed_kv_cache_bytes(config: BamConfig, n_prompt: int, budget: int | float, n_new: int = 0,
                              dtype_bytes: int = 2) -> int:
    """The KV cache of one sequence whose n_prompt-token prompt SnapKV compressed to `budget`, after
    n_new more tokens: every K/V head holds kv_positions_kept + n_new positions (with split='gate',
    that many per K/V expert on average: the total is the same). Full-attention models only, as
    the compression itself."""
    if any(config.attention_window(i) for i in range(config.num_hidden_layers)):
        raise ValueError("compressed_kv_cache_bytes: SnapKV compression supports full-attention models only")
    return kv_cache_bytes(config, kv_positions_kept(budget, n_prompt) + n_new, dtype_bytes)


# ---------------------------------------------------------------------------------------------
# Summary for `bam inspect`


def layout(config: BamConfig) -> str:
    """A short name for the expert layout (the Nexus ones are `bam mix`'s method names)."""
    attention = ("bam-shared" if config.kv_shared else "bam") if config.n_attn_experts > 1 else None
    if config.ffn_router == "nexus":
        return f"nexus-{attention}" if attention else "nexus"
    name = attention or ("dense" if config.n_ffn_experts == 1 else "ffn-moe")
    if config.adapter_experts:  # the study's method names: lora-bam, ia3-bam-shared, ...
        name = f"{config.adapter}-{name}"
    return f"{name}+shared-expert" if config.ffn_shared_expert else name


def costs(config: BamConfig, n_ctx: int = 256, dtype_bytes: int = 2) -> dict[str, int | float]:
    """The four numbers METHOD.md 5 reports: parameters held and active, inference FLOPs and KV-cache
    bytes per token (at n_ctx)."""
    return {
        "params_total": params_total(config),
        "params_active": params_active(config),
        "flops_per_token": flops_per_token(config, n_ctx),
        "kv_cache_bytes_per_token": kv_cache_bytes_per_token(config, dtype_bytes, n_ctx),
    }


def adapter_vs_full_experts(config: BamConfig, n_ctx: int = 256, dtype_bytes: int = 2) -> dict[str, dict]:
    """An adapter-expert config's costs beside its full-expert twin's (full_experts_config), for
    "adapter experts vs full experts": {"adapter_experts": costs, "full_experts": costs}."""
    return {"adapter_experts": costs(config, n_ctx, dtype_bytes),
            "full_experts": costs(full_experts_config(config), n_ctx, dtype_bytes)}


def summarize(config: BamConfig, n_ctx: int = 256, dtype_bytes: int = 2) -> dict:
    """Costs and the block/expert configuration, as plain JSON-able values; for adapter experts also
    their full-expert twin's costs (`full_experts`, else None)."""
    return {
        **costs(config, n_ctx, dtype_bytes),
        "params_adapter": config.num_hidden_layers * layer_params(config)["adapter"],  # within the total
        "training_flops_per_token": flops_per_token(config, n_ctx, training=True),
        "n_ctx": n_ctx,
        "dtype_bytes": dtype_bytes,
        "full_experts": (costs(full_experts_config(config), n_ctx, dtype_bytes)
                         if config.adapter_experts else None),
        "flops_per_layer": layer_flops(config, n_ctx),
        "config": {
            "layout": layout(config),
            "block": config.block,
            "norm": config.norm,
            "num_hidden_layers": config.num_hidden_layers,
            "hidden_size": config.hidden_size,
            "intermediate_size": config.intermediate_size,
            "vocab_size": config.vocab_size,
            "num_attention_heads": config.num_attention_heads,
            "num_key_value_heads": config.num_key_value_heads,
            "head_dim": config.head_dim,
            "tie_word_embeddings": config.tie_word_embeddings,
            "n_attn_experts": config.n_attn_experts,
            "kv_shared": bool(config.kv_shared and config.n_attn_experts > 1),
            "n_kv_experts": config.n_kv_experts,
            "n_kv_caches": config.n_kv_caches,
            "attn_routing": config.attn_routing,
            "attn_mixing": config.attn_mixing,
            "n_ffn_experts": config.n_ffn_experts,
            "ffn_top_k": config.ffn_top_k,
            "ffn_renormalize": config.ffn_renormalize,
            "ffn_router": config.ffn_router,
            "ffn_shared_expert": config.ffn_shared_expert,
            "ffn_expert_domains": config.ffn_expert_domains,
            "adapter": config.adapter,
            "adapter_targets": config.adapter_targets,
            "lora_rank": config.lora_rank,
            "lora_alpha": config.lora_alpha,
            "adapter_experts": config.adapter_experts,
            "nexus_projection_flops_per_layer": nexus_projection_flops(config),
        },
    }
