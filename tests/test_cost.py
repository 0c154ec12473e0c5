"""Cost accounting against hand-computed numbers, real parameter counts and counted matmul FLOPs."""

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bam.modeling import cost
from bam.modeling.config import full_experts_config
from bam.formats.model_dir import save_model
from bam.cli import main
from bam.errors import BamError
from bam.mix.mixing import mixed_config
from bam.modeling.model import BamForCausalLM

VARIANTS = {
    "dense": {},
    "btx": dict(n_ffn_experts=4, ffn_top_k=2),
    "bam": dict(n_attn_experts=3, n_ffn_experts=3),
    "bam-shared": dict(n_attn_experts=3, kv_shared=True, n_ffn_experts=3, ffn_top_k=2),
    "bam-sequential-bias-tied": dict(n_attn_experts=2, n_ffn_experts=2, block="sequential", qkv_bias=True,
                                     tie_word_embeddings=True),
    "bam-wide-heads": dict(n_attn_experts=2, n_ffn_experts=2, head_dim=24),  # H*Dh = 96 != d
}


def inspect_json(path, *extra, capsys) -> dict:
    capsys.readouterr()
    assert main(["inspect", str(path), "--json", *extra]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1  # exactly one JSON object on one line
    return json.loads(out)


# ---------------------------------------------------------------------------------------------
# Hand-computed numbers for one small config (d 64, d_ff 128, V 128, 2 layers, 4 heads of 16, 2 KV heads)


def test_inspect_dense_hand_checked(tiny_config, random_model, tmp_path, capsys):
    save_model(random_model(tiny_config()), tmp_path / "dense")
    s = inspect_json(tmp_path / "dense", "--n-ctx", "256", "--dtype-bytes", "2", capsys=capsys)

    # Per layer: input norm 64; q 64*64; k, v 32*64 each; o 64*64; SwiGLU 3*64*128.
    layer = 64 + 64 * 64 + 2 * 32 * 64 + 64 * 64 + 3 * 64 * 128
    assert layer == 36928
    total = 128 * 64 + 2 * layer + 64 + 128 * 64  # embedding, 2 layers, final norm, LM head
    assert s["params_total"] == total == 90304
    assert s["params_active"] == total

    # METHOD.md 5 with N = k = 1: q 2*d*64 + k,v 2*d*2*32; scores 2*n_ctx*64; o 2*64*d; FFN 6*d*d_ff.
    layer_flops = 2 * 64 * (64 + 2 * 32) + 2 * 256 * 64 + 2 * 64 * 64 + 6 * 64 * 128
    assert s["flops_per_token"] == 2 * layer_flops + 2 * 64 * 128 == 229376  # + LM head 2*d*V
    assert s["training_flops_per_token"] == 3 * s["flops_per_token"]
    assert s["kv_cache_bytes_per_token"] == 2 * 2 * 32 * 2  # layers * (K, V) * H_kv*Dh * bytes
    assert s["config"]["layout"] == "dense" and s["config"]["n_ffn_experts"] == 1


def test_inspect_bam_hand_checked(tiny_config, random_model, tmp_path, capsys):
    dense = random_model(tiny_config())
    save_model(dense, tmp_path / "d")
    dense_dir = str(tmp_path / "d")
    assert main(["mix", "--method", "bam", "--out", str(tmp_path / "bam"), dense_dir, dense_dir]) == 0
    s = inspect_json(tmp_path / "bam", "--n-ctx", "100", "--dtype-bytes", "2", capsys=capsys)

    # N = 2 attention experts with their own q, k, v, o; 2 FFN experts, top-1; routers [2, 64] each.
    shared = 64
    attention = 2 * (64 * 64 + 2 * 32 * 64 + 64 * 64)
    routers = 2 * 64 + 2 * 64
    expert = 3 * 64 * 128
    assert s["params_total"] == 2 * 128 * 64 + 64 + 2 * (shared + attention + routers + 2 * expert) == 164544
    assert s["params_active"] == 2 * 128 * 64 + 64 + 2 * (shared + attention + routers + 1 * expert) == 115392

    per_layer = (2 * 2 * 64                       # attention router 2Nd
                 + 2 * 64 * 2 * (64 + 2 * 32)     # Q, K, V of both experts
                 + 2 * 2 * 100 * 64               # scores and mixing 2N n_ctx (H*Dh)
                 + 2 * 2 * 64 * 64                # output projections 2Nd^2
                 + 2 * 2 * 64                     # FFN router 2Ed
                 + 6 * 1 * 64 * 128)              # FFN, top-1
    assert s["flops_per_token"] == 2 * per_layer + 2 * 64 * 128
    assert s["kv_cache_bytes_per_token"] == 2 * 2 * 2 * 32 * 2  # N = 2 KV caches
    assert s["config"]["layout"] == "bam" and s["config"]["n_attn_experts"] == 2


def test_inspect_table_and_dtype_from_checkpoint(tiny_config, random_model, tmp_path, capsys):
    save_model(random_model(tiny_config()).to(torch.bfloat16), tmp_path / "bf16")
    assert inspect_json(tmp_path / "bf16", capsys=capsys)["dtype_bytes"] == 2
    save_model(random_model(tiny_config()), tmp_path / "f32")
    assert inspect_json(tmp_path / "f32", capsys=capsys)["kv_cache_bytes_per_token"] == 2 * 2 * 32 * 4
    assert main(["inspect", str(tmp_path / "f32")]) == 0
    table = capsys.readouterr().out
    assert "90,304" in table and "229,376" in table and "512 bytes/token" in table


def test_inspect_bad_n_ctx_is_one_line_error(tiny_config, random_model, tmp_path, capsys):
    save_model(random_model(tiny_config()), tmp_path / "m")
    assert main(["inspect", str(tmp_path / "m"), "--n-ctx", "0"]) == 2
    assert "--n-ctx" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Invariants across variants


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_active_params_drop_exactly_the_unrouted_experts(variant, tiny_config):
    config = tiny_config(**VARIANTS[variant])
    unrouted = config.n_ffn_experts - config.ffn_top_k
    expected = cost.params_total(config) - config.num_hidden_layers * unrouted * 3 * 64 * 128
    assert cost.params_active(config) == expected
    assert (cost.params_active(config) < cost.params_total(config)) == (unrouted > 0)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_projection_flops_match_counted_matmuls(variant, tiny_config, random_model):
    """Everything but the n_ctx term is matmuls: torch's FLOP counter on a forward pass must agree.

    (SDPA is not counted by FlopCounterMode on CPU, and n_ctx=0 removes our attention-score term.)
    """
    config = tiny_config(**VARIANTS[variant], expert_dispatch="loop")
    model = random_model(config)
    tokens = 11
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randint(0, 128, (1, tokens)), use_cache=False)
    counts = counter.get_flop_counts()["Global"]
    matmul_flops = sum(counts.get(op, 0) for op in (torch.ops.aten.mm, torch.ops.aten.addmm))
    assert matmul_flops == tokens * cost.flops_per_token(config, n_ctx=0)


def test_method_formulas_for_multi_head_attention(tiny_config):
    """With H_kv = H and Dh = d/H, the per-layer terms are METHOD.md 5's formulas verbatim."""
    d, f, n, k, n_ctx = 64, 128, 3, 2, 256
    base = tiny_config(num_key_value_heads=4)
    bam = mixed_config(base, "bam", n, top_k=k)
    shared = mixed_config(base, "bam-shared", n, top_k=k)
    btx = mixed_config(base, "btx", n, top_k=k)
    common = 2 * n * n_ctx * d + 2 * n * d * d + 2 * n * d + 3 * k * d * f * 2
    assert sum(cost.layer_flops(bam, n_ctx).values()) == 2 * n * d + 6 * n * d * d + common
    assert sum(cost.layer_flops(shared, n_ctx).values()) == 2 * n * d + 2 * n * d * d + 4 * d * d + common
    assert sum(cost.layer_flops(btx, n_ctx).values()) == (6 * d * d + 2 * n_ctx * d + 2 * d * d
                                                          + 2 * n * d + 3 * k * d * f * 2)


def test_kv_cache_ratios(tiny_config):
    dense = tiny_config()
    for n in (2, 4):
        btx, bam, shared = (mixed_config(dense, m, n) for m in ("btx", "bam", "bam-shared"))
        assert cost.kv_cache_bytes_per_token(bam, 2) == n * cost.kv_cache_bytes_per_token(btx, 2)
        assert cost.kv_cache_bytes_per_token(shared, 2) == cost.kv_cache_bytes_per_token(btx, 2)
        assert cost.kv_cache_bytes_per_token(btx, 2) == cost.kv_cache_bytes_per_token(dense, 2)


def test_inspect_hf_directory(tmp_path, capsys):
    """A Hugging Face Llama directory: our count equals transformers' own parameter count."""
    import transformers
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(tmp_path / "llama")
    s = inspect_json(tmp_path / "llama", capsys=capsys)
    assert s["params_total"] == s["params_active"] == model.num_parameters()
    assert s["config"]["block"] == "sequential"


# ---------------------------------------------------------------------------------------------
# Adapter experts (METHOD.md 7) and attention experts mixing parameters, on the tiny config
# (d 64, d_ff 128, V 128, 2 layers, q = 4 heads * 16 = 64, kv = 2 KV heads * 16 = 32)

ALL_LORA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ALL_IA3 = ["q_proj", "k_proj", "v_proj", "down_proj"]
ADAPTER_EXPERTS = dict(n_attn_experts=3, n_ffn_experts=3, ffn_top_k=2, adapter_experts=True)
LORA = dict(adapter="lora", lora_rank=4, lora_alpha=8)
ADAPTER_VARIANTS = {
    "lora-outputs": dict(**ADAPTER_EXPERTS, **LORA, adapter_targets=ALL_LORA),
    "lora-parameters": dict(**ADAPTER_EXPERTS, **LORA, adapter_targets=ALL_LORA, attn_mixing="parameters"),
    "lora-kv-shared-outputs": dict(**ADAPTER_EXPERTS, **LORA, kv_shared=True,
                                   adapter_targets=["q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "lora-kv-shared-parameters": dict(**ADAPTER_EXPERTS, **LORA, kv_shared=True, attn_mixing="parameters",
                                      adapter_targets=["q_proj", "o_proj", "down_proj"]),
    "lora-ffn-only": dict(n_ffn_experts=4, ffn_top_k=2, adapter_experts=True, **LORA,
                          adapter_targets=["gate_proj", "up_proj", "down_proj"]),  # lora-btx
    "ia3-outputs": dict(**ADAPTER_EXPERTS, adapter="ia3", adapter_targets=ALL_IA3),
    "ia3-parameters": dict(**ADAPTER_EXPERTS, adapter="ia3", adapter_targets=ALL_IA3, attn_mixing="parameters"),
    "ia3-kv-shared-parameters": dict(**ADAPTER_EXPERTS, adapter="ia3", kv_shared=True, attn_mixing="parameters",
                                     adapter_targets=["q_proj", "down_proj"]),
    "full-parameters": dict(n_attn_experts=3, n_ffn_experts=3, ffn_top_k=2, attn_mixing="parameters"),
    "full-kv-shared-parameters": dict(n_attn_experts=3, kv_shared=True, n_ffn_experts=3, attn_mixing="parameters"),
    "dense-lora": dict(**LORA, adapter_targets=ALL_LORA),  # one adapter on a dense model
}


@pytest.mark.parametrize("variant", sorted({**VARIANTS, **ADAPTER_VARIANTS}))
def test_params_total_equals_the_models_parameter_count(variant, tiny_config):
    config = tiny_config(**{**VARIANTS, **ADAPTER_VARIANTS}[variant])
    with torch.device("meta"):
        model = BamForCausalLM(config)
    assert cost.params_total(config) == sum(p.numel() for p in model.parameters())


def test_adapter_experts_params_hand_checked(tiny_config):
    """3 LoRA experts of rank 4 on every projection, top-2 of 3 FFN experts. A projection I -> O
    holds r*(I + O) per expert; the seed's weights once."""
    config = tiny_config(**ADAPTER_VARIANTS["lora-outputs"])
    seed_attention = 64 * 64 + 2 * 32 * 64 + 64 * 64                            # q, k, v, o once
    attn_adapters = 3 * (4 * (64 + 64) + 2 * 4 * (64 + 32) + 4 * (64 + 64))       # q, k, v, o per expert
    seed_ffn = 2 * 128 * 64 + 64 * 128                                          # gate_up, down once
    ffn_adapter = 2 * 4 * (64 + 128) + 4 * (128 + 64)                           # gate, up, down: one expert's
    routers = 3 * 64 + 3 * 64
    layer = 64 + seed_attention + attn_adapters + routers + seed_ffn + 3 * ffn_adapter
    outside = 128 * 64 + 64 + 128 * 64                                          # embedding, final norm, head
    assert cost.params_total(config) == outside + 2 * layer == 115648
    # active: the seed's FFN serves every token; of the FFN adapters only the top-2 experts'
    assert cost.params_active(config) == outside + 2 * (layer - ffn_adapter) == 111040
    assert cost.summarize(config)["params_adapter"] == 2 * (attn_adapters + 3 * ffn_adapter)

    ia3 = tiny_config(**ADAPTER_VARIANTS["ia3-parameters"])  # vectors: q 64, k 32, v 32; down_proj's input 128
    layer = 64 + seed_attention + 3 * (64 + 32 + 32) + routers + seed_ffn + 3 * 128
    assert cost.params_total(ia3) == outside + 2 * layer
    assert cost.params_active(ia3) == outside + 2 * (layer - 128)


def test_full_experts_mixing_parameters_count_every_attention_expert_as_active(tiny_config):
    """Mixing parameters puts every expert's q/k/v/o in the mixed projection: only the unrouted FFN
    experts are inactive, as when mixing outputs."""
    outputs = tiny_config(n_attn_experts=3, n_ffn_experts=3, ffn_top_k=2)
    parameters = tiny_config(**ADAPTER_VARIANTS["full-parameters"])
    assert cost.params_total(parameters) == cost.params_total(outputs)
    assert cost.params_active(parameters) == cost.params_total(parameters) - 2 * 1 * 3 * 64 * 128


def test_one_adapter_on_a_dense_model_is_active_in_full(tiny_config):
    dense, one_adapter = tiny_config(), tiny_config(**ADAPTER_VARIANTS["dense-lora"])
    adapter = 2 * (4 * (64 + 64) + 2 * 4 * (64 + 32) + 4 * (64 + 64) + 2 * 4 * (64 + 128) + 4 * (128 + 64))
    assert cost.params_active(one_adapter) == cost.params_total(one_adapter) == cost.params_total(dense) + adapter


def test_adapter_experts_flops_hand_checked(tiny_config):
    """Per layer and token, n_ctx 100: the seed's projections and FFN once; each LoRA update 2*r*(I + O)
    for every attention expert (3) and for the token's top-2 FFN experts; attention scores once per
    attention computed (3 mixing outputs, 1 mixing parameters)."""
    seed = (2 * 64 * (64 + 2 * 32)    # Q, K, V: the seed's, once
            + 2 * 64 * 64             # output projection, once (W_o sum_j g_j o_j)
            + 6 * 64 * 128)           # the seed's SwiGLU FFN, once for both routed experts
    routers = 2 * 3 * 64 + 2 * 3 * 64
    lora = (3 * 2 * 4 * (64 + 64)         # q: 3 experts, I = d, O = q
            + 2 * 3 * 2 * 4 * (64 + 32)   # k, v: 3 experts each, O = kv
            + 3 * 2 * 4 * (64 + 64)       # o: 3 experts, I = q, O = d
            + 2 * 2 * 2 * 4 * (64 + 128)  # gate and up: top-2 experts, 2 pieces, O = d_ff
            + 2 * 2 * 4 * (128 + 64))     # down: top-2 experts, I = d_ff
    assert lora == 19968
    head = 2 * 64 * 128
    outputs = tiny_config(**ADAPTER_VARIANTS["lora-outputs"])
    parameters = tiny_config(**ADAPTER_VARIANTS["lora-parameters"])
    assert cost.layer_flops(outputs, 100)["adapters"] == lora
    assert cost.flops_per_token(outputs, 100) == 2 * (seed + routers + lora + 3 * 2 * 100 * 64) + head == 282112
    assert cost.flops_per_token(parameters, 100) == 2 * (seed + routers + lora + 1 * 2 * 100 * 64) + head == 230912
    # (IA)³ scales elementwise: the seed's cost plus the routers
    ia3 = tiny_config(**ADAPTER_VARIANTS["ia3-parameters"])
    assert cost.flops_per_token(ia3, 100) == 2 * (seed + routers + 2 * 100 * 64) + head


def test_mixing_parameters_of_full_experts_keeps_the_projections_and_computes_one_attention(tiny_config):
    """METHOD.md 5's formulas (as in test_method_formulas_for_multi_head_attention) with the N
    attention-score terms replaced by one: every expert's projections, one attention."""
    d, f, n, k, n_ctx = 64, 128, 3, 2, 256
    base = tiny_config(num_key_value_heads=4)
    for method, qkv in (("bam", 6 * n * d * d), ("bam-shared", 2 * n * d * d + 4 * d * d)):
        config = mixed_config(base, method, n, top_k=k)
        config.attn_mixing = "parameters"
        expected = 2 * n * d + qkv + 2 * 1 * n_ctx * d + 2 * n * d * d + 2 * n * d + 3 * k * d * f * 2
        assert sum(cost.layer_flops(config, n_ctx).values()) == expected


# Gating products the cost model leaves out (O(Na*d), like biases) but torch computes as matmuls:
# the gate-weighted sum of full experts' q/k/v outputs (an einsum torch runs as bmm) and of the
# experts' (IA)³ vectors on q/k/v (gates @ l), 2 * Na * width per token and layer.
GATING_MATMULS = {"full-parameters": 2 * 3 * (64 + 32 + 32), "full-kv-shared-parameters": 2 * 3 * 64,
                  "ia3-parameters": 2 * 3 * (64 + 32 + 32), "ia3-kv-shared-parameters": 2 * 3 * 64}


def block_diagonal_overhead(config) -> int:
    """Per token and layer, the zero blocks adapter experts multiply (bam/modeling/adapters.py): every
    expert's update is one matmul, block-diagonal where the experts' must stay apart, so E times the
    FLOPs the cost model counts: B of q/k/v when attention experts mix outputs, A of o_proj always."""
    from bam.modeling.layout import adapted_projections

    if config.adapter != "lora" or not config.adapter_experts:
        return 0
    extra = 0
    for name, width_in, width_out, _ in adapted_projections(config, "attn"):
        n = config.projection_experts(name)
        if name == "o_proj":
            extra += 2 * config.lora_rank * width_in * n * (n - 1)
        elif config.attn_mixing == "outputs":
            extra += 2 * config.lora_rank * width_out * n * (n - 1)
    return extra


@pytest.mark.parametrize("variant", sorted(ADAPTER_VARIANTS))
def test_adapter_and_parameter_mixing_flops_match_counted_matmuls(variant, tiny_config, random_model):
    """As test_projection_flops_match_counted_matmuls: torch's FLOP counter (mm, addmm and the bmm of
    the per-expert einsums) on a forward pass, with n_ctx=0 (SDPA is not counted on CPU); what the
    counter sees beyond the cost model is the gating products and the block-diagonal zero blocks."""
    config = tiny_config(**ADAPTER_VARIANTS[variant], expert_dispatch="loop")
    model = random_model(config)
    tokens = 11
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randint(0, 128, (1, tokens)), use_cache=False)
    counts = counter.get_flop_counts()["Global"]
    matmul_flops = sum(counts.get(op, 0) for op in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm))
    gating = config.num_hidden_layers * (GATING_MATMULS.get(variant, 0) + block_diagonal_overhead(config))
    assert matmul_flops == tokens * (cost.flops_per_token(config, n_ctx=0) + gating)


@pytest.mark.parametrize("variant", ["lora-outputs", "lora-parameters", "ia3-outputs", "lora-kv-shared-outputs",
                                     "full-parameters"])
def test_kv_bytes_equal_what_the_cache_holds(variant, tiny_config, random_model):
    """config.n_kv_caches K/V sets per layer: one per K/V expert mixing outputs, one mixing parameters."""
    from transformers import DynamicCache

    from bam.modeling.model import CACHE

    config = tiny_config(**ADAPTER_VARIANTS[variant])
    with torch.no_grad():
        out = random_model(config)(torch.randint(0, 128, (1, 10)), use_cache=True,
                                   **{CACHE: DynamicCache(config=config)})
    cache = getattr(out, CACHE)
    held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert held == cost.kv_cache_bytes(config, 10, dtype_bytes=4) == 10 * cost.kv_cache_bytes_per_token(config, 4)
    sets = 1 if config.attn_mixing == "parameters" else config.n_kv_experts
    assert held == 10 * 2 * 2 * sets * 32 * 4  # positions * layers * (K, V) * sets * H_kv*Dh * fp32


def test_adapter_experts_against_their_full_expert_twin(tiny_config):
    """The comparison the report prints: the twin is `bam mix --materialize`'s config, and its costs
    are the full-expert MoE's (hand-checked differences: N - 1 more copies of the seed's weights,
    no adapters)."""
    from bam.mix.adapter_mix import materialized

    config = tiny_config(**ADAPTER_VARIANTS["lora-outputs"])
    twin = full_experts_config(config)
    assert twin.to_dict() == materialized(config, read=None)[0].to_dict()  # (read only when tensors are)
    with torch.device("meta"):
        twin_model = BamForCausalLM(twin)
    both = cost.adapter_vs_full_experts(config, n_ctx=100, dtype_bytes=4)
    low, full = both["adapter_experts"], both["full_experts"]
    assert full["params_total"] == sum(p.numel() for p in twin_model.parameters())
    attention, ffn = 64 * 64 + 2 * 32 * 64 + 64 * 64, 3 * 64 * 128  # one expert's weights
    attn_adapters = 3 * (4 * (64 + 64) + 2 * 4 * (64 + 32) + 4 * (64 + 64))
    ffn_adapter = 2 * 4 * (64 + 128) + 4 * (128 + 64)
    assert full["params_total"] == low["params_total"] + 2 * (2 * attention + 2 * ffn - attn_adapters - 3 * ffn_adapter)
    assert full["params_active"] == low["params_active"] + 2 * (2 * attention + ffn - attn_adapters - 2 * ffn_adapter)
    # FLOPs: 2 more copies of each attention projection, 1 more FFN (top-2), no LoRA updates
    assert full["flops_per_token"] == low["flops_per_token"] + 2 * (2 * 2 * attention + 6 * 64 * 128 - 19968)
    assert full["kv_cache_bytes_per_token"] == low["kv_cache_bytes_per_token"] == 2 * 2 * 3 * 32 * 4
    assert cost.summarize(config, 100, 4)["full_experts"] == full
    assert cost.summarize(tiny_config())["full_experts"] is None
    with pytest.raises(BamError, match="adapter_experts"):
        full_experts_config(tiny_config())


def test_inspect_shows_adapter_experts(tiny_config, random_model, tmp_path, capsys):
    config = tiny_config(**ADAPTER_VARIANTS["lora-parameters"])
    save_model(random_model(config), tmp_path / "moe")
    s = inspect_json(tmp_path / "moe", "--n-ctx", "100", capsys=capsys)
    c = s["config"]
    assert (c["adapter"], c["lora_rank"], c["adapter_experts"], c["attn_mixing"], c["n_kv_caches"]) == \
        ("lora", 4, True, "parameters", 1)
    assert c["layout"] == "lora-bam" and s["params_adapter"] == cost.summarize(config)["params_adapter"]
    assert s["full_experts"] == cost.costs(full_experts_config(config), 100, 4)
    assert main(["inspect", str(tmp_path / "moe")]) == 0
    table = capsys.readouterr().out
    assert "mixing parameters" in table and "1 K/V set per layer" in table
    assert "lora rank 4 (alpha 8) per expert on q, k, v, o, gate, up, down" in table
    assert "as full experts" in table and f"{s['full_experts']['params_total']:,}" in table


@pytest.mark.parametrize("mixing", ["outputs", "parameters"])
def test_inspect_of_mixed_adapters_against_the_materialized_mixture(mixing, tmp_path, capsys):
    """`bam mix --base` of two PEFT LoRAs and the seed: `bam inspect` counts the parameters the model
    holds, and its full-expert comparison is `bam inspect` of the same mix with --materialize."""
    from _adapter_assets import make_peft_adapter, make_seed

    from bam.formats.model_dir import load_model

    make_seed(tmp_path / "seed")
    adapters = []
    for i in range(2):
        adapters.append(str(tmp_path / f"lora{i}"))
        make_peft_adapter(tmp_path / "seed", tmp_path / f"lora{i}", "lora", weights_seed=10 + i)
    mix = ["mix", "--method", "bam", "--base", str(tmp_path / "seed"), "--attn-mixing", mixing, "--top-k", "2"]
    assert main([*mix, "--out", str(tmp_path / "low"), *adapters]) == 0
    assert main([*mix, "--materialize", "--out", str(tmp_path / "full"), *adapters]) == 0
    low = inspect_json(tmp_path / "low", "--n-ctx", "64", capsys=capsys)
    full = inspect_json(tmp_path / "full", "--n-ctx", "64", capsys=capsys)
    assert low["params_total"] == sum(p.numel() for p in load_model(tmp_path / "low").parameters())
    assert low["full_experts"] == {key: full[key] for key in low["full_experts"]}
    assert full["full_experts"] is None and not full["config"]["adapter_experts"]
    assert low["params_total"] < full["params_total"] and low["flops_per_token"] < full["flops_per_token"]
