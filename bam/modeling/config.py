"""The model configuration: one dataclass for the dense model and every MoE variant.

A dense model is the one-expert case (`n_attn_experts = n_ffn_experts = 1`), so a dense seed, a BTX
mixture and a BAM mixture share one class, one parameter layout and one checkpoint format. The
config is a transformers `PreTrainedConfig` (itself a dataclass in transformers 5), so every model
directory we write is an ordinary Hugging Face directory; it is validated on construction, and an
out-of-range field raises `BamError` naming the field.
"""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedConfig
from transformers.activations import ACT2FN

from bam.errors import BamError, first_line, need
from bam.modeling.transformers_compat import CACHE_NAMES

BLOCKS = ("parallel", "sequential")
NORMS = ("rmsnorm", "layernorm")
ATTN_ROUTINGS = ("soft", "topk")
# How the gates mix attention experts: their outputs, sum_j g_j Attn_j(h) (BAM), or their
# parameters, one attention whose per-token q/k/v/o projections are sum_j g_j W_j (MoLoRA/MoV):
# one attention's cost and one KV cache, whatever the number of experts.
ATTN_MIXINGS = ("outputs", "parameters")
FFN_ROUTERS = ("linear", "nexus")
EXPERT_DISPATCHES = ("grouped", "loop")
# RoPE variants (transformers' `rope_type`): plain RoPE, and the scaling rules transformers implements
# in ROPE_INIT_FUNCTIONS, which bam/modeling/attention.py calls rather than re-deriving them.
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")
DEFAULT_ROPE_THETA = 10000.0
# Where a sequential block's norms sit: before each sublayer (Llama), on each sublayer's output
# before the residual add (OLMo 2), or both (Gemma 2 and 3's sandwich).
NORM_PLACEMENTS = ("pre", "post", "sandwich")
# What one q/k norm (`qk_norm`) normalizes: each head's Dh values (Qwen3), or all heads' values of a
# token together, H*Dh for queries and H_kv*Dh for keys (OLMo 2).
QK_NORM_SCOPES = ("head", "all")
# What attention each layer has (`layer_types`, transformers' names): every earlier key, or the
# `sliding_window` latest ones.
LAYER_TYPES = ("full_attention", "sliding_attention")
# Adapters on a frozen dense model (PEFT's LoRA and (IA)³, bam/modeling/adapters.py), and the
# projections each may target, by the names PEFT and Llama give them. bam's FFN fuses gate and up
# into one gate_up_proj, so a LoRA targets them together (two A/B pairs, one per half). An (IA)³
# vector rescales the output of q/k/v, or the input of down_proj (PEFT's feedforward module).
ADAPTERS = ("lora", "ia3")
ADAPTER_TARGETS = {"lora": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                   "ia3": ("q_proj", "k_proj", "v_proj", "down_proj")}


# The fields that fix a dense model's function: every tensor's shape, and each option that changes
# what the parameters compute. Two dense models are experts of one MoE only if they agree on them
# (bam/mix), and a family export must give every one of them back on import (bam/formats/export.py).
COMPATIBILITY_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "block", "norm", "norm_eps", "norm_placement", "rope_parameters",
    "qkv_bias", "qk_norm", "qk_norm_scope", "nope_layers", "attention_scale", "tie_word_embeddings",
    "embedding_multiplier", "embedding_multiplier_in_lookup", "residual_multiplier", "logit_scale",
    "hidden_act", "norm_weight_offset", "attn_logit_softcapping", "final_logit_softcapping",
    "sliding_window", "layer_types",
    "parallel_ffn_norm", "norm_bias", "ffn_gated", "ffn_bias", "attn_output_bias", "cache_reset_length",
    "adapter", "adapter_targets", "lora_rank", "lora_alpha",
)


class BamConfig(PreTrainedConfig):
    """Fields are grouped as: shape of the dense transformer, attention experts, FFN experts, losses.

    Parameter layout (what `mix` writes and `hf` import maps onto), per layer `i`:
      attention projections are stacked expert-major: `q_proj` is [n_attn_experts*H*Dh, d];
      `k_proj`/`v_proj` are [n_kv_experts*H_kv*Dh, d] where n_kv_experts is 1 with `kv_shared`;
      `o_proj` is [d, n_attn_experts*H*Dh]; with `qk_norm`, the query and key norms hold one weight
      per expert, stacked 1-D like every norm weight (so they never decay): per head,
      `q_norm` [n_attn_experts*Dh], `k_norm` [n_kv_experts*Dh]; over all heads (qk_norm_scope='all'),
      `q_norm` [n_attn_experts*H*Dh], `k_norm` [n_kv_experts*H_kv*Dh]. FFN experts are 3-D like Mixtral's:
      `gate_up_proj` [n_ffn_experts, 2*d_ff, d] (gate rows first) and `down_proj` [E, d, d_ff]; non-gated
      (ffn_gated=False) `up_proj` [E, d_ff, d] instead of gate_up_proj; with ffn_bias their biases
      `gate_up_proj_bias` or `up_proj_bias` [E, 2*d_ff or d_ff] and `down_proj_bias` [E, d].
    With `ffn_shared_expert`, the always-on expert is 2-D: `ffn.shared_expert.gate_up_proj`
    [2*d_ff, d] and `ffn.shared_expert.down_proj` [d, d_ff]. The FFN router is `ffn.router.weight`
    [E, d] (linear), or for Nexus `ffn.router.domain_embeddings` [E, m] (fixed, never trained),
    `ffn.router.gate_up_proj` [2*h', m] and `ffn.router.down_proj` [d, h'] (bam/modeling/moe.py).
    """

    model_type = "bam"
    keys_to_ignore_at_inference = list(CACHE_NAMES)

    # The dense transformer (METHOD.md section 2).
    vocab_size: int = 32000
    hidden_size: int = 512
    intermediate_size: int = 1376
    # The activation of the gated MLP (the FFN experts and the shared expert), a key of transformers'
    # ACT2FN: 'silu' (SwiGLU, Llama) or e.g. 'gelu_pytorch_tanh' (GeGLU, Gemma).
    hidden_act: str = "silu"
    # The FFN (experts and shared expert alike): gated, down(act(gate x) * up x), or with
    # ffn_gated=False down(act(up x)) (GPT-NeoX); with ffn_bias, a bias after each matmul, one per
    # FFN expert (bam/modeling/moe.py FFNParameters).
    ffn_gated: bool = True
    ffn_bias: bool = False
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    block: str = "parallel"
    # With block='parallel': the FFN reads a norm of its own (GPT-NeoX's parallel residual,
    # y = x + Attention(Norm1(x)) + FFN(Norm2(x))) instead of the attention's.
    parallel_ffn_norm: bool = False
    norm: str = "rmsnorm"
    # LayerNorm with a learned bias (GPT-NeoX), on every norm but the q/k norms.
    norm_bias: bool = False
    norm_eps: float = 1e-5
    # One of NORM_PLACEMENTS; 'post' (OLMo 2) and 'sandwich' (Gemma 2, 3) need block='sequential'.
    norm_placement: str = "pre"
    # Every norm (q/k norms included) multiplies by `norm_weight_offset + weight`: Gemma stores w and
    # computes x * (1 + w), in fp32 (offset 1.0). A norm weight is then a difference from identity,
    # so averaging weights (BTX) averages the factors as before: the map is affine.
    norm_weight_offset: float = 0.0
    # RoPE as transformers 5 configs describe it: `rope_type` (one of ROPE_TYPES), `rope_theta`, and
    # that type's scaling fields (factor, original_max_position_embeddings, ...), and optionally
    # `partial_rotary_factor`: RoPE on the first `rotary_dim` dims of each head only. A config.json
    # written before this field carries a bare `rope_theta` instead: see __post_init__. With
    # `layer_types`, transformers' nested form gives each layer type its own RoPE, keyed by the type
    # (Gemma 3: {"sliding_attention": local RoPE, "full_attention": global RoPE}): see `rope_by_type`.
    rope_parameters: dict | None = None
    # Phi-3's LongRoPE in generation: when the sequence first grows past this many positions (its
    # original_max_position_embeddings), generate() drops the KV cache and recomputes it, so that
    # every key is rotated with the long factors, as Phi3ForCausalLM.prepare_inputs_for_generation
    # does. None: the cache is kept (Llama's LongRoPE). A forward pass is the same either way.
    cache_reset_length: int | None = None
    qkv_bias: bool = False
    # A bias on the attention's output projection (GPT-NeoX): one per layer, whatever the number of
    # attention experts (their gates sum to 1: bam/modeling/attention.py MixtureOfAttention).
    attn_output_bias: bool = False
    # RMSNorm (of kind `norm`, eps `norm_eps`) of queries and keys before RoPE, over `qk_norm_scope`
    # (one of QK_NORM_SCOPES): each head (Qwen3) or all heads together (OLMo 2).
    qk_norm: bool = False
    qk_norm_scope: str = "head"
    # Layers (indices) whose attention has no positional encoding at all (NoPE, SmolLM3).
    nope_layers: list[int] | None = None
    # Sliding-window attention, transformers' meaning: a query at position t sees the keys at
    # t - sliding_window < s <= t (the window counts the query itself). `layer_types` says per layer
    # which attention it has, one of LAYER_TYPES; with a window and no layer_types every layer slides
    # (Mistral). Each layer's mask comes from one function, bam/modeling/attention.py attention_mask_for.
    sliding_window: int | None = None
    layer_types: list[str] | None = None
    # The softmax scale of attention; None is 1/sqrt(head_dim). Granite's attention_multiplier.
    attention_scale: float | None = None
    # Gemma 2's soft-capping, `cap * tanh(logits / cap)`, of the attention logits (before the mask) and
    # of the final logits; None: none. SDPA cannot cap, so capped attention takes an explicit-softmax
    # path, which costs time and memory only when this is set.
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    # Granite: token embeddings are multiplied by embedding_multiplier, each sublayer's output by
    # residual_multiplier before it is added to the residual stream, and the logits by logit_scale
    # (Cohere's; Granite's divisor logits_scaling is 1 / logit_scale).
    embedding_multiplier: float = 1.0
    # Gemma: embedding_multiplier belongs to the token lookup (transformers' ScaledWordEmbedding): it
    # is rounded to the embeddings' dtype before it multiplies them (in bf16, sqrt(hidden_size) is
    # then up to 0.2% off its fp32 value), and inputs_embeds passed in are not multiplied.
    embedding_multiplier_in_lookup: bool = False
    residual_multiplier: float = 1.0
    logit_scale: float = 1.0
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02

    # Attention experts (METHOD.md 3.2): soft routing by default, top-k only as an ablation.
    n_attn_experts: int = 1
    kv_shared: bool = False
    attn_routing: str = "soft"
    attn_top_k: int = 1
    attn_mixing: str = "outputs"  # one of ATTN_MIXINGS

    # FFN experts (METHOD.md 3.1): BAM's default is top-1 with the gate not renormalized.
    # (Not `top_k`: transformers would read that as a sampling setting for generate().)
    n_ffn_experts: int = 1
    ffn_top_k: int = 1
    ffn_renormalize: bool = False
    ffn_router: str = "linear"
    expert_dispatch: str = "grouped"
    router_init_std: float = 0.02
    # Nexus (METHOD.md 3.3): an always-on shared expert beside the routed ones (usable with either
    # router), and the router that scores experts by projected domain embeddings: m = embed dim of
    # the fixed domain embeddings, h' = hidden width of the SwiGLU projection m -> d.
    ffn_shared_expert: bool = False
    nexus_embed_dim: int | None = None
    nexus_hidden_dim: int | None = None
    # Bookkeeping, no effect on the function: the domain of each routed FFN expert (add-expert and
    # routing reports name experts by it), and how the Nexus domain embeddings were computed
    # (bam.mix.nexus.EmbeddingSource as a dict), so an expert added later is embedded the same way.
    ffn_expert_domains: list[str] | None = None
    nexus_embedding_source: dict | None = None
    # Bookkeeping too: the Hugging Face family (`model_type`) a model was imported from, set by
    # import (bam/formats/families.py translate_config) and carried through train, mix and add-expert, so `bam export
    # --format source` writes it back to that family. None for a model bam initialised.
    source_model_type: str | None = None

    # An adapter trained on the frozen model (one of ADAPTERS; None: none, the model as it is):
    # LoRA adds (lora_alpha / lora_rank) B A x to each targeted projection, (IA)³ rescales its
    # output (its input for down_proj) elementwise. `adapter_targets`: a subset of
    # ADAPTER_TARGETS[adapter], in that order. Dense models only.
    adapter: str | None = None
    adapter_targets: list[str] | None = None
    lora_rank: int | None = None
    lora_alpha: float | None = None
    # Adapter experts (METHOD.md 7): every expert is the one seed plus an adapter of its own, so a
    # layer holds one copy of the seed's weights and a stack of adapters, one per expert of each
    # projection (q/o: n_attn_experts, k/v: n_kv_experts, FFN: n_ffn_experts); expert j computes
    # with the seed's weights and adapter j (bam/modeling/adapters.py). False: one adapter on a
    # dense model, or none.
    adapter_experts: bool = False

    # Auxiliary losses on the FFN router, summed over layers and added to the LM loss.
    router_aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 1e-3

    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs):
        # The one place an old config.json's `rope_theta` (bam before rope_parameters, or
        # BamConfig(rope_theta=...)) becomes the RoPE description: plain RoPE with that base.
        theta = kwargs.pop("rope_theta", None)
        if self.rope_parameters is None:
            self.rope_parameters = {"rope_type": "default",
                                    "rope_theta": DEFAULT_ROPE_THETA if theta is None else theta}
        elif theta is not None and self.rope_parameters.get("rope_theta", theta) != theta:
            raise BamError(f"config fields rope_theta={theta!r} and rope_parameters={self.rope_parameters!r} "
                           f"disagree: expected rope_parameters alone")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and self.num_attention_heads > 0:
            if self.hidden_size % self.num_attention_heads:
                raise BamError(f"config field num_attention_heads={self.num_attention_heads}: expected a divisor "
                               f"of hidden_size={self.hidden_size} (or set head_dim explicitly)")
            self.head_dim = self.hidden_size // self.num_attention_heads
        super().__post_init__(**kwargs)
        self.validate()

    @property
    def rotary_dim(self) -> int:
        """How many of each head's dims RoPE rotates: the first int(head_dim * partial_rotary_factor),
        transformers' rule (Phi-4-mini 0.75, GPT-NeoX 0.25); every one by default."""
        return int(self.head_dim * self.rope_parameters.get("partial_rotary_factor", 1.0))

    def rope_by_type(self) -> dict[str | None, dict]:
        """The RoPE description of each layer type: {None: rope_parameters} when all layers share one,
        else rope_parameters itself, nested by layer type (transformers' form, Gemma 3)."""
        rope = self.rope_parameters
        if isinstance(rope, dict) and rope and set(rope) <= set(LAYER_TYPES):
            return dict(rope)
        return {None: rope}

    @property
    def n_kv_experts(self) -> int:
        """How many K/V experts each layer has: one per attention expert, or one shared."""
        return 1 if self.kv_shared else self.n_attn_experts

    @property
    def n_kv_caches(self) -> int:
        """How many sets of K/V heads each layer caches: one per K/V expert when attention experts'
        outputs are mixed, one when their parameters are (the keys are mixed before they are cached)."""
        return 1 if self.attn_mixing == "parameters" else self.n_kv_experts

    def projection_experts(self, name: str) -> int:
        """How many experts projection `name` (an adapter target, PEFT's name) has in each layer."""
        if name in ("q_proj", "o_proj"):
            return self.n_attn_experts
        return self.n_kv_experts if name in ("k_proj", "v_proj") else self.n_ffn_experts

    def n_weight_copies(self, experts: int) -> int:
        """How many full weight copies hold `experts` experts of one projection: one each, or one
        seed copy that adapter experts share."""
        return 1 if self.adapter_experts else experts

    def attention_window(self, layer_idx: int) -> int | None:
        """How many latest keys layer `layer_idx`'s attention sees (its sliding window), None for all."""
        if self.layer_types is not None and self.layer_types[layer_idx] != "sliding_attention":
            return None
        return self.sliding_window

    @property
    def is_dense(self) -> bool:
        """One attention, one FFN: the plain transformer (a shared expert or Nexus router is not)."""
        return (self.n_attn_experts == 1 and self.n_ffn_experts == 1 and not self.ffn_shared_expert
                and self.ffn_router == "linear")

    def validate(self) -> None:
        def check(ok: bool, field: str, expected: str) -> None:
            need(ok, f"config field {field}", getattr(self, field), expected)

        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                      "num_attention_heads", "num_key_value_heads", "head_dim",
                      "max_position_embeddings", "n_attn_experts", "n_ffn_experts", "ffn_top_k",
                      "attn_top_k"):
            value = getattr(self, field)
            check(isinstance(value, int) and value > 0, field, "a positive integer")
        check(self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
             f"a divisor of num_attention_heads={self.num_attention_heads}")
        check(self.head_dim % 2 == 0, "head_dim", "an even number (RoPE rotates pairs)")
        check(self.block in BLOCKS, "block", f"one of {BLOCKS}")
        check(isinstance(self.hidden_act, str) and self.hidden_act in ACT2FN, "hidden_act",
              "an activation name of transformers' ACT2FN (e.g. 'silu', 'gelu_pytorch_tanh')")
        check(self.norm in NORMS, "norm", f"one of {NORMS}")
        check(self.norm_placement in NORM_PLACEMENTS, "norm_placement", f"one of {NORM_PLACEMENTS}")
        check(self.norm_placement == "pre" or self.block == "sequential", "norm_placement",
              "'pre' with block='parallel' (its attention and FFN share one input norm)")
        for field in ("parallel_ffn_norm", "norm_bias", "ffn_gated", "ffn_bias", "attn_output_bias",
                      "embedding_multiplier_in_lookup"):
            check(isinstance(getattr(self, field), bool), field, "true or false")
        reset = self.cache_reset_length
        check(reset is None or (isinstance(reset, int) and not isinstance(reset, bool) and reset > 0),
              "cache_reset_length", "null or a positive integer")
        check(not self.parallel_ffn_norm or self.block == "parallel", "parallel_ffn_norm",
              "false unless block='parallel'")
        check(not self.norm_bias or (self.norm == "layernorm" and not self.norm_weight_offset), "norm_bias",
              "false unless norm='layernorm' (and norm_weight_offset 0)")
        check(self.attn_routing in ATTN_ROUTINGS, "attn_routing", f"one of {ATTN_ROUTINGS}")
        check(self.attn_mixing in ATTN_MIXINGS, "attn_mixing", f"one of {ATTN_MIXINGS}")
        # (mixing parameters would have to mix each expert's q/k norm weights too)
        check(self.attn_mixing == "outputs" or not self.qk_norm or self.adapter_experts, "attn_mixing",
              "'outputs' with qk_norm, unless the experts are adapters (which share the seed's q/k norms)")
        check(self.ffn_router in FFN_ROUTERS, "ffn_router", f"one of {FFN_ROUTERS}")
        check(self.expert_dispatch in EXPERT_DISPATCHES, "expert_dispatch", f"one of {EXPERT_DISPATCHES}")
        check(self.ffn_top_k <= self.n_ffn_experts, "ffn_top_k", f"at most n_ffn_experts={self.n_ffn_experts}")
        check(self.attn_top_k <= self.n_attn_experts, "attn_top_k",
             f"at most n_attn_experts={self.n_attn_experts}")
        check(self.norm_eps > 0, "norm_eps", "a positive number")
        rope_by_type = self.rope_by_type()
        # (without layer_types transformers' standardization reads a nested form as one RoPE with the
        # types as stray keys: refused here rather than run as plain RoPE)
        one_rope = None in rope_by_type and not set(LAYER_TYPES) & set(self.rope_parameters or ())
        check(one_rope or (None not in rope_by_type and self.layer_types is not None
                           and set(rope_by_type) == set(self.layer_types)
                           and all(isinstance(r, dict) and "partial_rotary_factor" not in r
                                   for r in rope_by_type.values())),
              "rope_parameters", f"one RoPE description, or one per layer type of layer_types={self.layer_types} "
              f"keyed by it (each rotating every dimension)")
        for rope in rope_by_type.values():
            check(isinstance(rope, dict) and rope.get("rope_type") in ROPE_TYPES
                  and isinstance(rope.get("rope_theta"), (int, float)) and rope["rope_theta"] > 0
                  and isinstance(rope.get("partial_rotary_factor", 1.0), (int, float))
                  and 0 < rope.get("partial_rotary_factor", 1.0) <= 1, "rope_parameters",
                  f"rope_type one of {ROPE_TYPES}, a positive rope_theta and a partial_rotary_factor in (0, 1]")
        rope = self.rope_parameters
        check(self.rotary_dim % 2 == 0 and self.rotary_dim > 0, "rope_parameters",
              f"a partial_rotary_factor rotating an even number of each head's {self.head_dim} dims "
              f"(int(head_dim * partial_rotary_factor) = {self.rotary_dim}; RoPE rotates pairs)")
        try:  # transformers' own check of the fields each rope_type needs (KeyError names them)
            self.validate_rope()
        except (KeyError, TypeError, ValueError) as err:
            raise BamError(f"config field rope_parameters={rope!r}: {first_line(err)}") from None
        check(self.router_init_std >= 0, "router_init_std", "a non-negative number")
        check(self.router_aux_loss_coef >= 0, "router_aux_loss_coef", "a non-negative number")
        check(self.router_z_loss_coef >= 0, "router_z_loss_coef", "a non-negative number")
        check(isinstance(self.ffn_shared_expert, bool), "ffn_shared_expert", "true or false")
        check(isinstance(self.qk_norm, bool), "qk_norm", "true or false")
        check(self.qk_norm_scope in QK_NORM_SCOPES and (self.qk_norm or self.qk_norm_scope == "head"),
              "qk_norm_scope", f"one of {QK_NORM_SCOPES} ('head' unless qk_norm)")
        layers = self.nope_layers
        check(layers is None or (isinstance(layers, list) and layers == sorted(set(layers))
                                 and all(isinstance(i, int) and not isinstance(i, bool)
                                         and 0 <= i < self.num_hidden_layers for i in layers)),
              "nope_layers", f"null or increasing layer indices below num_hidden_layers={self.num_hidden_layers}")
        window = self.sliding_window
        check(window is None or (isinstance(window, int) and not isinstance(window, bool) and window > 0),
              "sliding_window", "null (no sliding window) or a positive integer")
        types = self.layer_types
        check(types is None or (isinstance(types, list) and len(types) == self.num_hidden_layers
                                and all(t in LAYER_TYPES for t in types)),
              "layer_types", f"null or {self.num_hidden_layers} entries (one per layer), each one of {LAYER_TYPES}")
        check(window is not None or "sliding_attention" not in (types or ()), "layer_types",
              "no 'sliding_attention' layer without a sliding_window")
        scale = self.attention_scale
        check(scale is None or (isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale > 0),
              "attention_scale", "null (1/sqrt(head_dim)) or a positive number")
        for field in ("attn_logit_softcapping", "final_logit_softcapping"):
            value = getattr(self, field)
            check(value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0),
                  field, "null (no capping) or a positive number")
        offset = self.norm_weight_offset
        check(isinstance(offset, (int, float)) and not isinstance(offset, bool), "norm_weight_offset", "a number")
        for field in ("embedding_multiplier", "residual_multiplier", "logit_scale"):
            value = getattr(self, field)
            check(isinstance(value, (int, float)) and not isinstance(value, bool) and value != 0, field,
                  "a non-zero number")
        for field in ("nexus_embed_dim", "nexus_hidden_dim"):
            value = getattr(self, field)
            if self.ffn_router == "nexus":
                check(isinstance(value, int) and not isinstance(value, bool) and value > 0, field,
                     "a positive integer (required by ffn_router='nexus')")
            else:
                check(value is None, field, "null unless ffn_router='nexus'")
        domains = self.ffn_expert_domains
        check(domains is None or (isinstance(domains, list) and len(domains) == self.n_ffn_experts
                                 and all(isinstance(d, str) and d for d in domains)
                                 and len(set(domains)) == len(domains)),
             "ffn_expert_domains", f"null or {self.n_ffn_experts} distinct names, one per FFN expert")
        check(self.nexus_embedding_source is None or isinstance(self.nexus_embedding_source, dict),
             "nexus_embedding_source", "null or an object")
        self._validate_adapter()
        check(self.source_model_type is None or (isinstance(self.source_model_type, str) and self.source_model_type),
              "source_model_type", "null or a Hugging Face model_type")

    def _validate_adapter(self) -> None:
        def check(ok: bool, field: str, expected: str) -> None:
            need(ok, f"config field {field}", getattr(self, field), expected)

        check(self.adapter is None or self.adapter in ADAPTERS, "adapter", f"null or one of {ADAPTERS}")
        check(isinstance(self.adapter_experts, bool), "adapter_experts", "true or false")
        if self.adapter is None:
            for field in ("adapter_targets", "lora_rank", "lora_alpha"):
                check(getattr(self, field) is None, field, "null unless adapter is set")
            check(not self.adapter_experts, "adapter_experts", "false unless adapter is set")
            return
        targets = self.adapter_targets
        allowed = ADAPTER_TARGETS[self.adapter]
        check(isinstance(targets, list) and targets and all(t in allowed for t in targets)
              and targets == sorted(set(targets), key=allowed.index), "adapter_targets",
              f"distinct names among {allowed}, in that order")
        if self.adapter_experts:
            check(not self.ffn_shared_expert and self.ffn_router == "linear", "adapter_experts",
                  "false with a shared expert or a Nexus router")
            check(all(self.projection_experts(t) > 1 for t in targets),
                  "adapter_targets", "projections with several experts each (adapter_experts: "
                  f"n_attn_experts={self.n_attn_experts}, n_kv_experts={self.n_kv_experts}, "
                  f"n_ffn_experts={self.n_ffn_experts})")
        else:
            check(self.is_dense, "adapter", "null on a mixture of full experts (adapters go on a dense "
                  "model, or are the experts: adapter_experts)")
        if self.adapter == "lora":
            check(("gate_proj" in targets) == ("up_proj" in targets) or not self.ffn_gated, "adapter_targets",
                  "gate_proj and up_proj together (bam fuses them into one gate_up_proj)")
            check(self.ffn_gated or "gate_proj" not in targets, "adapter_targets",
                  "no gate_proj on a non-gated FFN (ffn_gated=False)")
            rank = self.lora_rank
            check(isinstance(rank, int) and not isinstance(rank, bool) and rank > 0, "lora_rank", "a positive integer")
            alpha = self.lora_alpha
            check(isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and alpha > 0, "lora_alpha",
                  "a positive number")
        else:
            for field in ("lora_rank", "lora_alpha"):
                check(getattr(self, field) is None, field, "null unless adapter='lora'")


def config_from_dict(config_dict: dict, where: Path | str) -> BamConfig:
    """A validated BamConfig from a config file's fields; BamError names `where` and the field."""
    try:
        return BamConfig.from_dict(dict(config_dict))
    except BamError as err:
        raise BamError(f"{where}: {err}") from None
    except (TypeError, ValueError) as err:
        raise BamError(f"{where}: invalid config ({first_line(err)})") from None


def full_experts_config(config: BamConfig) -> BamConfig:
    """The MoE of full experts that computes what the adapter-expert `config` does, expert j holding
    the seed's weights with adapter j merged: the config `bam mix --materialize` writes
    (bam/mix/adapter_mix.py materialized), routing and attention mixing unchanged."""
    need(config.adapter_experts, "config field adapter_experts", config.adapter_experts,
         "true (a model of adapter experts, whose full-expert twin this is)")
    fields = config.to_dict()
    fields.update(adapter=None, adapter_targets=None, lora_rank=None, lora_alpha=None, adapter_experts=False)
    return config_from_dict(fields, "full-expert twin of an adapter-expert config")
