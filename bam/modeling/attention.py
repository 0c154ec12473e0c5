"""Attention: RoPE, the attention masks, and the soft mixture of attention experts (METHOD.md 3.2).

Attention is a soft mixture of E attention experts, sum_j g_j(t) * Attn_j(h)_t, computed as one
scaled-dot-product attention over E*H query heads (MixtureOfAttention); with E = 1 it is ordinary
(grouped-query) attention.
Positions: rotate-half RoPE, plain or with a scaling rule of transformers' (`rope_parameters`, Rope),
on every dim of each head or, with partial rotary (Phi-3/4, GPT-NeoX), the first `rotary_dim`,
or none in the `nope_layers` (SmolLM3, Cohere2's global layers); Gemma 3's local and global layers
have their own RoPE (rope_parameters by layer type). With `qk_norm` queries and keys are
normalized before it, each head's (Qwen3, Gemma 3) or all heads' together (OLMo 2).
Keys: each query sees every earlier position, or in a sliding-window layer (`sliding_window`,
`layer_types`: Mistral, Qwen2/3, SmolLM3, Cohere2, Gemma 2/3, Phi-3) only the window's latest
(attention_mask_for); Gemma 2's attention logits may be soft-capped (explicit softmax).

Shape suffixes: the letters of bam/modeling/__init__.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update

from bam.modeling.adapters import Adapter
from bam.modeling.config import BamConfig
from bam.modeling.layout import qk_norm_widths
from bam.modeling.moe import fp32_linear
from bam.modeling.norm import Norm


def rope_cos_sin(position_ids_BT: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin of plain RoPE's rotation angles, [B, T, head_dim / 2] each: rotate-half RoPE turns the
    pair (x_i, x_{i + head_dim/2}) by angle i, so half a table is all there is. Computed per call, so
    there is no buffer to keep in sync. With partial rotary, `head_dim` is the rotated width
    (config.rotary_dim), as in transformers' default RoPE."""
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

    With a `layer_type` it is that type's RoPE of a config whose rope_parameters are nested by layer
    type (Gemma 3's local and global RoPE, config.rope_by_type): transformers' functions then take
    the type, and the decorator reads this module's attributes under the names transformers'
    per-type rotary modules use (`rope_type` by type, buffers prefixed by the type).
    """

    def __init__(self, config: BamConfig, layer_type: str | None = None):
        super().__init__()
        self.config = config
        self.layer_type = layer_type
        self.rope_parameters = config.rope_by_type()[layer_type]
        rope_type = self.rope_parameters["rope_type"]
        self.rope_type = rope_type if layer_type is None else {layer_type: rope_type}
        self.prefix = "" if layer_type is None else f"{layer_type}_"
        self.by_type = {} if layer_type is None else {"layer_type": layer_type}
        self.max_seq_len_cached = self.original_max_seq_len = config.max_position_embeddings
        self.attention_scaling = 1.0
        self.register_buffer(self.prefix + "inv_freq", None, persistent=False)
        self.register_buffer(self.prefix + "original_inv_freq", None, persistent=False)

    def forward(self, position_ids_BT: torch.Tensor, dtype: torch.dtype):
        rope_type = self.rope_parameters["rope_type"]
        if rope_type == "default":
            theta = self.rope_parameters["rope_theta"]
            return rope_cos_sin(position_ids_BT, self.config.rotary_dim, theta, dtype)
        if getattr(self, self.prefix + "original_inv_freq") is None:
            inv_freq_G, self.attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](self.config, **self.by_type)
            setattr(self, self.prefix + "inv_freq", inv_freq_G)
            setattr(self, self.prefix + "original_inv_freq", inv_freq_G.clone())
        cos_BTG, sin_BTG = self.scaled_cos_sin(position_ids_BT, position_ids_BT, **self.by_type)
        return cos_BTG.to(dtype), sin_BTG.to(dtype)

    @dynamic_rope_update
    def scaled_cos_sin(self, x: torch.Tensor, position_ids_BT: torch.Tensor, layer_type: str | None = None):
        """fp32 cos/sin with the current frequencies (`x` only tells the decorator the device)."""
        inv_freq_G = getattr(self, self.prefix + "inv_freq")
        return _cos_sin(position_ids_BT, inv_freq_G.to(x.device), self.attention_scaling, torch.float32)


def apply_rope(x_BHTA: torch.Tensor, cos_BTG: torch.Tensor, sin_BTG: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (Llama's `x * cos + rotate_half(x) * sin`) on [B, H, T, A], any strides.
    With partial rotary (G < A/2) only the first 2G dims of each head turn, rotate-half within them
    (pairs (i, i + G), as transformers' GPT-NeoX and Phi-3 do); the rest pass through."""
    return _Rope.apply(x_BHTA, cos_BTG[:, None], sin_BTG[:, None], 1.0)


class _Rope(torch.autograd.Function):
    """RoPE as one rotation per pair: two passes over x where the textbook form (negate, concatenate,
    two products, a sum) makes five, each a full read and write of q or k; that matters most for the
    mixture of attention, whose q has E times the heads. The backward is the inverse rotation
    (the same with -sin), itself a _Rope, so higher-order gradients work too. The rotated width is
    2G (cos is [..., G]): all of x by default; with partial rotary the dims past it are copied.
    """

    @staticmethod
    def forward(ctx, x, cos, sin, sign: float):
        ctx.save_for_backward(cos, sin)
        ctx.sign = sign
        out = torch.empty_like(x)  # keeps x's strides: q arrives as a permuted view
        rotated = 2 * cos.shape[-1]
        out_rot = out
        if rotated != x.shape[-1]:  # partial rotary: the dims past the rotated ones pass through
            out[..., rotated:] = x[..., rotated:]
            x, out_rot = x[..., :rotated], out[..., :rotated]
        x1, x2 = x.chunk(2, dim=-1)
        out1, out2 = out_rot.chunk(2, dim=-1)
        torch.mul(x1, cos, out=out1).addcmul_(x2, sin, value=-sign)  # x1 cos - x2 sin
        torch.mul(x2, cos, out=out2).addcmul_(x1, sin, value=sign)  # x2 cos + x1 sin
        return out

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _Rope.apply(grad, cos, sin, -ctx.sign), None, None, None


def attention_mask_for(attention_mask_BS: torch.Tensor | None, q_len: int, past_len: int, device,
                       window: int | None = None, kv_len: int | None = None):
    """One layer's attention mask: None when SDPA's own causal flag is exact, else a bool mask [B|1, 1, T, S].

    The T = q_len queries are the positions past_len .. past_len+T-1 and the S = kv_len keys the latest
    S positions up to the last query: all past_len + T of them from a full cache (the default), fewer
    from transformers' sliding-window cache, which keeps a sliding layer's last window-1 keys. A query
    at p sees the keys at s <= p, and with a sliding `window` only those at s > p - window
    (transformers' sliding_window_overlay: the window counts the query itself). Positions are indices
    in the sequence, padding included, as in transformers' masks.

    Query rows whose keys are all masked (a left-padded position) would give NaN; they see every
    key instead: their output is never used, but it must stay finite.
    """
    kv_len = past_len + q_len if kv_len is None else kv_len
    padded = attention_mask_BS is not None and not bool(attention_mask_BS.all())
    if not padded and kv_len == q_len and (window is None or q_len <= window):
        return None  # no cached prefix: is_causal
    if not padded and q_len == 1 and (window is None or kv_len <= window):
        return None  # one query seeing every key
    end = past_len + q_len
    query_pos = torch.arange(past_len, end, device=device)
    key_pos = torch.arange(end - kv_len, end, device=device)
    causal_TS = key_pos[None, :] <= query_pos[:, None]
    if window is not None:
        causal_TS = causal_TS & (key_pos[None, :] > query_pos[:, None] - window)
    mask_BTS = causal_TS[None]
    if padded:
        mask_BTS = mask_BTS & attention_mask_BS[:, None, -kv_len:].bool()
    mask_BTS = mask_BTS | ~mask_BTS.any(dim=-1, keepdim=True)
    return mask_BTS[:, None]


class AttentionMasks:
    """The attention masks of one forward pass, by (window, key count), each made once on first use:
    the layers of one type share a mask, and a layer's key count is known only after its cache
    update (a sliding layer's cache may keep fewer keys than a full layer's)."""

    def __init__(self, attention_mask_BS: torch.Tensor | None, q_len: int, past_len: int, device):
        self.attention_mask_BS, self.q_len, self.past_len, self.device = attention_mask_BS, q_len, past_len, device
        self.made: dict[tuple[int | None, int], torch.Tensor | None] = {}

    def __call__(self, window: int | None, kv_len: int) -> torch.Tensor | None:
        key = (window, kv_len)
        if key not in self.made:
            self.made[key] = attention_mask_for(self.attention_mask_BS, self.q_len, self.past_len, self.device,
                                                window, kv_len)
        return self.made[key]


def softcapped_attention(q_BHTA: torch.Tensor, k_BHSA: torch.Tensor, v_BHSA: torch.Tensor,
                         mask: torch.Tensor | None, scale: float | None, softcap: float) -> torch.Tensor:
    """SDPA's attention with Gemma 2's soft-capped logits `cap * tanh(scale q.k / cap)`, which SDPA
    cannot compute: explicit logits and softmax, in transformers' eager order (capped before the
    mask, softmax in fp32). `mask` and the head grouping are SDPA's: a bool mask [B|1, 1, T, S], or
    None for causal (T > 1; then S = T) or for one query seeing every key; consecutive query heads
    share a K/V head (enable_gqa)."""
    B, H, T, A = q_BHTA.shape
    n_kv_heads, S = k_BHSA.shape[1], k_BHSA.shape[2]
    q_BKGTA = q_BHTA.reshape(B, n_kv_heads, H // n_kv_heads, T, A)
    logits_BKGTS = torch.matmul(q_BKGTA, k_BHSA.transpose(2, 3)[:, :, None]) * (A**-0.5 if scale is None else scale)
    logits_BKGTS = torch.tanh(logits_BKGTS / softcap) * softcap
    if mask is None and T > 1:
        mask = torch.ones(T, S, dtype=torch.bool, device=q_BHTA.device).tril()[None, None]
    if mask is not None:
        logits_BKGTS = logits_BKGTS.masked_fill(~mask[:, :, None], float("-inf"))
    # at least fp32, as transformers' eager softmax (fp64 stays fp64)
    probs_BKGTS = logits_BKGTS.softmax(dim=-1, dtype=torch.promote_types(q_BHTA.dtype, torch.float32)).to(q_BHTA.dtype)
    return torch.matmul(probs_BKGTS, v_BHSA[:, :, None]).reshape(B, H, T, A)


class MixtureOfAttention(nn.Module):
    """E attention experts mixed per position by a soft router: sum_j g_j(t) * Attn_j(h)_t.

    Query heads are stacked expert-major in `q_proj`. With KV experts each expert's query heads
    attend to its own K/V heads; with `kv_shared` all experts' query heads attend to one set of
    K/V heads, i.e. grouped-query attention with group size E * H / H_kv. SDPA groups consecutive
    query heads, so for sharing the heads are reordered kv-head-major before the call and back after.

    With attn_mixing='parameters' (MoLoRA, MoV) the gates mix the experts' projections instead:
    one attention whose q/k/v are sum_j g_j W_j h and whose output is sum_j g_j W_o,j a, at one
    attention's cost with one KV cache. With adapter experts (config.adapter_experts) the stored
    projections are the seed's, computed once, and expert j adds adapter j's update
    (bam/modeling/adapters.py).
    """

    def __init__(self, config: BamConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_experts = config.n_attn_experts
        self.n_kv_experts = config.n_kv_experts
        self.kv_shared = config.kv_shared and config.n_attn_experts > 1
        self.mix_parameters = config.attn_mixing == "parameters" and config.n_attn_experts > 1
        self.adapter_experts = config.adapter_experts
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.routing = config.attn_routing
        self.top_k = config.attn_top_k
        d, q_width = config.hidden_size, config.num_attention_heads * config.head_dim
        n_q, n_kv = config.n_weight_copies(self.n_experts), config.n_weight_copies(self.n_kv_experts)
        kv_width = n_kv * config.num_key_value_heads * config.head_dim
        self.q_proj = nn.Linear(d, n_q * q_width, bias=config.qkv_bias)
        self.k_proj = nn.Linear(d, kv_width, bias=config.qkv_bias)
        self.v_proj = nn.Linear(d, kv_width, bias=config.qkv_bias)
        # attn_output_bias (GPT-NeoX): one bias per layer, not per expert: the gates sum to 1, so the
        # mixture sum_j g_j (o_j + b) is sum_j g_j o_j + b, one o_proj over the gated experts plus b
        self.o_proj = nn.Linear(n_q * q_width, d, bias=config.attn_output_bias)
        self.qk_norm_per_head = config.qk_norm_scope == "head"
        self.q_norm = self.k_norm = None
        if config.qk_norm:
            q_width, k_width = qk_norm_widths(config)
            per_head = (1,) if self.qk_norm_per_head else ()
            self.q_norm = Norm(config, (n_q, *per_head, q_width))
            self.k_norm = Norm(config, (n_kv, *per_head, k_width))
        self.rope = layer_idx not in (config.nope_layers or ())  # False: a NoPE layer (SmolLM3)
        self.window = config.attention_window(layer_idx)  # None: full attention
        self.scale = config.attention_scale  # None: SDPA's 1/sqrt(head_dim)
        self.softcap = config.attn_logit_softcapping  # None: no capping, SDPA
        self.router = nn.Linear(d, self.n_experts, bias=False) if self.n_experts > 1 else None
        # LoRA or (IA)³ on q/k/v/o (bam/modeling/adapters.py); None: the projections as they are
        self.adapter = Adapter(config, "attn") if config.adapter is not None else None

    def project(self, name: str, h_BTD: torch.Tensor, gates_BTE: torch.Tensor | None = None) -> torch.Tensor:
        """Projection `name` (q_proj, k_proj, v_proj) of h for every expert of it, stacked expert-major
        [B, T, E_p * O]; with `gates_BTE` (attn_mixing='parameters') their gate-weighted mix [B, T, O].
        A projection with one expert (the dense model's, shared K/V) gives its output either way."""
        y_BTO = getattr(self, name)(h_BTD)
        if self.adapter is None or not self.adapter_experts:
            if self.adapter is not None:  # one adapter on a dense model
                y_BTO = self.adapter.output(name, h_BTD, y_BTO)
            n_proj = self.n_experts if name == "q_proj" else self.n_kv_experts
            if gates_BTE is None or n_proj == 1:
                return y_BTO
            return torch.einsum("bteo,bte->bto", y_BTO.unflatten(-1, (n_proj, -1)), gates_BTE.to(y_BTO.dtype))
        B, T = h_BTD.shape[:2]
        h_ND, y_NO = h_BTD.flatten(0, 1), y_BTO.flatten(0, 1)
        if gates_BTE is not None:
            return self.adapter.mixed_output(name, h_ND, y_NO, gates_BTE.flatten(0, 1).to(y_NO.dtype)).view(B, T, -1)
        n_proj = self.n_experts if name == "q_proj" else self.n_kv_experts
        return self.adapter.expert_outputs(name, h_ND, y_NO, n_proj).reshape(B, T, -1)

    def heads(self, name: str, h_BTD: torch.Tensor, gates_BTE: torch.Tensor | None = None) -> torch.Tensor:
        """Queries (q_proj) or keys (k_proj) of h per expert and head, [B, T, E_p, heads, A], after
        their q/k norm (qk_norm) and before RoPE; `gates_BTE` as in `project`."""
        B, T = h_BTD.shape[:2]
        n_heads = self.n_heads if name == "q_proj" else self.n_kv_heads
        x_BTEHA = self.project(name, h_BTD, gates_BTE).view(B, T, -1, n_heads, self.head_dim)
        norm = self.q_norm if name == "q_proj" else self.k_norm
        if norm is None:
            return x_BTEHA
        if self.qk_norm_per_head:  # each head's values
            return norm(x_BTEHA)
        return norm(x_BTEHA.flatten(-2)).view_as(x_BTEHA)  # all of an expert's heads together

    def output(self, o_BTEHA: torch.Tensor, gates_BTE: torch.Tensor | None) -> torch.Tensor:
        """sum_j g_j W_o,j o_j: the output projection of the gated experts' attention outputs (one
        attention's output o for every expert with attn_mixing='parameters')."""
        if gates_BTE is not None:
            o_BTEHA = o_BTEHA * gates_BTE.to(o_BTEHA.dtype)[..., None, None]  # (broadcasts one attention's E=1)
        if not self.adapter_experts:
            o_BTI = o_BTEHA.expand(-1, -1, self.n_experts, -1, -1).flatten(2)
            y_BTD = self.o_proj(o_BTI)
            return y_BTD if self.adapter is None else self.adapter.output("o_proj", o_BTI, y_BTD)
        B, T = o_BTEHA.shape[:2]
        y_BTD = self.o_proj(o_BTEHA.sum(dim=2).flatten(2))  # W_o is the seed's for all: W_o sum_j g_j o_j
        o_NEI = o_BTEHA.expand(-1, -1, self.n_experts, -1, -1).flatten(3).flatten(0, 1)
        return self.adapter.summed_output("o_proj", o_NEI, y_BTD.flatten(0, 1)).view(B, T, -1)

    def gates(self, h_BTD: torch.Tensor) -> torch.Tensor:
        probs_BTE = fp32_linear(h_BTD, self.router.weight).softmax(dim=-1)
        if self.routing == "topk":  # ablation only: METHOD.md 3.2 says soft routing is essential
            top_BTK, index_BTK = probs_BTE.topk(self.top_k, dim=-1)
            probs_BTE = torch.zeros_like(probs_BTE).scatter(-1, index_BTK, top_BTK / top_BTK.sum(-1, keepdim=True))
        return probs_BTE

    def forward(self, h_BTD, cos_sin, masks: AttentionMasks, cache: Cache | None):
        B, T, _ = h_BTD.shape
        gates_BTE = self.gates(h_BTD) if self.router is not None else None
        mixing_gates_BTE = gates_BTE if self.mix_parameters else None  # None: each expert attends
        E = 1 if self.mix_parameters else self.n_experts  # attentions computed
        group = self.n_heads // self.n_kv_heads
        # (B, T, E, H_kv, group, A) -> heads in the order SDPA's GQA grouping needs.
        head_order = (0, 3, 2, 4, 1, 5) if self.kv_shared and E > 1 else (0, 2, 3, 4, 1, 5)
        q_BTEHA = self.heads("q_proj", h_BTD, mixing_gates_BTE)
        k_BTEHA = self.heads("k_proj", h_BTD, mixing_gates_BTE)
        q = q_BTEHA.view(B, T, E, self.n_kv_heads, group, self.head_dim)
        q_BHTA = q.permute(head_order).reshape(B, E * self.n_heads, T, self.head_dim)
        k_BHSA = k_BTEHA.view(B, T, -1, self.head_dim).transpose(1, 2)
        v_BHSA = self.project("v_proj", h_BTD, mixing_gates_BTE).view(B, T, -1, self.head_dim).transpose(1, 2)
        if self.rope:
            q_BHTA, k_BHSA = apply_rope(q_BHTA, *cos_sin), apply_rope(k_BHSA, *cos_sin)
        if cache is not None:
            k_BHSA, v_BHSA = cache.update(k_BHSA, v_BHSA, self.layer_idx)
        mask = masks(self.window, k_BHSA.shape[2])

        if self.softcap is None:
            o_BHTA = F.scaled_dot_product_attention(
                q_BHTA, k_BHSA, v_BHSA, attn_mask=mask, is_causal=mask is None and T > 1, scale=self.scale,
                enable_gqa=q_BHTA.shape[1] != k_BHSA.shape[1],
            )
        else:  # Gemma 2: SDPA cannot soft-cap the logits
            o_BHTA = softcapped_attention(q_BHTA, k_BHSA, v_BHSA, mask, self.scale, self.softcap)
        # Back to (B, T, E, H, A): inverse of head_order.
        o = o_BHTA.view(B, *q.permute(head_order).shape[1:])
        inverse = sorted(range(6), key=head_order.__getitem__)
        o_BTEHA = o.permute(inverse).reshape(B, T, E, self.n_heads, self.head_dim)
        return self.output(o_BTEHA, gates_BTE), gates_BTE
