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

from bam.errors import BamError, first_line, need
from bam.modeling.transformers_compat import CACHE_NAMES

BLOCKS = ("parallel", "sequential")
NORMS = ("rmsnorm", "layernorm")
ATTN_ROUTINGS = ("soft", "topk")
FFN_ROUTERS = ("linear", "nexus")
EXPERT_DISPATCHES = ("grouped", "loop")
# RoPE variants (transformers' `rope_type`): plain RoPE, and the scaling rules transformers implements
# in ROPE_INIT_FUNCTIONS, which bam/modeling/model.py calls rather than re-deriving them.
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")
DEFAULT_ROPE_THETA = 10000.0
# Where a sequential block's norms sit: before each sublayer (Llama), or on each sublayer's output
# before the residual add (OLMo 2).
NORM_PLACEMENTS = ("pre", "post")
# What one q/k norm (`qk_norm`) normalizes: each head's Dh values (Qwen3), or all heads' values of a
# token together, H*Dh for queries and H_kv*Dh for keys (OLMo 2).
QK_NORM_SCOPES = ("head", "all")


class BamConfig(PreTrainedConfig):
    """Fields are grouped as: shape of the dense transformer, attention experts, FFN experts, losses.

    Parameter layout (what `mix` writes and `hf` import maps onto), per layer `i`:
      attention projections are stacked expert-major: `q_proj` is [n_attn_experts*H*Dh, d];
      `k_proj`/`v_proj` are [n_kv_experts*H_kv*Dh, d] where n_kv_experts is 1 with `kv_shared`;
      `o_proj` is [d, n_attn_experts*H*Dh]; with `qk_norm`, the query and key norms hold one weight
      per expert, stacked 1-D like every norm weight (so they never decay): per head,
      `q_norm` [n_attn_experts*Dh], `k_norm` [n_kv_experts*Dh]; over all heads (qk_norm_scope='all'),
      `q_norm` [n_attn_experts*H*Dh], `k_norm` [n_kv_experts*H_kv*Dh]. FFN experts are 3-D like Mixtral's:
      `gate_up_proj` [n_ffn_experts, 2*d_ff, d] (gate rows first) and `down_proj` [E, d, d_ff].
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
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    block: str = "parallel"
    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    # One of NORM_PLACEMENTS; 'post' (OLMo 2) needs block='sequential'.
    norm_placement: str = "pre"
    # RoPE as transformers 5 configs describe it: `rope_type` (one of ROPE_TYPES), `rope_theta`, and
    # that type's scaling fields (factor, original_max_position_embeddings, ...). A config.json
    # written before this field carries a bare `rope_theta` instead: see __post_init__.
    rope_parameters: dict | None = None
    qkv_bias: bool = False
    # RMSNorm (of kind `norm`, eps `norm_eps`) of queries and keys before RoPE, over `qk_norm_scope`
    # (one of QK_NORM_SCOPES): each head (Qwen3) or all heads together (OLMo 2).
    qk_norm: bool = False
    qk_norm_scope: str = "head"
    # Layers (indices) whose attention has no positional encoding at all (NoPE, SmolLM3).
    nope_layers: list[int] | None = None
    # The softmax scale of attention; None is 1/sqrt(head_dim). Granite's attention_multiplier.
    attention_scale: float | None = None
    # Granite: token embeddings are multiplied by embedding_multiplier, each sublayer's output by
    # residual_multiplier before it is added to the residual stream, and the logits by logit_scale
    # (Cohere's; Granite's divisor logits_scaling is 1 / logit_scale).
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    logit_scale: float = 1.0
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02

    # Attention experts (METHOD.md 3.2): soft routing by default, top-k only as an ablation.
    n_attn_experts: int = 1
    kv_shared: bool = False
    attn_routing: str = "soft"
    attn_top_k: int = 1

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
    def n_kv_experts(self) -> int:
        """How many K/V projections (and KV caches) each layer holds."""
        return 1 if self.kv_shared else self.n_attn_experts

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
        check(self.norm in NORMS, "norm", f"one of {NORMS}")
        check(self.norm_placement in NORM_PLACEMENTS, "norm_placement", f"one of {NORM_PLACEMENTS}")
        check(self.norm_placement == "pre" or self.block == "sequential", "norm_placement",
              "'pre' with block='parallel' (its attention and FFN share one input norm)")
        check(self.attn_routing in ATTN_ROUTINGS, "attn_routing", f"one of {ATTN_ROUTINGS}")
        check(self.ffn_router in FFN_ROUTERS, "ffn_router", f"one of {FFN_ROUTERS}")
        check(self.expert_dispatch in EXPERT_DISPATCHES, "expert_dispatch", f"one of {EXPERT_DISPATCHES}")
        check(self.ffn_top_k <= self.n_ffn_experts, "ffn_top_k", f"at most n_ffn_experts={self.n_ffn_experts}")
        check(self.attn_top_k <= self.n_attn_experts, "attn_top_k",
             f"at most n_attn_experts={self.n_attn_experts}")
        check(self.norm_eps > 0, "norm_eps", "a positive number")
        rope = self.rope_parameters
        check(isinstance(rope, dict) and rope.get("rope_type") in ROPE_TYPES
              and isinstance(rope.get("rope_theta"), (int, float)) and rope["rope_theta"] > 0
              and rope.get("partial_rotary_factor", 1.0) == 1.0, "rope_parameters",
              f"rope_type one of {ROPE_TYPES}, a positive rope_theta and every dimension rotated "
              f"(no partial_rotary_factor)")
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
        scale = self.attention_scale
        check(scale is None or (isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale > 0),
              "attention_scale", "null (1/sqrt(head_dim)) or a positive number")
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


def config_from_dict(config_dict: dict, where: Path | str) -> BamConfig:
    """A validated BamConfig from a config file's fields; BamError names `where` and the field."""
    try:
        return BamConfig.from_dict(dict(config_dict))
    except BamError as err:
        raise BamError(f"{where}: {err}") from None
    except (TypeError, ValueError) as err:
        raise BamError(f"{where}: invalid config ({first_line(err)})") from None
