"""Cost accounting against hand-computed numbers, real parameter counts and counted matmul FLOPs."""

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bam.modeling import cost
from bam.formats.model_dir import save_model
from bam.cli import main
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
def test_params_total_equals_the_models_parameter_count(variant, tiny_config):
    config = tiny_config(**VARIANTS[variant])
    with torch.device("meta"):
        model = BamForCausalLM(config)
    assert cost.params_total(config) == sum(p.numel() for p in model.parameters())


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
