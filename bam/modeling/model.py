"""The transformer: dense models, BTX, BAM and sparse-upcycled MoEs are all this one class.

Block (METHOD.md section 2), with h = Norm(x):
    parallel:   y = x + Attention(h) + FFN(h)
    sequential: y1 = x + Attention(Norm1(x)); y = y1 + FFN(Norm2(y1))
    sequential, norm_placement='post' (OLMo 2): y1 = x + Norm1(Attention(x)); y = y1 + Norm2(FFN(y1))
(with Granite's residual_multiplier m, each sublayer's output is m * ... before the add).
Attention is a soft mixture of E attention experts (METHOD.md 3.2), computed as one
scaled-dot-product attention over E*H query heads; FFN is a routed mixture of SwiGLU experts with
a linear or Nexus router and an optional always-on shared expert (bam/modeling/moe.py). With E = 1 both
are the ordinary dense modules.
Positions: rotate-half RoPE, plain or with a scaling rule of transformers' (`rope_parameters`, Rope),
or none in the `nope_layers` (SmolLM3); with `qk_norm` queries and keys are normalized before it,
each head's (Qwen3) or all heads' together (OLMo 2).

Shape suffixes: the letters of bam/modeling/__init__.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update

from bam.modeling.config import BamConfig
from bam.modeling.layout import qk_norm_widths
from bam.modeling.loss import linear_cross_entropy
from bam.modeling.moe import fp32_linear, LinearRouter, MoEFFN, NexusRouter, SwiGLU, SwiGLUExperts
from bam.modeling.transformers_compat import cache_argument, cache_name


class Norm(nn.Module):
    """RMSNorm (Llama) or LayerNorm without bias (Cohere) over the last dim, computed in fp32.

    With a `shape` it is a query or key norm of `qk_norm`, one weight per attention expert stored
    stacked as one 1-D tensor and viewed as `shape` to broadcast: (E, 1, A) over x [..., E, heads, A]
    per head (Qwen3), (E, H*A) over x [..., E, H*A] for all heads together (OLMo 2).
    """

    def __init__(self, config: BamConfig, shape: tuple[int, ...] | None = None):
        super().__init__()
        self.kind = config.norm
        self.eps = config.norm_eps
        self.weight = nn.Parameter(torch.ones(math.prod(shape) if shape else config.hidden_size))
        self.weight_shape = shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        if self.kind == "layernorm":
            x32 = x32 - x32.mean(-1, keepdim=True)
        x32 = x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + self.eps)
        weight = self.weight if self.weight_shape is None else self.weight.view(self.weight_shape)
        return weight * x32.to(x.dtype)


def rope_cos_sin(position_ids_BT: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin of plain RoPE's rotation angles, [B, T, head_dim / 2] each: rotate-half RoPE turns the
    pair (x_i, x_{i + head_dim/2}) by angle i, so half a table is all there is. Computed per call, so
    there is no buffer to keep in sync."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=position_ids_BT.device).float() / head_dim)
    return _cos_sin(position_ids_BT, inv_freq, 1.0, dtype)


def _cos_sin(position_ids_BT: torch.Tensor, inv_freq_G: torch.Tensor, scaling: float, dtype: torch.dtype):
    angles_BTG = position_ids_BT.float()[..., None] * inv_freq_G
    cos_BTG, sin_BTG = angles_BTG.cos(), angles_BTG.sin()
    if scaling != 1.0:  # YaRN and LongRoPE scale the attention logits through cos and sin
        cos_BTG, sin_BTG = cos_BTG * scaling, sin_BTG * scaling
    return cos_BTG.to(dtype), sin_BTG.to(dtype)


class Rope(nn.Module):
    """cos/sin for the positions of one forward, per the config's `rope_parameters`.

    `default` is plain RoPE (rope_cos_sin), computed per call. A scaled type takes its inverse
    frequencies and attention scaling from transformers' own ROPE_INIT_FUNCTIONS, and transformers'
    own `dynamic_rope_update` updates them with the positions, exactly as on its models' rotary
    modules (this module keeps the attributes it reads, under its names): `longrope` takes its long
    factors past original_max_position_embeddings; `dynamic` (NTK) recomputes the frequencies for
    a longer sequence and keeps them across calls as transformers does. So an imported checkpoint
    computes what its own class computes, call after call, on whichever transformers is installed.

    The frequencies are non-persistent buffers (never in the state dict), made in fp32 on first use
    (models are often built on the meta device), as transformers' rotary modules make theirs.
    """

    def __init__(self, config: BamConfig):
        super().__init__()
        self.config = config
        self.rope_type = config.rope_parameters["rope_type"]
        self.max_seq_len_cached = self.original_max_seq_len = config.max_position_embeddings
        self.attention_scaling = 1.0
        self.register_buffer("inv_freq", None, persistent=False)
        self.register_buffer("original_inv_freq", None, persistent=False)

    def forward(self, position_ids_BT: torch.Tensor, dtype: torch.dtype):
        if self.rope_type == "default":
            theta = self.config.rope_parameters["rope_theta"]
            return rope_cos_sin(position_ids_BT, self.config.head_dim, theta, dtype)
        if self.original_inv_freq is None:
            inv_freq_G, self.attention_scaling = ROPE_INIT_FUNCTIONS[self.rope_type](self.config)
            self.inv_freq, self.original_inv_freq = inv_freq_G, inv_freq_G.clone()
        cos_BTG, sin_BTG = self.scaled_cos_sin(position_ids_BT, position_ids_BT)
        return cos_BTG.to(dtype), sin_BTG.to(dtype)

    @dynamic_rope_update
    def scaled_cos_sin(self, x: torch.Tensor, position_ids_BT: torch.Tensor):
        """fp32 cos/sin with the current frequencies (`x` only tells the decorator the device)."""
        return _cos_sin(position_ids_BT, self.inv_freq.to(x.device), self.attention_scaling, torch.float32)


def apply_rope(x_BHTA: torch.Tensor, cos_BTG: torch.Tensor, sin_BTG: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (Llama's `x * cos + rotate_half(x) * sin`) on [B, H, T, A], any strides."""
    return _Rope.apply(x_BHTA, cos_BTG[:, None], sin_BTG[:, None], 1.0)


class _Rope(torch.autograd.Function):
    """RoPE as one rotation per pair: two passes over x where the textbook form (negate, concatenate,
    two products, a sum) makes five, each a full read and write of q or k; that matters most for the
    mixture of attention, whose q has E times the heads. The backward is the inverse rotation
    (the same with -sin), itself a _Rope, so higher-order gradients work too.
    """

    @staticmethod
    def forward(ctx, x, cos, sin, sign: float):
        ctx.save_for_backward(cos, sin)
        ctx.sign = sign
        x1, x2 = x.chunk(2, dim=-1)
        out = torch.empty_like(x)  # keeps x's strides: q arrives as a permuted view
        out1, out2 = out.chunk(2, dim=-1)
        torch.mul(x1, cos, out=out1).addcmul_(x2, sin, value=-sign)  # x1 cos - x2 sin
        torch.mul(x2, cos, out=out2).addcmul_(x1, sin, value=sign)  # x2 cos + x1 sin
        return out

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _Rope.apply(grad, cos, sin, -ctx.sign), None, None, None


def attention_mask_for(attention_mask_BS: torch.Tensor | None, q_len: int, past_len: int, device):
    """None when SDPA's own causal flag is exact (no padding, no cached prefix), else a bool mask.

    Query rows whose keys are all masked (a left-padded position) would give NaN; they see every
    key instead: their output is never used, but it must stay finite.
    """
    padded = attention_mask_BS is not None and not bool(attention_mask_BS.all())
    if not padded and past_len == 0:
        return None
    if not padded and q_len == 1:
        return None
    kv_len = past_len + q_len
    query_pos = torch.arange(past_len, kv_len, device=device)
    causal_TS = torch.arange(kv_len, device=device)[None, :] <= query_pos[:, None]
    mask_BTS = causal_TS[None]
    if padded:
        mask_BTS = mask_BTS & attention_mask_BS[:, None, -kv_len:].bool()
    mask_BTS = mask_BTS | ~mask_BTS.any(dim=-1, keepdim=True)
    return mask_BTS[:, None]


class MixtureOfAttention(nn.Module):
    """E attention experts mixed per position by a soft router: sum_j g_j(t) * Attn_j(h)_t.

    Query heads are stacked expert-major in `q_proj`. With KV experts each expert's query heads
    attend to its own K/V heads; with `kv_shared` all experts' query heads attend to one set of
    K/V heads, i.e. grouped-query attention with group size E * H / H_kv. SDPA groups consecutive
    query heads, so for sharing the heads are reordered kv-head-major before the call and back after.
    """

    def __init__(self, config: BamConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_experts = config.n_attn_experts
        self.kv_shared = config.kv_shared and config.n_attn_experts > 1
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.routing = config.attn_routing
        self.top_k = config.attn_top_k
        d, q_width = config.hidden_size, config.num_attention_heads * config.head_dim
        kv_width = config.n_kv_experts * config.num_key_value_heads * config.head_dim
        self.q_proj = nn.Linear(d, self.n_experts * q_width, bias=config.qkv_bias)
        self.k_proj = nn.Linear(d, kv_width, bias=config.qkv_bias)
        self.v_proj = nn.Linear(d, kv_width, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.n_experts * q_width, d, bias=False)
        self.qk_norm_per_head = config.qk_norm_scope == "head"
        self.q_norm = self.k_norm = None
        if config.qk_norm:
            q_width, k_width = qk_norm_widths(config)
            per_head = (1,) if self.qk_norm_per_head else ()
            self.q_norm = Norm(config, (self.n_experts, *per_head, q_width))
            self.k_norm = Norm(config, (config.n_kv_experts, *per_head, k_width))
        self.rope = layer_idx not in (config.nope_layers or ())  # False: a NoPE layer (SmolLM3)
        self.scale = config.attention_scale  # None: SDPA's 1/sqrt(head_dim)
        self.router = nn.Linear(d, self.n_experts, bias=False) if self.n_experts > 1 else None

    def gates(self, h_BTD: torch.Tensor) -> torch.Tensor:
        probs_BTE = fp32_linear(h_BTD, self.router.weight).softmax(dim=-1)
        if self.routing == "topk":  # ablation only: METHOD.md 3.2 says soft routing is essential
            top_BTK, index_BTK = probs_BTE.topk(self.top_k, dim=-1)
            probs_BTE = torch.zeros_like(probs_BTE).scatter(-1, index_BTK, top_BTK / top_BTK.sum(-1, keepdim=True))
        return probs_BTE

    def forward(self, h_BTD, cos_sin, mask, cache: Cache | None):
        B, T, _ = h_BTD.shape
        E, group = self.n_experts, self.n_heads // self.n_kv_heads
        # (B, T, E, H_kv, group, A) -> heads in the order SDPA's GQA grouping needs.
        head_order = (0, 3, 2, 4, 1, 5) if self.kv_shared else (0, 2, 3, 4, 1, 5)
        q_BTEHA = self.q_proj(h_BTD).view(B, T, E, self.n_heads, self.head_dim)
        k_BTEHA = self.k_proj(h_BTD).view(B, T, -1, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None and self.qk_norm_per_head:  # qk_norm: each head's query and key, before RoPE
            q_BTEHA, k_BTEHA = self.q_norm(q_BTEHA), self.k_norm(k_BTEHA)
        elif self.q_norm is not None:  # all of an expert's heads together
            q_BTEHA = self.q_norm(q_BTEHA.flatten(-2)).view_as(q_BTEHA)
            k_BTEHA = self.k_norm(k_BTEHA.flatten(-2)).view_as(k_BTEHA)
        q = q_BTEHA.view(B, T, E, self.n_kv_heads, group, self.head_dim)
        q_BHTA = q.permute(head_order).reshape(B, E * self.n_heads, T, self.head_dim)
        k_BHSA = k_BTEHA.view(B, T, -1, self.head_dim).transpose(1, 2)
        v_BHSA = self.v_proj(h_BTD).view(B, T, -1, self.head_dim).transpose(1, 2)
        if self.rope:
            q_BHTA, k_BHSA = apply_rope(q_BHTA, *cos_sin), apply_rope(k_BHSA, *cos_sin)
        if cache is not None:
            k_BHSA, v_BHSA = cache.update(k_BHSA, v_BHSA, self.layer_idx)

        o_BHTA = F.scaled_dot_product_attention(
            q_BHTA, k_BHSA, v_BHSA, attn_mask=mask, is_causal=mask is None and T > 1, scale=self.scale,
            enable_gqa=q_BHTA.shape[1] != k_BHSA.shape[1],
        )
        # Back to (B, T, E, H, A): inverse of head_order.
        o = o_BHTA.view(B, *q.permute(head_order).shape[1:])
        inverse = sorted(range(6), key=head_order.__getitem__)
        o_BTEHA = o.permute(inverse).reshape(B, T, E, self.n_heads, self.head_dim)
        gates_BTE = None
        if self.router is not None:
            gates_BTE = self.gates(h_BTD)
            o_BTEHA = o_BTEHA * gates_BTE.to(o_BTEHA.dtype)[..., None, None]
        return self.o_proj(o_BTEHA.reshape(B, T, -1)), gates_BTE


class Block(nn.Module):
    def __init__(self, config: BamConfig, layer_idx: int):
        super().__init__()
        self.parallel = config.block == "parallel"
        self.post_norm = config.norm_placement == "post"
        self.residual_multiplier = config.residual_multiplier
        if self.post_norm:  # module order = the layout table's (bam/modeling/layout.py)
            self.attn_output_norm, self.ffn_output_norm = Norm(config), Norm(config)
        else:
            self.input_norm = Norm(config)
            self.post_attention_norm = None if self.parallel else Norm(config)
        self.attn = MixtureOfAttention(config, layer_idx)
        self.ffn = MoEFFN(config)

    def residual(self, y_BTD: torch.Tensor) -> torch.Tensor:
        """A sublayer's output as added to the residual stream (Granite scales it)."""
        return y_BTD if self.residual_multiplier == 1.0 else y_BTD * self.residual_multiplier

    def forward(self, x_BTD, cos_sin, mask, cache, aux_losses: bool):
        if self.post_norm:  # OLMo 2: the sublayers read the residual stream, their outputs are normalized
            attn_BTD, attn_gates = self.attn(x_BTD, cos_sin, mask, cache)
            x_BTD = x_BTD + self.residual(self.attn_output_norm(attn_BTD))
            ffn = self.ffn(x_BTD, aux_losses)
            return x_BTD + self.residual(self.ffn_output_norm(ffn.y_BTD)), ffn, attn_gates
        h_BTD = self.input_norm(x_BTD)
        attn_BTD, attn_gates = self.attn(h_BTD, cos_sin, mask, cache)
        if self.parallel:
            ffn = self.ffn(h_BTD, aux_losses)
            return x_BTD + self.residual(attn_BTD) + self.residual(ffn.y_BTD), ffn, attn_gates
        x_BTD = x_BTD + self.residual(attn_BTD)
        ffn = self.ffn(self.post_attention_norm(x_BTD), aux_losses)
        return x_BTD + self.residual(ffn.y_BTD), ffn, attn_gates


@dataclass
class LayerRouting:
    """Per layer, for routing statistics: FFN expert choice (T, K) and attention gates (B, T, E)."""

    ffn_expert_index: torch.Tensor | None
    ffn_probs: torch.Tensor | None
    attn_gates: torch.Tensor | None


# The outputs extend transformers' own classes, so every field they declare (the KV cache among
# them, whatever the installed release calls it: bam/modeling/transformers_compat.py) is upstream's.
CACHE = cache_name()


@dataclass
class BamModelOutput(BaseModelOutputWithPast):
    """The routers' auxiliary losses (summed over layers; None unless asked for) and, with
    `output_routing`, one `LayerRouting` per layer."""

    load_balancing_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None
    routing: list | None = None


@dataclass
class BamOutput(CausalLMOutputWithPast):
    """`loss` is the LM loss plus `aux_loss`; the parts are returned for logging."""

    lm_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    load_balancing_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    routing: list | None = None


class BamPreTrainedModel(PreTrainedModel):
    config_class = BamConfig
    config: BamConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]
    _supports_sdpa = True
    _skip_keys_device_placement = [CACHE]

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, Norm):
            init.ones_(module.weight)
        elif isinstance(module, (SwiGLUExperts, SwiGLU)):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, LinearRouter):
            init.normal_(module.weight, mean=0.0, std=self.config.router_init_std)
        elif isinstance(module, NexusRouter):
            # Placeholder domain embeddings (any fixed vectors work, METHOD.md 3.3); `bam mix --method
            # nexus` writes the real ones. Unit variance: the scale bam.mix.nexus gives real embeddings.
            init.normal_(module.domain_embeddings, mean=0.0, std=1.0)
            init.normal_(module.gate_up_proj, mean=0.0, std=self.config.router_init_std)
            init.normal_(module.down_proj, mean=0.0, std=self.config.router_init_std)
        if isinstance(module, MixtureOfAttention) and module.router is not None:
            init.normal_(module.router.weight, mean=0.0, std=self.config.router_init_std)


class BamModel(BamPreTrainedModel):
    def __init__(self, config: BamConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = Norm(config)
        self.rope = Rope(config)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                inputs_embeds=None, use_cache=None, output_routing=False, aux_losses=None,
                **kwargs) -> BamModelOutput:
        """`cache` is the KV cache (`past_key_values` before transformers 5.24, also accepted).
        `aux_losses`: compute the routers' load-balancing and z losses; by default only in
        training mode (BamForCausalLM also asks for them whenever it computes a loss)."""
        config = self.config
        cache = cache_argument(cache, kwargs)
        aux_losses = self.training if aux_losses is None else aux_losses
        x_BTD = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if config.embedding_multiplier != 1.0:  # Granite (inputs_embeds too, as transformers does)
            x_BTD = x_BTD * config.embedding_multiplier
        use_cache = config.use_cache if use_cache is None else use_cache
        if not use_cache:
            cache = None
        elif cache is None:
            cache = DynamicCache(config=config)
        past_len = cache.get_seq_length() if cache is not None else 0
        B, T = x_BTD.shape[:2]
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + T, device=x_BTD.device).expand(B, T)
        cos_sin = self.rope(position_ids, x_BTD.dtype)
        mask = attention_mask_for(attention_mask, T, past_len, x_BTD.device)

        lb_loss = z_loss = None
        routing = [] if output_routing else None
        for layer in self.layers:
            x_BTD, ffn, attn_gates = layer(x_BTD, cos_sin, mask, cache, aux_losses)
            if ffn.load_balancing_loss is not None:
                lb_loss = ffn.load_balancing_loss + (0 if lb_loss is None else lb_loss)
                z_loss = ffn.z_loss + (0 if z_loss is None else z_loss)
            if output_routing:
                r = ffn.routing
                routing.append(LayerRouting(r.expert_index_TK if r else None, r.probs_TE if r else None,
                                            attn_gates))
        return BamModelOutput(last_hidden_state=self.norm(x_BTD), **{CACHE: cache}, load_balancing_loss=lb_loss,
                              z_loss=z_loss, routing=routing)


class BamForCausalLM(BamPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: BamConfig):
        super().__init__(config)
        self.model = BamModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0,
                output_routing=False, shift_labels=None, return_logits=True, **kwargs) -> BamOutput:
        """`labels` follow transformers: same positions as `input_ids`, shifted here, -100 ignored.
        `shift_labels` (transformers' loss-function name) are already shifted: the target of each
        position, which lets a caller score every position including the last (`bam train`).

        `return_logits=False` computes the LM loss with the fused, chunked head + cross-entropy of
        bam/modeling/loss.py, which never materializes the [B, T, V] logits (about half of a training
        step's time and memory at d=256, V=32000); `logits` is then None.

        The routers' auxiliary losses (`aux_loss` and its parts) are computed in training mode or
        when a loss is asked for; otherwise they are None, as in generation.
        """
        wants_loss = labels is not None or shift_labels is not None
        body = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            cache=cache_argument(cache, kwargs), inputs_embeds=inputs_embeds, use_cache=use_cache,
            output_routing=output_routing, aux_losses=self.training or wants_loss,
        )
        hidden_BTD, lb_loss, z_loss = body.last_hidden_state, body.load_balancing_loss, body.z_loss
        if logits_to_keep:
            hidden_BTD = hidden_BTD[:, -logits_to_keep:]
        if shift_labels is None and labels is not None:
            # Shift the labels, not the logits: slicing the logits would copy the largest tensor.
            shift_labels = F.pad(labels[:, 1:], (0, 1), value=-100)
        logits_BTV = lm_loss = None
        if return_logits:
            logits_BTV = self.lm_head(hidden_BTD)
            if self.config.logit_scale != 1.0:
                logits_BTV = logits_BTV * self.config.logit_scale
            if shift_labels is not None:
                lm_loss = F.cross_entropy(logits_BTV.flatten(0, 1).float(), shift_labels.flatten(), ignore_index=-100)
        elif shift_labels is not None:
            lm_loss = linear_cross_entropy(hidden_BTD.flatten(0, 1), self.lm_head.weight, shift_labels.flatten(),
                                           logit_scale=self.config.logit_scale, ignore_index=-100)

        aux_loss = None
        if lb_loss is not None:
            aux_loss = self.config.router_aux_loss_coef * lb_loss + self.config.router_z_loss_coef * z_loss
        loss = None
        if lm_loss is not None:
            loss = lm_loss if aux_loss is None else lm_loss + aux_loss
        return BamOutput(loss=loss, logits=logits_BTV, **{CACHE: getattr(body, CACHE)}, lm_loss=lm_loss,
                         aux_loss=aux_loss, load_balancing_loss=lb_loss, z_loss=z_loss,
                         last_hidden_state=hidden_BTD, routing=body.routing)
