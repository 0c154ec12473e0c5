"""The model against independent references: naive attention, a per-expert loop, hand-computed losses."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from bam import BamConfig, BamForCausalLM
from bam.modeling.attention import AttentionMasks
from bam.modeling.model import CACHE
from bam.modeling.moe import MoEFFN, load_balancing_loss, router_z_loss


def tiny(**overrides) -> BamConfig:
    fields = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return BamConfig(**{**fields, **overrides})


def model_for(config: BamConfig, seed: int = 0) -> BamForCausalLM:
    torch.manual_seed(seed)
    model = BamForCausalLM(config).eval()
    with torch.no_grad():  # norms away from 1 and bigger routers, so every term matters
        for name, param in model.named_parameters():
            param.add_(torch.randn_like(param) * (0.5 if "router" in name else 0.05))
    return model


VARIANTS = {
    "dense": {},
    "btx": dict(n_ffn_experts=4, ffn_top_k=2),
    "bam": dict(n_attn_experts=3, n_ffn_experts=3),
    "bam-shared": dict(n_attn_experts=3, kv_shared=True, n_ffn_experts=3, ffn_top_k=2, ffn_renormalize=True),
    "bam-seq-layernorm": dict(n_attn_experts=2, n_ffn_experts=2, block="sequential", norm="layernorm"),
    "bam-topk-attn": dict(n_attn_experts=3, attn_routing="topk", attn_top_k=2, n_ffn_experts=3),
    "bam-qk-norm": dict(n_attn_experts=3, n_ffn_experts=3, qk_norm=True),
    "bam-shared-qk-norm": dict(n_attn_experts=3, kv_shared=True, n_ffn_experts=3, qk_norm=True),
    # OLMo 2's q/k norms over all heads, Granite's attention scale, a SmolLM3 NoPE layer (layer 0)
    "bam-qk-norm-all": dict(n_attn_experts=3, n_ffn_experts=3, qk_norm=True, qk_norm_scope="all"),
    "bam-shared-qk-norm-all": dict(n_attn_experts=3, kv_shared=True, n_ffn_experts=3, qk_norm=True,
                                   qk_norm_scope="all"),
    "bam-scaled-nope": dict(n_attn_experts=3, n_ffn_experts=3, attention_scale=0.05, nope_layers=[0]),
    "olmo2-post-norm": dict(n_attn_experts=2, n_ffn_experts=2, block="sequential", norm_placement="post",
                            qk_norm=True, qk_norm_scope="all"),
    "granite-multipliers": dict(n_attn_experts=2, n_ffn_experts=2, block="sequential", embedding_multiplier=3.0,
                                residual_multiplier=0.3, attention_scale=0.05, logit_scale=0.4, nope_layers=[1]),
    # a 3-key sliding window in layer 0 only (Qwen2/Cohere2-style layer_types), in every layer (Mistral)
    "bam-sliding": dict(n_attn_experts=3, n_ffn_experts=3, sliding_window=3,
                        layer_types=["sliding_attention", "full_attention"]),
    "bam-shared-sliding": dict(n_attn_experts=3, kv_shared=True, n_ffn_experts=3, sliding_window=3),
}


def naive_attention(attn, h_BTD, positions):
    """sum_j g_j(t) * Attn_j(H)_t with one explicit causal softmax attention per expert."""
    B, T, _ = h_BTD.shape
    N, H, Hkv, Dh = attn.n_experts, attn.n_heads, attn.n_kv_heads, attn.head_dim
    inv_freq = 1.0 / attn_theta ** (torch.arange(0, Dh, 2).float() / Dh)
    angles = positions[:, None].float() * inv_freq
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()

    def rope(x):  # x: (B, heads, T, Dh)
        if not attn.rope:  # a NoPE layer
            return x
        x1, x2 = x[..., : Dh // 2], x[..., Dh // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    def head_norm(x, norm):  # x: (B, T, experts, heads, Dh); expert e's weight is norm.weight[e*W:(e+1)*W]
        if norm is None:
            return x
        if attn.qk_norm_per_head:  # W = Dh, over each head
            weight = norm.weight.view(-1, 1, Dh)
            return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps)
        flat = x.flatten(-2)  # W = heads * Dh, over all of an expert's heads together
        weight = norm.weight.view(x.shape[2], -1)
        return (weight * flat * torch.rsqrt(flat.pow(2).mean(-1, keepdim=True) + norm.eps)).view_as(x)

    scale = attn.scale if attn.scale is not None else 1 / math.sqrt(Dh)

    q_all = head_norm(attn.q_proj(h_BTD).view(B, T, N, H, Dh), attn.q_norm)
    k_all = head_norm(attn.k_proj(h_BTD).view(B, T, -1, Hkv, Dh), attn.k_norm)
    v_all = attn.v_proj(h_BTD).view(B, T, -1, Hkv, Dh)
    gates = attn.gates(h_BTD) if attn.router is not None else torch.ones(B, T, 1)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    if attn.window is not None:  # a sliding layer: the latest `window` keys, the query's own included
        causal = causal & ~torch.ones(T, T, dtype=torch.bool).tril(-attn.window)
    mixed = 0
    for j in range(N):
        kv = 0 if attn.kv_shared else j
        q = rope(q_all[:, :, j].transpose(1, 2))
        k = rope(k_all[:, :, kv].transpose(1, 2)).repeat_interleave(H // Hkv, dim=1)
        v = v_all[:, :, kv].transpose(1, 2).repeat_interleave(H // Hkv, dim=1)
        scores = (q @ k.transpose(-1, -2)) * scale
        out = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v  # (B, H, T, Dh)
        o_j = attn.o_proj.weight[:, j * H * Dh:(j + 1) * H * Dh]
        mixed = mixed + gates[..., j:j + 1] * (out.transpose(1, 2).reshape(B, T, -1) @ o_j.T)
    return mixed


attn_theta = 10000.0


@pytest.mark.parametrize("variant", ["dense", "bam", "bam-shared", "bam-topk-attn", "bam-qk-norm",
                                     "bam-shared-qk-norm", "bam-qk-norm-all", "bam-shared-qk-norm-all",
                                     "bam-scaled-nope", "bam-sliding", "bam-shared-sliding"])
def test_mixture_of_attention_equals_naive_per_expert_attention(variant):
    config = tiny(**VARIANTS[variant])
    attn = model_for(config).model.layers[0].attn
    h = torch.randn(2, 9, config.hidden_size)
    positions = torch.arange(9)
    from bam.modeling.attention import rope_cos_sin

    cos_sin = rope_cos_sin(positions.expand(2, 9), config.head_dim, config.rope_parameters["rope_theta"], h.dtype)
    ours, _ = attn(h, cos_sin, AttentionMasks(None, 9, 0, h.device), None)
    torch.testing.assert_close(ours, naive_attention(attn, h, positions), atol=1e-5, rtol=1e-5)


def test_rope_matches_transformers_llama_in_value_and_gradient():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from bam.modeling.attention import apply_rope, rope_cos_sin

    B, T, H, Dh = 2, 7, 3, 16
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [3, 4, 5, 6, 7, 8, 9]])  # a cached prefix in row 1
    cos_half, sin_half = rope_cos_sin(positions, Dh, 500.0, torch.float64)
    cos, sin = torch.cat([cos_half, cos_half], -1), torch.cat([sin_half, sin_half], -1)  # Llama's tables
    # q as the attention module makes it: a permuted view of [B, T, H, Dh]
    x = torch.randn(B, T, H, Dh, dtype=torch.float64).transpose(1, 2).requires_grad_()
    grad = torch.randn(B, H, T, Dh, dtype=torch.float64)
    ours = apply_rope(x, cos_half, sin_half)
    reference, _ = apply_rotary_pos_emb(x, x, cos, sin)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-12)
    (ours_grad,) = torch.autograd.grad(ours, x, grad)
    (reference_grad,) = torch.autograd.grad(reference, x, grad)
    torch.testing.assert_close(ours_grad, reference_grad, rtol=0, atol=1e-12)
    assert torch.autograd.gradgradcheck(lambda t: apply_rope(t, cos_half, sin_half), (x,))


def test_default_rope_is_todays_formula_bit_for_bit():
    """rope_type 'default' (every model before rope_parameters) computes exactly what bam always did."""
    config = tiny(rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [3, 4, 5, 6, 7, 8, 9]])
    cos, sin = BamForCausalLM(config).model.rope(positions, torch.float32)
    Dh = config.head_dim
    inv_freq = 1.0 / 500000.0 ** (torch.arange(0, Dh, 2).float() / Dh)
    angles = positions.float()[..., None] * inv_freq
    assert torch.equal(cos, angles.cos()) and torch.equal(sin, angles.sin())


ROPE_SCALING = {
    "llama3": dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16),
    "linear": dict(factor=4.0),
    "dynamic": dict(factor=4.0),
    "yarn": dict(factor=4.0, original_max_position_embeddings=16),
    "longrope": dict(factor=4.0, original_max_position_embeddings=16, short_factor=[1.0 + 0.1 * i for i in range(4)],
                     long_factor=[1.0 + 0.7 * i for i in range(4)]),
}


@pytest.mark.parametrize("rope_type", sorted(ROPE_SCALING))
def test_scaled_rope_equals_transformers_rotary_embedding_bit_for_bit(rope_type):
    """cos/sin (the attention scaling folded in) for each RoPE scaling, against transformers'
    LlamaRotaryEmbedding over a sequence of calls: within the original context, past it, shorter
    again (dynamic keeps its stretched frequencies, longrope switches), back within it."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rope = {"rope_type": rope_type, "rope_theta": 10000.0, **ROPE_SCALING[rope_type]}
    max_len = 16 if rope_type == "dynamic" else 64  # the original context: dynamic's, else in `rope`
    config = tiny(max_position_embeddings=max_len, rope_parameters=dict(rope))
    theirs = LlamaRotaryEmbedding(LlamaConfig(hidden_size=32, num_attention_heads=4, head_dim=8,
                                              max_position_embeddings=max_len, rope_parameters=dict(rope)))
    ours = BamForCausalLM(config).model.rope
    plain = BamForCausalLM(tiny()).model.rope
    scaled_somewhere = False
    for length in (10, 40, 24, 12, 30):
        positions = torch.arange(length).expand(2, length)
        cos, sin = ours(positions, torch.float32)
        their_cos, their_sin = theirs(torch.zeros(1), positions)
        assert torch.equal(torch.cat([cos, cos], -1), their_cos) and torch.equal(torch.cat([sin, sin], -1), their_sin)
        scaled_somewhere |= not torch.equal(cos, plain(positions, torch.float32)[0])
    assert scaled_somewhere


@pytest.mark.parametrize("rope_type", sorted(ROPE_SCALING))
def test_rope_by_layer_type_equals_gemma3_rotary_embedding_bit_for_bit(rope_type):
    """rope_parameters nested by layer type (Gemma 3: plain local RoPE, scaled global RoPE): each
    type's cos/sin as transformers' Gemma3RotaryEmbedding computes it for that type, over the same
    sequence of calls (dynamic and longrope keep per-type state under transformers' per-type names)."""
    from transformers import Gemma3TextConfig
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding

    types = ["sliding_attention", "full_attention"]
    rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": rope_type, "rope_theta": 1000000.0, **ROPE_SCALING[rope_type]}}
    max_len = 16 if rope_type == "dynamic" else 64
    config = tiny(max_position_embeddings=max_len, sliding_window=8, layer_types=types,
                  rope_parameters=copy.deepcopy(rope))
    theirs = Gemma3RotaryEmbedding(Gemma3TextConfig(
        hidden_size=32, num_attention_heads=4, head_dim=8, num_hidden_layers=2, layer_types=types,
        max_position_embeddings=max_len, rope_parameters=copy.deepcopy(rope)))
    ours = BamForCausalLM(config).model.rope
    for length in (10, 40, 24, 12, 30):
        positions = torch.arange(length).expand(2, length)
        by_type = {kind: ours[kind](positions, torch.float32) for kind in types}
        for kind, (cos, sin) in by_type.items():
            their_cos, their_sin = theirs(torch.zeros(1), positions, kind)
            assert torch.equal(torch.cat([cos, cos], -1), their_cos)
            assert torch.equal(torch.cat([sin, sin], -1), their_sin)
        assert not torch.equal(*(cos for cos, _ in by_type.values()))


def test_config_json_with_only_rope_theta_still_loads(tmp_path):
    """A model directory written before rope_parameters carries a bare `rope_theta`: it loads as
    plain RoPE with that base, with the same logits, and is written back in the new form."""
    import json

    model = model_for(tiny(rope_parameters={"rope_type": "default", "rope_theta": 500000.0}))
    model.save_pretrained(tmp_path / "m")
    config_file = tmp_path / "m" / "config.json"
    fields = json.loads(config_file.read_text())
    del fields["rope_parameters"]
    config_file.write_text(json.dumps({**fields, "rope_theta": 500000.0}))
    old = BamForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert old.config.rope_parameters == {"rope_type": "default", "rope_theta": 500000.0}
    ids = torch.randint(0, 61, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(old(ids).logits, model(ids).logits)
    old.config.save_pretrained(tmp_path / "new")
    saved = json.loads((tmp_path / "new" / "config.json").read_text())
    assert "rope_theta" not in saved and saved["rope_parameters"]["rope_theta"] == 500000.0


def rms(x, norm):
    return norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps))


def test_post_norm_block_and_granite_multipliers_hand_computed():
    """OLMo 2's block (each sublayer reads the residual stream, its output is normalized before the
    add) with Granite's multipliers on embeddings, sublayer outputs and logits, written out."""
    config = tiny(**VARIANTS["olmo2-post-norm"], embedding_multiplier=3.0, residual_multiplier=0.3, logit_scale=0.4)
    model = model_for(config)
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x = model.model.embed_tokens(ids) * 3.0
        cos_sin = model.model.rope(torch.arange(9).expand(2, 9), x.dtype)
        for layer in model.model.layers:
            assert not hasattr(layer, "input_norm") and not hasattr(layer, "post_attention_norm")
            attn, _ = layer.attn(x, cos_sin, AttentionMasks(None, 9, 0, x.device), None)
            x = x + 0.3 * rms(attn, layer.attn_output_norm)
            x = x + 0.3 * rms(layer.ffn(x, False).y_BTD, layer.ffn_output_norm)
        expected = model.lm_head(rms(x, model.model.norm)) * 0.4
        torch.testing.assert_close(model(ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_new_options_at_their_defaults_compute_todays_numbers_bit_for_bit():
    """Spelling out every new field's default changes nothing, for either block."""
    defaults = dict(norm_placement="pre", qk_norm_scope="head", nope_layers=None, attention_scale=None,
                    embedding_multiplier=1.0, residual_multiplier=1.0)
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(0))
    for variant in ("bam", "bam-seq-layernorm", "bam-qk-norm"):
        with torch.no_grad():
            today = model_for(tiny(**VARIANTS[variant]))(ids).logits
            spelled = model_for(tiny(**VARIANTS[variant], **defaults))(ids).logits
        assert torch.equal(today, spelled)


@pytest.mark.parametrize("field, value, expected", [
    ("norm_placement", "middle", "one of"),
    ("qk_norm_scope", "token", "one of"),
    ("nope_layers", [2], "below num_hidden_layers=2"),
    ("nope_layers", [1, 0], "increasing"),
    ("attention_scale", 0.0, "positive"),
    ("embedding_multiplier", 0.0, "non-zero"),
    ("residual_multiplier", "1", "non-zero"),
    ("sliding_window", 0, "positive integer"),
    ("layer_types", ["full_attention"], "one per layer"),
    ("layer_types", ["sliding", "full_attention"], "each one of"),
    ("layer_types", ["sliding_attention", "full_attention"], "without a sliding_window"),
    ("hidden_act", "swiglu", "ACT2FN"),
    ("norm_weight_offset", "1", "a number"),
    ("attn_logit_softcapping", 0.0, "positive"),
    ("final_logit_softcapping", -30.0, "positive"),
    # nested by layer type without layer_types to say which layer has which
    ("rope_parameters", {"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                         "full_attention": {"rope_type": "default", "rope_theta": 1e6}}, "one per layer type"),
])
def test_new_config_fields_are_validated(field, value, expected):
    from bam.errors import BamError

    with pytest.raises(BamError, match=f"config field {field}=.*{expected}"):
        tiny(block="sequential", qk_norm=True, **{field: value})


def test_post_norm_needs_a_sequential_block_and_a_scope_needs_qk_norm():
    from bam.errors import BamError

    with pytest.raises(BamError, match="norm_placement='post'.*block='parallel'"):
        tiny(block="parallel", norm_placement="post")
    with pytest.raises(BamError, match="qk_norm_scope='all'.*unless qk_norm"):
        tiny(qk_norm_scope="all")


def test_kv_sharing_equals_kv_experts_when_experts_share_kv():
    experts = model_for(tiny(**VARIANTS["bam"]))
    shared = BamForCausalLM(tiny(**{**VARIANTS["bam"], "kv_shared": True})).eval()
    state = experts.state_dict()
    for name, tensor in shared.state_dict().items():
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            state[name] = state[name][: tensor.shape[0]]  # expert 0's K/V ...
            full = state[name].repeat(3, 1)  # ... given to every expert of the KV-experts model
            experts.state_dict()[name].copy_(full)
    shared.load_state_dict(state)
    ids = torch.randint(0, 61, (2, 11))
    torch.testing.assert_close(shared(ids).logits, experts(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("top_k, renormalize", [(1, False), (2, True), (3, False)])
def test_grouped_dispatch_equals_per_expert_loop(top_k, renormalize):
    config = tiny(n_ffn_experts=4, ffn_top_k=top_k, ffn_renormalize=renormalize)
    torch.manual_seed(0)
    grouped = MoEFFN(config)
    for p in grouped.parameters():
        torch.nn.init.normal_(p, std=0.3)
    loop = MoEFFN(tiny(n_ffn_experts=4, ffn_top_k=top_k, ffn_renormalize=renormalize, expert_dispatch="loop"))
    loop.load_state_dict(grouped.state_dict())
    h = torch.randn(3, 7, config.hidden_size)
    outs = []
    for ffn in (grouped, loop):
        h_leaf = h.clone().requires_grad_()
        out = ffn(h_leaf)
        # .sum() gives a stride-0 gradient, which grouped_mm's backward must survive
        (out.y_BTD.sum() + out.load_balancing_loss + out.z_loss).backward()
        outs.append((out.y_BTD, h_leaf.grad, [p.grad for p in ffn.parameters()]))
    (y_g, dh_g, dp_g), (y_l, dh_l, dp_l) = outs
    torch.testing.assert_close(y_g, y_l, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dh_g, dh_l, atol=1e-5, rtol=1e-5)
    for a, b in zip(dp_g, dp_l):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_expert_without_tokens_gets_a_zero_gradient_in_both_dispatches():
    # The loop's backward stacks per-expert gradients; an expert that received no token has none
    # to stack, and must come back as zeros, as from grouped_mm, not as garbage or an error.
    config = tiny(n_ffn_experts=4, ffn_top_k=1)
    grads = []
    for dispatch in ("grouped", "loop"):
        torch.manual_seed(0)
        ffn = MoEFFN(tiny(n_ffn_experts=4, ffn_top_k=1, expert_dispatch=dispatch))
        for p in ffn.parameters():
            torch.nn.init.normal_(p, std=0.3)
        with torch.no_grad():
            ffn.router.weight[3] = -100.0 * ffn.router.weight[:3].abs().sum(0)  # expert 3: never chosen
        h = torch.rand(2, 9, config.hidden_size) + 0.1  # positive, so expert 3's logit is very negative
        out = ffn(h)
        assert not (out.routing.expert_index_TK == 3).any()
        out.y_BTD.square().sum().backward()
        grads.append((ffn.experts.gate_up_proj.grad, ffn.experts.down_proj.grad))
    for gate_up, down in grads:
        assert gate_up[3].abs().max() == 0 and down[3].abs().max() == 0
        assert gate_up[:3].abs().max() > 0
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_moe_ffn_equals_explicit_gate_weighted_sum():
    config = tiny(n_ffn_experts=3, ffn_top_k=2)
    torch.manual_seed(1)
    ffn = MoEFFN(config)
    for p in ffn.parameters():
        torch.nn.init.normal_(p, std=0.3)
    h = torch.randn(5, config.hidden_size)
    probs = F.softmax(h @ ffn.router.weight.T, dim=-1)
    expected = torch.zeros_like(h)
    for t in range(5):
        for e in probs[t].topk(2).indices:  # BAM's rule: gate = p_e, not renormalized
            gate, up = (ffn.experts.gate_up_proj[e] @ h[t]).chunk(2)
            expected[t] += probs[t, e] * (ffn.experts.down_proj[e] @ (F.silu(gate) * up))
    torch.testing.assert_close(ffn(h[None]).y_BTD[0], expected, atol=1e-5, rtol=1e-5)


def test_softcapped_attention_equals_a_naive_capped_softmax():
    """Gemma 2's capped attention (SDPA cannot cap): per head, cap * tanh(scale q.k / cap), masked,
    softmax, times V, with consecutive query heads sharing a K/V head; causal when no mask is given,
    a bool mask otherwise; differentiable (gradcheck in fp64). The cap changes the result here."""
    from bam.modeling.attention import softcapped_attention

    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, heads, 5, 8, generator=generator, dtype=torch.float64) * 2 for heads in (4, 2, 2))
    scale, cap = 0.4, 1.5
    padding = torch.ones(2, 1, 5, 5, dtype=torch.bool).tril()
    padding[0, :, :, :2] = False  # row 0: two left-padded keys ...
    padding[0, :, :2, :] = True  # ... and its padded queries see every key, as attention_mask_for makes them

    def naive(mask):
        out = torch.empty_like(q)
        for b in range(2):
            for h in range(4):
                logits = q[b, h] @ k[b, h // 2].T * scale
                logits = (cap * torch.tanh(logits / cap)).masked_fill(~mask[b, 0], float("-inf"))
                out[b, h] = logits.softmax(-1) @ v[b, h // 2]
        return out

    causal = torch.ones(2, 1, 5, 5, dtype=torch.bool).tril()
    torch.testing.assert_close(softcapped_attention(q, k, v, None, scale, cap), naive(causal))
    torch.testing.assert_close(softcapped_attention(q, k, v, padding, scale, cap), naive(padding))
    uncapped = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    assert (uncapped - naive(causal)).abs().max() > 1e-2
    inputs = tuple(t.clone().requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(lambda *t: softcapped_attention(*t, padding, scale, cap), inputs)


@pytest.mark.parametrize("dispatch", ["grouped", "loop"])
def test_hidden_act_is_the_activation_of_every_expert(dispatch):
    """GeGLU (Gemma's hidden_act): the routed experts in either dispatch and the shared expert use
    it, by hand with transformers' own function; the Nexus router's projection stays SwiGLU."""
    from transformers.activations import ACT2FN

    gelu = ACT2FN["gelu_pytorch_tanh"]
    config = tiny(n_ffn_experts=3, ffn_top_k=2, hidden_act="gelu_pytorch_tanh", ffn_shared_expert=True,
                  ffn_router="nexus", nexus_embed_dim=8, nexus_hidden_dim=16, expert_dispatch=dispatch)
    torch.manual_seed(1)
    ffn = MoEFFN(config)
    for p in ffn.parameters():
        torch.nn.init.normal_(p, std=0.3)
    h = torch.randn(5, config.hidden_size)

    def gated(x, gate_up, down, act):
        gate, up = (gate_up @ x).chunk(2)
        return down @ (act(gate) * up)

    router = ffn.router
    embeddings = torch.stack([gated(d, router.gate_up_proj, router.down_proj, F.silu)
                              for d in router.domain_embeddings])
    probs = F.softmax(h @ embeddings.T, dim=-1)
    expected = torch.stack([gated(h[t], ffn.shared_expert.gate_up_proj, ffn.shared_expert.down_proj, gelu)
                            for t in range(5)])
    silu = expected.clone()
    for t in range(5):
        for e in probs[t].topk(2).indices:
            expected[t] += probs[t, e] * gated(h[t], ffn.experts.gate_up_proj[e], ffn.experts.down_proj[e], gelu)
            silu[t] += probs[t, e] * gated(h[t], ffn.experts.gate_up_proj[e], ffn.experts.down_proj[e], F.silu)
    actual = ffn(h[None]).y_BTD[0]
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    assert (actual - silu).abs().max() > 1e-2  # the activation matters here


def test_auxiliary_losses_hand_computed():
    # 4 tokens, 2 experts. probs rows: [.75,.25], [.75,.25], [.25,.75], [.5,.5] (top-1 picks 0,0,1,0)
    logits = torch.log(torch.tensor([[3.0, 1.0], [3.0, 1.0], [1.0, 3.0], [1.0, 1.0]]))
    probs = logits.softmax(-1)
    index = probs.topk(1).indices
    # f = [3/4, 1/4]; P = [(.75+.75+.25+.5)/4, (.25+.25+.75+.5)/4] = [.5625, .4375]
    # L = 2 * (.75*.5625 + .25*.4375) = 1.0625
    assert load_balancing_loss(probs, index).item() == pytest.approx(1.0625)
    # logsumexp of each row: log 4, log 4, log 4, log 2
    expected_z = (3 * math.log(4) ** 2 + math.log(2) ** 2) / 4
    assert router_z_loss(logits).item() == pytest.approx(expected_z)


def test_loss_adds_coefficient_weighted_aux_losses():
    config = tiny(n_ffn_experts=3, router_aux_loss_coef=0.5, router_z_loss_coef=0.25)
    model = model_for(config)
    ids = torch.randint(0, 61, (2, 9))
    out = model(ids, labels=ids)
    lm = F.cross_entropy(out.logits[:, :-1].reshape(-1, 61), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.lm_loss, lm)
    torch.testing.assert_close(out.loss, lm + 0.5 * out.load_balancing_loss + 0.25 * out.z_loss)
    assert model_for(tiny()).forward(ids, labels=ids).aux_loss is None


def test_aux_losses_only_in_training_or_with_a_loss_and_the_same_either_way():
    model = model_for(tiny(n_ffn_experts=3))  # eval mode
    ids = torch.randint(0, 61, (2, 9))
    inference = model(ids)
    assert inference.aux_loss is None and inference.load_balancing_loss is None and inference.z_loss is None
    scored = model(ids, labels=ids)
    torch.testing.assert_close(inference.logits, scored.logits, rtol=0, atol=0)
    model.train()
    training = model(ids)
    torch.testing.assert_close(training.load_balancing_loss, scored.load_balancing_loss)
    torch.testing.assert_close(training.z_loss, scored.z_loss)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_generation_with_kv_cache_equals_without(variant):
    model = model_for(tiny(**VARIANTS[variant]))
    prompt = torch.randint(0, 61, (2, 5), generator=torch.Generator().manual_seed(0))
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    with_cache = model.generate(prompt, use_cache=True, **kwargs)
    without = model.generate(prompt, use_cache=False, **kwargs)
    assert with_cache.tolist() == without.tolist()


@pytest.mark.parametrize("variant", ["dense", "bam", "bam-shared"])
def test_cache_holds_one_kv_per_kv_expert(variant):
    config = tiny(**VARIANTS[variant])
    out = model_for(config)(torch.randint(0, 61, (1, 6)), use_cache=True)
    keys = getattr(out, CACHE).layers[0].keys
    assert keys.shape == (1, config.n_kv_experts * config.num_key_value_heads, 6, config.head_dim)


def _reference_mask(keep_BS, q_len, past_len, kv_len, window):
    """The attention mask spelled out: query t (position past_len + t) sees key j (position
    past_len + q_len - kv_len + j) when it is not later, within the window, and not padding."""
    B = 1 if keep_BS is None else keep_BS.shape[0]
    mask = torch.zeros(B, 1, q_len, kv_len, dtype=torch.bool)
    for b in range(B):
        for t in range(q_len):
            p = past_len + t
            for j in range(kv_len):
                s = past_len + q_len - kv_len + j
                mask[b, 0, t, j] = (s <= p and (window is None or s > p - window)
                                    and (keep_BS is None or bool(keep_BS[b, s])))
            if not mask[b, 0, t].any():  # a padding row: sees everything, stays finite
                mask[b, 0, t] = True
    return mask


@pytest.mark.parametrize("q_len, past_len, kv_len, window, left_pad", [
    (6, 0, 6, None, 0), (6, 0, 6, 3, 0), (6, 0, 6, 8, 0), (6, 0, 6, 6, 0),
    (1, 7, 3, 3, 0),  # a decoding step against a sliding cache (window - 1 cached keys + this one)
    (1, 7, 8, 3, 0),  # the same step against a full cache
    (4, 5, 6, 3, 0),  # a chunk after a prefix, sliding cache
    (4, 5, 9, 3, 0), (4, 5, 9, None, 0),  # ... full cache
    (6, 0, 6, 3, 2), (6, 0, 6, None, 2), (1, 6, 3, 3, 2), (1, 6, 7, 3, 2), (3, 6, 5, 3, 4),
])
def test_attention_mask_equals_hand_built_reference(q_len, past_len, kv_len, window, left_pad):
    """Every mask our attention uses, or the one SDPA's is_causal stands for when it returns None
    (the top-left causal triangle for T > 1, every key for T = 1)."""
    from bam.modeling.attention import attention_mask_for

    keep_BS = None
    if left_pad:  # row 0 left-padded, row 1 not
        keep_BS = torch.ones(2, past_len + q_len, dtype=torch.long)
        keep_BS[0, :left_pad] = 0
    mask = attention_mask_for(keep_BS, q_len, past_len, "cpu", window, kv_len)
    expected = _reference_mask(keep_BS, q_len, past_len, kv_len, window)
    if mask is None:
        mask = torch.ones(q_len, kv_len, dtype=torch.bool).tril()[None, None] if q_len > 1 else \
            torch.ones(1, 1, 1, kv_len, dtype=torch.bool)
    assert torch.equal(mask.expand_as(expected), expected)


def test_sliding_layers_cache_keeps_the_window_as_the_cost_model_counts():
    """transformers' DynamicCache(config=...) gives a sliding layer a cache of its last window - 1
    positions (the rest are never seen again): of the 10 positions fed, layer 0 of "bam-sliding"
    keeps 2 and the full layer all 10, and bam.modeling.cost counts exactly the bytes held."""
    from bam.modeling import cost

    config = tiny(**VARIANTS["bam-sliding"])
    out = model_for(config).generate(torch.randint(0, 61, (1, 5)), max_new_tokens=6, do_sample=False,
                                     pad_token_id=0, return_dict_in_generate=True)
    cache = getattr(out, CACHE)
    assert [layer.keys.shape[2] for layer in cache.layers] == [2, 10]  # the last token is never cached
    held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert held == cost.kv_cache_bytes(config, 10, dtype_bytes=4)
    assert cost.kv_cache_bytes_per_token(config, 4, n_ctx=10) == held / 10
    dense = tiny()
    assert cost.kv_cache_bytes_per_token(dense, 4) == cost.kv_cache_bytes(dense, 10, 4) / 10


@pytest.mark.parametrize("variant", ["bam-shared", "bam-sliding", "bam-shared-sliding"])
def test_left_padded_batch_matches_unpadded_rows(variant):
    """(A sliding window counts positions, padding included, as transformers' does: the same shift
    for the query and its keys, so a padded row still sees its own latest keys.)"""
    model = model_for(tiny(**VARIANTS[variant]))
    short, long = torch.randint(1, 61, (1, 4)), torch.randint(1, 61, (1, 7))
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long])
    mask = torch.ones_like(batch)
    mask[0, :3] = 0
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(batch, attention_mask=mask, position_ids=position_ids).logits
    torch.testing.assert_close(logits[0, 3:], model(short).logits[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[1], model(long).logits[0], atol=1e-5, rtol=1e-5)


def test_outputs_are_transformers_own_and_hold_the_cache_where_transformers_puts_it():
    """An upstream rename of an output field (transformers 5.24: `past_key_values` -> `cache`, in
    outputs, in what generate() passes to forward, in what it reads back) must not break us. The
    reference is transformers' own Llama: whatever key its output holds the KV cache under, ours
    holds it there too, and a second call fed that cache under the same keyword continues exactly
    like one call over the whole sequence."""
    from dataclasses import fields

    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.cache_utils import Cache
    from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

    from bam.modeling.model import BamModelOutput, BamOutput

    for ours, theirs in ((BamOutput, CausalLMOutputWithPast), (BamModelOutput, BaseModelOutputWithPast)):
        assert issubclass(ours, theirs)
        assert [f.name for f in fields(theirs)] == [f.name for f in fields(ours)][:len(fields(theirs))]

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = llama(ids[:, :5], use_cache=True)
    cache_key = next(key for key, value in reference.items() if isinstance(value, Cache))

    model = model_for(tiny(**VARIANTS["bam"]))
    with torch.no_grad():
        first = model(ids[:, :5], use_cache=True)
        assert isinstance(first[cache_key], Cache) and isinstance(model.model(ids, use_cache=True)[cache_key], Cache)
        second = model(ids[:, 5:], use_cache=True, **{cache_key: first[cache_key]})
        whole = model(ids, use_cache=False)
    assert second[cache_key] is first[cache_key] and second[cache_key].get_seq_length() == 9
    torch.testing.assert_close(second.logits, whole.logits[:, 5:], rtol=1e-5, atol=1e-5)
