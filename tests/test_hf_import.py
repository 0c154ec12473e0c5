"""Parity with transformers' own models: an imported dense checkpoint gives the same logits."""

import dataclasses

import pytest
import torch
import transformers

import bam  # noqa: F401  (registers the Auto classes)
from bam.formats.model_dir import load_model
from bam.errors import BamError

SHAPE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)

GRANITE = dict(embedding_multiplier=3.0, residual_multiplier=0.3, attention_multiplier=0.05, logits_scaling=2.5)
SMOLLM3 = dict(no_rope_layer_interval=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {"sliding_window": None}),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {"head_dim": 16}),  # its default is 128
    "cohere": (transformers.CohereConfig, transformers.CohereForCausalLM, {"logit_scale": 0.5}),
    "olmo2": (transformers.Olmo2Config, transformers.Olmo2ForCausalLM, {}),
    # every multiplier away from 1 (and the softmax scale from 1/sqrt(16)); a logits_scaling that is
    # not a power of two, whose reciprocal (our logit_scale) is not exact
    "granite": (transformers.GraniteConfig, transformers.GraniteForCausalLM, GRANITE),
    # a NoPE layer every second layer: layer 1 of 3; tied embeddings (its default)
    "smollm3": (transformers.SmolLM3Config, transformers.SmolLM3ForCausalLM, SMOLLM3),
}

# Llama with each RoPE scaling transformers implements, set so that scaling changes the function on
# LONG positions: factor > 1 and an original context (original_max_position_embeddings, or for
# `dynamic` max_position_embeddings) of 16, which LONG passes and generation crosses.
LONG = 40
ROPE_SCALING = {
    "llama3": dict(rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
                                        high_freq_factor=4.0, original_max_position_embeddings=16)),
    "linear": dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=4.0)),
    "dynamic": dict(max_position_embeddings=16, rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0,
                                                                      factor=4.0)),
    "yarn": dict(rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=8.0,
                                      original_max_position_embeddings=16)),
    "longrope": dict(rope_parameters=dict(rope_type="longrope", rope_theta=10000.0, factor=8.0,
                                          original_max_position_embeddings=16,
                                          short_factor=[1.0 + 0.1 * i for i in range(8)],  # head_dim / 2 each
                                          long_factor=[1.0 + 0.7 * i for i in range(8)])),
}
SCALED = [f"llama-{rope_type}" for rope_type in sorted(ROPE_SCALING)]
FAMILIES.update({f"llama-{rope_type}": (transformers.LlamaConfig, transformers.LlamaForCausalLM, extra)
                 for rope_type, extra in ROPE_SCALING.items()})

# Phi-3: fused qkv_proj and gate_up_proj, RoPE on 12 of each head's 16 dims (Phi-4-mini's 0.75), a
# sliding window (8) shorter than the tests' sequences; Phi-3.5's LongRoPE with its original context
# as Phi-3 configs hold it, a top-level original_max_position_embeddings (16, which LONG passes).
PHI3_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)  # its defaults are past our vocabulary
PARTIAL = dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.75)
PHI3 = dict(**PHI3_IDS, sliding_window=8, rope_parameters=PARTIAL)
PHI3_LONGROPE = dict(**PHI3_IDS, original_max_position_embeddings=16, rope_parameters=dict(
    rope_type="longrope", rope_theta=10000.0, partial_rotary_factor=0.75,
    short_factor=[1.0 + 0.1 * i for i in range(6)], long_factor=[1.0 + 0.7 * i for i in range(6)]))  # rotary_dim/2 each
FAMILIES.update({"phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM, PHI3),
                 "phi3-longrope": (transformers.Phi3Config, transformers.Phi3ForCausalLM, PHI3_LONGROPE)})
NEW_FAMILIES = ["qwen3", "olmo2", "granite", "smollm3", *SCALED, "phi3", "phi3-longrope"]
# Families whose tests run past an original context of 16 positions (RoPE scaling applies there).
PAST_ORIGINAL_CONTEXT = [*SCALED, "phi3-longrope"]

# Sliding-window attention (a window of 8, which LONG and generation pass): Mistral in every layer;
# Qwen2/Qwen3 from layer max_window_layers=1 on (transformers computes their layer_types); SmolLM3 in
# its NoPE layer (layer 1); Cohere2 (Cohere's block) in layers 0 and 2, RoPE there only, layer 1
# global without positions.
WINDOW = dict(sliding_window=8)
QWEN_WINDOW = dict(use_sliding_window=True, sliding_window=8, max_window_layers=1)
COHERE2 = dict(logit_scale=0.5, sliding_window=8, layer_types=["sliding_attention", "full_attention",
                                                               "sliding_attention"])
FAMILIES.update({
    "mistral-sliding": (transformers.MistralConfig, transformers.MistralForCausalLM, WINDOW),
    "qwen2-sliding": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, QWEN_WINDOW),
    "qwen3-sliding": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {"head_dim": 16, **QWEN_WINDOW}),
    "smollm3-sliding": (transformers.SmolLM3Config, transformers.SmolLM3ForCausalLM,
                        {**SMOLLM3, "use_sliding_window": True, **WINDOW}),
    "cohere2": (transformers.Cohere2Config, transformers.Cohere2ForCausalLM, COHERE2),
})
SLIDING = ["mistral-sliding", "qwen2-sliding", "qwen3-sliding", "smollm3-sliding", "cohere2"]
NEW_FAMILIES += SLIDING

# Gemma: GeGLU (gelu_pytorch_tanh), norms x * (1 + w), embeddings times sqrt(64), head_dim 24 (not
# 64 / 4) and tied embeddings in all three. Gemma 2 and 3: sandwich norms, softmax scale
# query_pre_attn_scalar^-0.5 (not head_dim^-0.5), a window of 8 in layers 0 and 2. Gemma 2: attention
# and final logits capped at values these small random weights reach (the released 50 and 30 would
# change nothing here). Gemma 3: per-head q/k norms, local RoPE (theta 1e4) in the sliding layers and
# global RoPE (theta 1e6, linear scaling by 8, as released) in the full one.
GEMMA_LAYERS = ["sliding_attention", "full_attention", "sliding_attention"]
GEMMA2 = dict(head_dim=24, query_pre_attn_scalar=4, sliding_window=8, layer_types=GEMMA_LAYERS,
              attn_logit_softcapping=1.0, final_logit_softcapping=0.5)
GEMMA3_ROPE = {"sliding_attention": dict(rope_type="default", rope_theta=10000.0),
               "full_attention": dict(rope_type="linear", rope_theta=1000000.0, factor=8.0)}
GEMMA3 = dict(head_dim=24, query_pre_attn_scalar=4, sliding_window=8, layer_types=GEMMA_LAYERS,
              rope_parameters=GEMMA3_ROPE)
FAMILIES.update({
    "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM, {"head_dim": 24}),
    "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM, GEMMA2),
    "gemma3_text": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM, GEMMA3),
})
GEMMAS = ["gemma", "gemma2", "gemma3_text"]
SLIDING_GEMMAS = ["gemma2", "gemma3_text"]
NEW_FAMILIES += GEMMAS

# GPT-NeoX (Pythia), multi-head attention (no num_key_value_heads): its defaults are Pythia's, a
# parallel block with a LayerNorm (with bias) per sublayer, GELU MLP with biases, q/k/v and output
# biases, RoPE on rotary_pct=0.25 of each head's 16 dims; here with a RoPE base of 500 (its
# rotary_emb_base). The sequential variant (use_parallel_residual=False) without attention biases,
# gelu_new, half the dims rotated.
FAMILIES.update({
    "gpt_neox": (transformers.GPTNeoXConfig, transformers.GPTNeoXForCausalLM, {"rotary_emb_base": 500.0}),
    "gpt_neox-sequential": (transformers.GPTNeoXConfig, transformers.GPTNeoXForCausalLM,
                            dict(use_parallel_residual=False, attention_bias=False, hidden_act="gelu_new",
                                 rotary_pct=0.5)),
})
NEW_FAMILIES += ["gpt_neox", "gpt_neox-sequential"]


def seq_len(family: str, usual: int) -> int:
    """Past the original context where RoPE scaling applies and past the sliding window (LONG), else
    the length the test always used."""
    return LONG if family in PAST_ORIGINAL_CONTEXT + SLIDING + SLIDING_GEMMAS else usual


def make_hf_model(family: str, out, seed: int = 0, **overrides):
    """A tiny random transformers model with every parameter perturbed (norms too) and saved."""
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    # the SHAPE fields the family's config has (GPT-NeoX has no num_key_value_heads)
    shape = {k: v for k, v in SHAPE.items() if k in {field.name for field in dataclasses.fields(config_cls)}}
    config = config_cls(**{**shape, **extra, **overrides})
    model = model_cls(config).float().eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    model.save_pretrained(out)
    return model


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_imported_logits_match_transformers(family, tmp_path):
    reference = make_hf_model(family, tmp_path / family)
    ours = load_model(tmp_path / family)
    input_ids = torch.randint(0, SHAPE["vocab_size"], (2, seq_len(family, 17)),
                              generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(input_ids).logits
        actual = ours(input_ids).logits
    assert (actual - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("rope_type", sorted(ROPE_SCALING))
def test_rope_scaling_changes_the_function_it_is_tested_on(rope_type, tmp_path):
    """The scaled-RoPE parity tests would prove nothing if scaling did not matter at their length:
    the same weights with plain RoPE give clearly different logits there."""
    family = f"llama-{rope_type}"
    reference = make_hf_model(family, tmp_path / "scaled")
    plain = make_hf_model(family, tmp_path / "plain", rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    input_ids = torch.randint(0, SHAPE["vocab_size"], (2, LONG), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (reference(input_ids).logits - plain(input_ids).logits).abs().max().item() > 1e-2


def test_dynamic_rope_keeps_transformers_state_across_calls(tmp_path):
    """transformers' dynamic NTK RoPE keeps state across calls (its frequencies depend on the longest
    sequence seen since the last one within max_position_embeddings, in transformers 5.24): ours
    follows the same sequence of calls with the same numbers."""
    reference = make_hf_model("llama-dynamic", tmp_path / "m")
    ours = load_model(tmp_path / "m")
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for length in (LONG, 24, 10, 30, 12):  # grow, stay stretched, reset, grow, reset
            input_ids = torch.randint(0, SHAPE["vocab_size"], (1, length), generator=generator)
            assert (ours(input_ids).logits - reference(input_ids).logits).abs().max().item() < 1e-4


@pytest.mark.parametrize("family", ["llama", "cohere", *NEW_FAMILIES])
def test_imported_generation_matches_transformers(family, tmp_path):
    """Greedy generation with the KV cache; with scaled RoPE from a prompt inside the original
    context to past it, so the frequencies change mid-generation (longrope, dynamic)."""
    reference = make_hf_model(family, tmp_path / family, seed=3)
    ours = load_model(tmp_path / family)
    prompt_len, new = (10, 20) if family in PAST_ORIGINAL_CONTEXT + SLIDING + SLIDING_GEMMAS else (5, 12)
    prompt = torch.randint(0, SHAPE["vocab_size"], (1, prompt_len), generator=torch.Generator().manual_seed(2))
    kwargs = dict(max_new_tokens=new, do_sample=False, pad_token_id=0)
    assert ours.generate(prompt, **kwargs).tolist() == reference.generate(prompt, **kwargs).tolist()


def test_tied_embeddings_are_shared(tmp_path):
    make_hf_model("cohere", tmp_path / "c", tie_word_embeddings=True)
    ours = load_model(tmp_path / "c")
    assert ours.lm_head.weight is ours.model.embed_tokens.weight


@pytest.mark.parametrize("family, overrides, feature", [
    ("cohere", {"use_qk_norm": True}, "use_qk_norm"),
    ("llama", {"attention_bias": True}, "attention_bias"),
    ("llama", {"hidden_act": "gelu"}, "hidden_act"),
    ("llama", {"rope_parameters": PARTIAL}, "partial rotary embeddings .partial_rotary_factor=0.75"),
    ("qwen3", {"attention_bias": True}, "attention_bias"),
    ("olmo2", {"attention_bias": True}, "attention_bias"),
    ("granite", {"attention_bias": True}, "attention_bias"),
    ("granite", {"mlp_bias": True}, "mlp_bias"),
    ("smollm3", {"attention_bias": True}, "attention_bias"),
    ("cohere2", {"attention_bias": True}, "attention_bias"),
])
def test_unsupported_features_are_named(family, overrides, feature, tmp_path):
    make_hf_model(family, tmp_path / "m", **overrides)
    with pytest.raises(BamError, match=feature):
        load_model(tmp_path / "m")


# Each option the new families' parity tests rely on, switched back to Llama's behaviour in
# transformers' own config: the logits clearly differ, so the parity above tests the option.
PLAIN = {
    "granite": [{"embedding_multiplier": 1.0}, {"residual_multiplier": 1.0}, {"logits_scaling": 1.0},
                {"attention_multiplier": 0.25}],  # 1/sqrt(head_dim)
    "smollm3": [{"no_rope_layers": [1, 1, 1]}],
    "phi3": [{"sliding_window": None}, {"rope_parameters": {**PARTIAL, "partial_rotary_factor": 1.0}}],
    "phi3-longrope": [{"rope_parameters": PARTIAL}],  # plain RoPE on the same 12 dims
    # GPT-NeoX: the sequential block (the same tensors, both norms), every dim rotated, RoPE base 1e4
    "gpt_neox": [{"use_parallel_residual": False}, {"rotary_pct": 1.0}, {"rotary_emb_base": 10000.0}],
    "gpt_neox-sequential": [{"hidden_act": "relu"}, {"rotary_pct": 1.0}],
    # the window of 8 made wider than any sequence of the tests; Cohere2 with every layer sliding
    # (layer 1 then has RoPE and the window)
    **{family: [{"sliding_window": 4096}] for family in SLIDING},
    "cohere2": [{"sliding_window": 4096}, {"layer_types": ["sliding_attention"] * 3}],
    # Gemma: silu for GELU, 1/sqrt(head_dim) for query_pre_attn_scalar, no caps, no window, one RoPE
    # (the local one) for both layer types; what transformers cannot switch off: GEMMA_OURS_PLAIN
    "gemma": [{"hidden_act": "silu"}],
    "gemma2": [{"hidden_activation": "silu"}, {"query_pre_attn_scalar": 24}, {"attn_logit_softcapping": None},
               {"final_logit_softcapping": None}, {"sliding_window": 4096}],
    "gemma3_text": [{"query_pre_attn_scalar": 24}, {"sliding_window": 4096},
                    {"rope_parameters": {kind: GEMMA3_ROPE["sliding_attention"] for kind in GEMMA3_ROPE}}],
}


@pytest.mark.parametrize("family, plain", [(f, p) for f, options in PLAIN.items() for p in options],
                         ids=lambda v: v if isinstance(v, str) else next(iter(v)))
def test_each_new_option_changes_the_function_it_is_tested_on(family, plain, tmp_path):
    reference = make_hf_model(family, tmp_path / "with")
    without = make_hf_model(family, tmp_path / "without", **plain)
    input_ids = torch.randint(0, SHAPE["vocab_size"], (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (reference(input_ids).logits - without(input_ids).logits).abs().max().item() > 1e-3


def test_new_families_translate_to_their_options(tmp_path):
    """What each family is in our config (the parity tests show these compute the same function)."""
    expected = {
        "olmo2": dict(norm_placement="post", qk_norm=True, qk_norm_scope="all"),
        "granite": dict(embedding_multiplier=3.0, residual_multiplier=0.3, attention_scale=0.05, logit_scale=0.4),
        "smollm3": dict(nope_layers=[1], tie_word_embeddings=True),
        "phi3": dict(sliding_window=8, layer_types=None, rotary_dim=12, head_dim=16),
        "gpt_neox": dict(block="parallel", parallel_ffn_norm=True, norm="layernorm", norm_bias=True, hidden_act="gelu",
                         ffn_gated=False, ffn_bias=True, qkv_bias=True, attn_output_bias=True, rotary_dim=4,
                         num_key_value_heads=4),
        "gpt_neox-sequential": dict(block="sequential", parallel_ffn_norm=False, hidden_act="gelu_new",
                                    qkv_bias=False, attn_output_bias=False, rotary_dim=8),
        "mistral-sliding": dict(sliding_window=8, layer_types=None),  # every layer
        "qwen2": dict(sliding_window=None, layer_types=None),  # use_sliding_window=False: none
        "qwen2-sliding": dict(sliding_window=8, layer_types=["full_attention"] + ["sliding_attention"] * 2),
        "smollm3-sliding": dict(sliding_window=8, layer_types=["full_attention", "sliding_attention", "full_attention"],
                                nope_layers=[1]),
        "cohere2": dict(sliding_window=8, layer_types=COHERE2["layer_types"], nope_layers=[1], block="parallel",
                        norm="layernorm", logit_scale=0.5),
        "gemma": dict(hidden_act="gelu_pytorch_tanh", norm_weight_offset=1.0, embedding_multiplier=8.0,
                      embedding_multiplier_in_lookup=True, head_dim=24, tie_word_embeddings=True, norm_placement="pre",
                      attention_scale=None),
        "gemma2": dict(hidden_act="gelu_pytorch_tanh", norm_placement="sandwich", attention_scale=0.5,
                       attn_logit_softcapping=1.0, final_logit_softcapping=0.5, sliding_window=8,
                       layer_types=GEMMA_LAYERS, qk_norm=False),
        "gemma3_text": dict(norm_placement="sandwich", qk_norm=True, qk_norm_scope="head", attention_scale=0.5,
                            attn_logit_softcapping=None, final_logit_softcapping=None, rope_parameters=GEMMA3_ROPE),
    }
    for family, fields in expected.items():
        make_hf_model(family, tmp_path / family)
        config = load_model(tmp_path / family).config
        assert {field: getattr(config, field) for field in fields} == fields


def test_rope_type_bam_does_not_compute_is_named(tmp_path):
    """A RoPE type outside transformers' scaling rules we compute (Gemma 4's `proportional`; older
    transformers cannot even build that Llama, so only the config is written: it is refused first)."""
    rope = {"rope_type": "proportional", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    transformers.LlamaConfig(**SHAPE, rope_parameters=rope).save_pretrained(tmp_path / "m")
    with pytest.raises(BamError, match="rope_type='proportional'"):
        load_model(tmp_path / "m")


# Phi (1, 1.5, 2): every checkpoint has a bias on its LM head, which our model lacks; the error lists
# each feature the config actually uses (and none it does not). The rest of Phi (LayerNorm with a
# bias, a non-gated MLP and attention with biases, partial rotary) is GPT-NeoX's, which we import.
REFUSED = {"phi": (transformers.PhiConfig, transformers.PhiForCausalLM)}


@pytest.mark.parametrize("family, overrides, named, not_named", [
    ("phi", {}, ["a bias on the LM head"], ["qk_layernorm", "non-gated MLP", "partial rotary"]),
    ("phi", {"qk_layernorm": True}, ["a bias on the LM head", "qk_layernorm=True"], []),
])
def test_phi_refusals_name_the_features(family, overrides, named, not_named, tmp_path):
    config_cls, model_cls = REFUSED[family]
    shape = {k: v for k, v in SHAPE.items() if k != "num_key_value_heads"}
    model_cls(config_cls(**{**shape, **overrides})).save_pretrained(tmp_path / family)
    with pytest.raises(BamError) as err:
        load_model(tmp_path / family)
    message = str(err.value)
    assert "\n" not in message and f"{family} checkpoint uses" in message
    assert "which bam's model cannot express" in message
    for feature in named:
        assert feature in message
    for feature in not_named:
        assert feature not in message


def test_refused_family_is_refused_by_mix(tmp_path, capsys):
    from bam.cli import main

    config_cls, model_cls = REFUSED["phi"]
    shape = {k: v for k, v in SHAPE.items() if k != "num_key_value_heads"}
    model_cls(config_cls(**shape)).save_pretrained(tmp_path / "phi")
    assert main(["mix", str(tmp_path / "phi"), "--method", "upcycle", "--num-experts", "2",
                 "--out", str(tmp_path / "moe")]) == 2
    assert "a bias on the LM head" in capsys.readouterr().err
    assert not (tmp_path / "moe").exists()


@pytest.mark.parametrize("family", ["llama", "cohere", *NEW_FAMILIES])
@pytest.mark.parametrize("method", ["btx", "bam", "bam-shared", "upcycle"])
def test_mix_of_identical_hf_copies_preserves_function(family, method, tmp_path):
    """METHOD.md section 4, through the CLI, straight from transformers checkpoints."""
    from bam.cli import main

    reference = make_hf_model(family, tmp_path / "hf", seed=5)
    sources = [str(tmp_path / "hf")] * (1 if method == "upcycle" else 3)
    extra = ["--num-experts", "3"] if method == "upcycle" else []
    out = tmp_path / "moe"
    assert main(["mix", "--method", method, "--top-k", "2", "--renormalize", *extra,
                 "--out", str(out), *sources]) == 0
    moe = load_model(out)
    assert moe.config.n_ffn_experts == 3 and moe.config.ffn_top_k == 2
    input_ids = torch.randint(0, SHAPE["vocab_size"], (2, seq_len(family, 13)),
                              generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (moe(input_ids).logits - reference(input_ids).logits).abs().max().item() < 1e-4


@pytest.mark.parametrize("method", ["btx", "bam", "bam-shared"])
def test_olmo2_full_width_qk_norms_are_kept_per_attention_expert(method, tmp_path):
    """Two different OLMo 2 experts: BAM puts each expert's [H*Dh] q_norm (and [H_kv*Dh] k_norm) in
    its slot, BAM-shared keeps q_norm per expert and averages k_norm with the shared K/V, BTX
    averages both; the output norms are averaged by every method."""
    from bam.cli import main

    experts = [make_hf_model("olmo2", tmp_path / f"e{j}", seed=j) for j in range(2)]
    assert main(["mix", "--method", method, "--out", str(tmp_path / "moe"), str(tmp_path / "e0"),
                 str(tmp_path / "e1")]) == 0
    state = load_model(tmp_path / "moe").state_dict()

    def theirs(name):
        return [expert.state_dict()[f"model.layers.1.{name}"] for expert in experts]

    stacked_q, stacked_k = method in ("bam", "bam-shared"), method == "bam"
    for ours, name, stacked in (("attn.q_norm.weight", "self_attn.q_norm.weight", stacked_q),
                                ("attn.k_norm.weight", "self_attn.k_norm.weight", stacked_k),
                                ("attn_output_norm.weight", "post_attention_layernorm.weight", False),
                                ("ffn_output_norm.weight", "post_feedforward_layernorm.weight", False)):
        expected = torch.cat(theirs(name)) if stacked else (theirs(name)[0] + theirs(name)[1]) / 2
        torch.testing.assert_close(state[f"model.layers.1.{ours}"], expected, rtol=0, atol=1e-7)


def test_hf_export_of_new_options_runs_without_bam(tmp_path):
    """`bam export --format hf` bundles our modeling code: a BAM mix of Qwen3 copies (qk_norm) with
    YaRN, and a BAM-shared mix of Llama copies with dynamic RoPE (its state across the logits call
    and generate()), give our logits and tokens in a Python that cannot import bam."""
    from bam.cli import main
    from test_export import INPUT_IDS, ours, run_outside

    yarn = dict(rope_type="yarn", rope_theta=10000.0, factor=8.0, original_max_position_embeddings=8)
    cases = {"qwen3_yarn": ("qwen3", "bam", dict(rope_parameters=yarn)),
             "llama_dynamic": ("llama-dynamic", "bam-shared", dict(max_position_embeddings=8))}
    exported = {}
    for name, (family, method, overrides) in cases.items():
        make_hf_model(family, tmp_path / name, **overrides)
        assert main(["mix", "--method", method, "--top-k", "2", "--out", str(tmp_path / f"{name}.moe"),
                     *[str(tmp_path / name)] * 2]) == 0
        exported[name] = tmp_path / f"{name}.hf"
        assert main(["export", str(tmp_path / f"{name}.moe"), "--format", "hf", "--out", str(exported[name])]) == 0
    outside = run_outside(exported, tmp_path / "outside", remote_code=True)
    assert INPUT_IDS.shape[1] > 8  # past the original context of both
    for name in cases:
        logits, tokens = ours(tmp_path / f"{name}.moe")
        assert outside[name]["tokens"] == tokens
        assert (torch.tensor(outside[name]["logits"]) - logits).abs().max().item() < 1e-5


@pytest.mark.parametrize("family", SCALED)
def test_scaled_rope_exports_back_to_llama(family, tmp_path):
    """The RoPE description travels to the exported config, and transformers' Llama computes the same
    logits from it past the original context (export's own parity check ran on 24 > 16 tokens)."""
    from bam.cli import main

    reference = make_hf_model(family, tmp_path / "m")
    assert main(["export", str(tmp_path / "m"), "--format", "llama", "--out", str(tmp_path / "out")]) == 0
    exported = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert exported.config.rope_parameters == reference.config.rope_parameters
    input_ids = torch.randint(0, SHAPE["vocab_size"], (2, LONG), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert (exported(input_ids).logits - reference(input_ids).logits).abs().max().item() < 1e-4


# What a standard export cannot express in each new family: one reason per option, each naming it.
STANDARD_REFUSALS = {
    "olmo2": ["all heads' queries and keys (qk_norm)", "norm_placement='post'"],
    "granite": ["attention_scale=0.05", "embedding_multiplier=3.0", "residual_multiplier=0.3", "logit_scale=0.4"],
    "smollm3": ["layers [1] of this model have no positional encoding (nope_layers)"],
}


@pytest.mark.parametrize("family", sorted(STANDARD_REFUSALS))
def test_new_options_block_standard_exports_pointing_to_hf(family, tmp_path, capsys):
    from bam.cli import main
    from bam.formats.export import export_blockers

    make_hf_model(family, tmp_path / "m")
    capsys.readouterr()  # transformers' progress bar while saving
    assert main(["export", str(tmp_path / "m"), "--format", "mixtral", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.strip().endswith("(use --format hf)") and not (tmp_path / "out").exists()
    for reason in STANDARD_REFUSALS[family]:
        assert reason in err
    config = load_model(tmp_path / "m").config
    for fmt in ("mixtral", "qwen2_moe"):  # the families' own formats: tests/test_export.py
        reasons = [reason for reason, alternative in export_blockers(config, fmt) if alternative == "hf"]
        assert len(reasons) == len(STANDARD_REFUSALS[family])
        for expected in STANDARD_REFUSALS[family]:
            assert sum(expected in reason for reason in reasons) == 1
    # OLMoE's q/k norms are OLMo 2's, but bam does not write OLMoE: only hf remains
    olmoe = export_blockers(config, "olmoe")
    assert olmoe == [("bam does not write OLMoE checkpoints", "hf")] if family == "olmo2" else olmoe[0][1] == "qwen2_moe"


# Each family's options in a mixture, through `--format hf` (our code travels with the weights),
# with the method that exercises them most: per attention expert, BAM stacks OLMo 2's full-width
# q/k norms, Gemma 2's capped attention and Gemma 3's per-head q/k norms and local/global RoPE;
# sliding windows (Cohere2, Qwen2, Mistral, Gemma 2/3, Phi-3: 17 positions and 12 new tokens run
# past the window of 8) apply to every expert; GPT-NeoX brings biases everywhere and GELU experts.
REMOTE_CODE_MIXES = {
    "olmo2": "bam", "granite": "bam-shared", "smollm3": "btx",
    "cohere2": "bam", "qwen2-sliding": "bam-shared", "mistral-sliding": "btx",
    "gemma": "btx", "gemma2": "bam", "gemma3_text": "bam-shared",
    "phi3": "bam", "gpt_neox": "bam-shared", "gpt_neox-sequential": "btx",
}


def test_hf_export_of_each_family_mix_runs_without_bam(tmp_path):
    """`bam export --format hf` of a mix of two copies of each family's seed (REMOTE_CODE_MIXES):
    our logits and greedy tokens come out the same in a Python without bam (one run for all)."""
    from bam.cli import main
    from test_export import INPUT_IDS, ours, run_outside

    exported = {}
    for family, method in REMOTE_CODE_MIXES.items():
        make_hf_model(family, tmp_path / family)
        moe = tmp_path / f"{family}.moe"
        assert main(["mix", "--method", method, "--top-k", "2", "--out", str(moe), *[str(tmp_path / family)] * 2]) == 0
        exported[family] = tmp_path / f"{family}.hf"
        assert main(["export", str(moe), "--format", "hf", "--out", str(exported[family])]) == 0
    outside = run_outside(exported, tmp_path / "outside", remote_code=True)
    assert INPUT_IDS.shape[1] > 8
    for family in REMOTE_CODE_MIXES:
        logits, tokens = ours(tmp_path / f"{family}.moe")
        assert outside[family]["tokens"] == tokens, family
        assert (torch.tensor(outside[family]["logits"]) - logits).abs().max().item() < 1e-5, family


def test_qwen3_export_to_llama_is_refused_naming_qk_norm(tmp_path, capsys):
    from bam.cli import main

    make_hf_model("qwen3", tmp_path / "m")
    assert main(["export", str(tmp_path / "m"), "--format", "llama", "--out", str(tmp_path / "out")]) == 2
    assert "qk_norm" in capsys.readouterr().err and not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# Sliding-window attention (SLIDING): beyond the parity, generation and mixing tests above


@pytest.mark.parametrize("family", SLIDING + SLIDING_GEMMAS)  # Gemma 2: the mask through capped attention
def test_sliding_window_left_padded_batch_matches_transformers(family, tmp_path):
    """Left padding shifts a row's queries and keys alike, so its window is the same keys as
    transformers' (whose mask counts positions, padding included): logits at every real position
    and greedy tokens past the window."""
    reference = make_hf_model(family, tmp_path / family, seed=4)
    ours = load_model(tmp_path / family)
    input_ids = torch.randint(1, SHAPE["vocab_size"], (2, 14), generator=torch.Generator().manual_seed(3))
    attention_mask = torch.ones_like(input_ids)
    input_ids[0, :5], attention_mask[0, :5] = 0, 0
    with torch.no_grad():
        expected = reference(input_ids, attention_mask=attention_mask).logits
        actual = ours(input_ids, attention_mask=attention_mask).logits
    real = attention_mask.bool()
    assert (actual[real] - expected[real]).abs().max().item() < 1e-4
    kwargs = dict(attention_mask=attention_mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert ours.generate(input_ids, **kwargs).tolist() == reference.generate(input_ids, **kwargs).tolist()


@pytest.mark.parametrize("family", ["mistral-sliding", "cohere2"])
def test_sliding_cache_is_transformers_own_and_the_cost_model_counts_it(family, tmp_path):
    """We keep transformers' cache: DynamicCache(config=...) reads our sliding_window/layer_types and
    gives each sliding layer a cache of its last window - 1 positions, exactly as transformers' own
    model holds it after the same generation; bam.modeling.cost counts those bytes."""
    from bam.modeling import cost
    from bam.modeling.model import CACHE

    reference = make_hf_model(family, tmp_path / family, seed=2)
    ours = load_model(tmp_path / family)
    prompt = torch.randint(0, SHAPE["vocab_size"], (1, 6), generator=torch.Generator().manual_seed(5))
    kwargs = dict(max_new_tokens=15, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    caches = [getattr(model.generate(prompt, **kwargs), CACHE) for model in (ours, reference)]
    lengths = [[layer.keys.shape[2] for layer in cache.layers] for cache in caches]
    assert lengths[0] == lengths[1] == [20 if t is None else 7 for t in map(ours.config.attention_window, range(3))]
    held = sum(t.numel() * t.element_size() for layer in caches[0].layers for t in (layer.keys, layer.values))
    assert held == cost.kv_cache_bytes(ours.config, 20, dtype_bytes=4)


@pytest.mark.parametrize("family", SLIDING)
def test_sliding_families_export_back_to_their_own_format(family, tmp_path):
    """`--format source` writes the family's own config with its window (export's parity check ran
    on 24 > 8 tokens), and transformers' class computes the reference's logits from it."""
    from bam.cli import main

    reference = make_hf_model(family, tmp_path / "m")
    assert main(["export", str(tmp_path / "m"), "--format", "source", "--out", str(tmp_path / "out")]) == 0
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(exported) is type(reference)
    assert exported.config.sliding_window == 8
    assert getattr(exported.config, "layer_types", None) == getattr(reference.config, "layer_types", None)
    input_ids = torch.randint(0, SHAPE["vocab_size"], (2, LONG), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert (exported(input_ids).logits - reference(input_ids).logits).abs().max().item() < 1e-4


def test_sliding_window_exports_to_the_moe_formats_that_express_it(tmp_path, capsys):
    """Mixtral's sliding_window applies to every layer: a BTX mix of Mistral copies with a window in
    every layer exports to it exactly (parity checked on 24 > 8 tokens), and so does a BTX mix of
    Qwen2 copies with sliding layers 1-2 to Qwen2-MoE (whose layer_types name them); Mixtral refuses
    the latter naming the layers. Llama refuses a window."""
    from bam.cli import main
    from bam.formats.export import export_blockers

    for family, fmt in (("mistral-sliding", "mixtral"), ("qwen2-sliding", "qwen2_moe")):
        reference = make_hf_model(family, tmp_path / family)
        moe = tmp_path / f"{family}.moe"
        assert main(["mix", "--method", "btx", "--top-k", "2", "--renormalize", "--out", str(moe),
                     *[str(tmp_path / family)] * 3]) == 0
        assert main(["export", str(moe), "--format", fmt, "--out", str(tmp_path / f"{family}.{fmt}")]) == 0
        exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / f"{family}.{fmt}").eval()
        input_ids = torch.randint(0, SHAPE["vocab_size"], (2, LONG), generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            assert (exported(input_ids).logits - reference(input_ids).logits).abs().max().item() < 1e-4
    reasons = [reason for reason, _ in export_blockers(load_model(tmp_path / "qwen2-sliding.moe").config, "mixtral")]
    assert "only layers [1, 2] of this model attend to a sliding window" in "; ".join(reasons)
    capsys.readouterr()
    assert main(["export", str(tmp_path / "mistral-sliding"), "--format", "llama", "--out", str(tmp_path / "x")]) == 2
    assert "sliding_window=8" in capsys.readouterr().err and not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------------
# Gemma, Gemma 2, Gemma 3 (GEMMAS): beyond the parity, generation and mixing tests above


# What transformers' Gemma classes cannot switch off, switched off in our config of the imported
# model (same weights): each changes the logits, so the parity tests test it.
GEMMA_OURS_PLAIN = [
    ("gemma", {"norm_weight_offset": 0.0}), ("gemma", {"embedding_multiplier": 1.0}),
    ("gemma2", {"norm_placement": "pre"}), ("gemma3_text", {"norm_weight_offset": 0.0}),
    ("gemma3_text", {"qk_norm": False}),
]


@pytest.mark.parametrize("family, plain", GEMMA_OURS_PLAIN, ids=lambda v: v if isinstance(v, str) else next(iter(v)))
def test_gemma_options_transformers_cannot_switch_off_change_the_function(family, plain, tmp_path):
    from bam.modeling.config import BamConfig
    from bam.modeling.model import BamForCausalLM

    make_hf_model(family, tmp_path / "m")
    ours = load_model(tmp_path / "m")
    without = BamForCausalLM(BamConfig.from_dict({**ours.config.to_dict(), **plain})).eval()
    missing, _ = without.load_state_dict(ours.state_dict(), strict=False)  # dropped norms: unexpected keys
    assert not missing
    input_ids = torch.randint(0, SHAPE["vocab_size"], (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(input_ids).logits - without(input_ids).logits).abs().max().item() > 1e-3


def test_gemma3_ignores_attn_logit_softcapping_as_transformers_does(tmp_path):
    """Gemma 3's attention passes no soft-cap to its attention function (QK norms replaced it), so a
    config that sets one computes as without: so do we, and the option stays off."""
    reference = make_hf_model("gemma3_text", tmp_path / "m", attn_logit_softcapping=0.05)
    ours = load_model(tmp_path / "m")
    assert ours.config.attn_logit_softcapping is None
    input_ids = torch.randint(0, SHAPE["vocab_size"], (2, LONG), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(input_ids).logits - reference(input_ids).logits).abs().max().item() < 1e-4


@pytest.mark.parametrize("family, overrides, feature", [
    ("gemma2", {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ("gemma3_text", {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ("gemma", {"attention_bias": True}, "attention_bias"),
])
def test_gemma_features_bam_cannot_compute_are_named(family, overrides, feature, tmp_path):
    make_hf_model(family, tmp_path / "m", **overrides)
    with pytest.raises(BamError, match=feature):
        load_model(tmp_path / "m")


def test_gemma_options_block_the_moe_formats_pointing_to_hf(tmp_path):
    """Mixtral and Qwen2-MoE compute none of Gemma's options: each is a reason naming it, with hf."""
    from bam.formats.export import export_blockers

    expected = {
        "gemma": ["hidden_act='gelu_pytorch_tanh'", "norm_weight_offset", "embedding_multiplier=8.0"],
        "gemma2": ["hidden_act='gelu_pytorch_tanh'", "norm_weight_offset", "embedding_multiplier=8.0",
                   "norm_placement='sandwich'", "attention_scale=0.5", "attn_logit_softcapping=1.0",
                   "final_logit_softcapping=0.5"],
        "gemma3_text": ["hidden_act='gelu_pytorch_tanh'", "norm_weight_offset", "embedding_multiplier=8.0",
                        "norm_placement='sandwich'", "attention_scale=0.5", "each head's queries and keys (qk_norm)",
                        "rope_parameters by layer type"],
    }
    for family, named in expected.items():
        make_hf_model(family, tmp_path / family)
        config = load_model(tmp_path / family).config
        for fmt in ("mixtral", "qwen2_moe"):
            reasons = [reason for reason, alternative in export_blockers(config, fmt) if alternative == "hf"]
            assert len(reasons) == len(named)
            for feature in named:
                assert sum(feature in reason for reason in reasons) == 1


# ---------------------------------------------------------------------------------------------
# Phi-3 and GPT-NeoX: partial rotary, fused q/k/v, non-gated MLP with biases, output bias, two-norm
# parallel block


def test_phi3_and_gpt_neox_options_block_moe_exports_pointing_to_hf(tmp_path):
    """Mixtral and Qwen2-MoE rotate every dim and have a sequential SwiGLU block without biases:
    each option these families need is a reason of its own."""
    from bam.formats.export import export_blockers

    expected = {
        "phi3": ["applies RoPE to 12 of each head's 16 dims (partial_rotary_factor)"],
        "gpt_neox": ["applies RoPE to 4 of each head's 16 dims", "parallel one", "layernorm", "no gate (ffn_gated",
                     "biases on its FFN", "a bias on the attention's output projection", "a bias on each norm"],
    }
    for family, reasons in expected.items():
        make_hf_model(family, tmp_path / family)
        config = load_model(tmp_path / family).config
        for fmt in ("mixtral", "qwen2_moe"):
            blockers = export_blockers(config, fmt)
            for reason in reasons:
                assert sum(reason in text and alternative == "hf" for text, alternative in blockers) == 1, reason


@pytest.mark.parametrize("method", ["nexus", "nexus-bam"])
def test_gpt_neox_nexus_shared_expert_is_the_seed_ffn_biases_included(method, tmp_path):
    """Nexus from GPT-NeoX copies: the always-on shared expert is the seed's non-gated MLP with its
    biases; with the routed experts' output zeroed (down_proj and its bias), the mixture computes the
    dense model exactly."""
    from bam.formats.model_dir import open_model
    from bam.mix.mixing import mix
    from bam.mix.nexus import DomainEmbeddings

    reference = make_hf_model("gpt_neox", tmp_path / "neox", seed=2)
    generator = torch.Generator().manual_seed(0)
    embeddings = DomainEmbeddings({name: torch.randn(64, generator=generator) for name in ("a", "b")},
                                  {"method": "hidden-mean", "model": "/nowhere"})
    mix([open_model(tmp_path / "neox")] * 3, method, tmp_path / "nx", top_k=2, domain_embeddings=embeddings)
    moe = load_model(tmp_path / "nx")
    assert moe.config.ffn_shared_expert and not moe.config.ffn_gated and moe.config.ffn_bias
    dense = load_model(tmp_path / "neox")
    for moe_layer, dense_layer in zip(moe.model.layers, dense.model.layers):
        for name, tensor in dense_layer.ffn.experts.named_parameters():
            torch.testing.assert_close(getattr(moe_layer.ffn.shared_expert, name), tensor[0], rtol=0, atol=0)
        with torch.no_grad():
            moe_layer.ffn.experts.down_proj.zero_()
            moe_layer.ffn.experts.down_proj_bias.zero_()
    input_ids = torch.randint(0, SHAPE["vocab_size"], (2, 13), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (moe(input_ids).logits - reference(input_ids).logits).abs().max().item() < 1e-4


def test_gpt_neox_biases_are_per_ffn_expert_and_never_decay(tmp_path):
    """A BAM mix of two different GPT-NeoX models stacks each one's FFN weights and biases in its
    expert's slot and averages the output-projection and norm biases; no bias decays, and the `attention` and
    `experts` training groups hold theirs."""
    from bam.cli import main
    from bam.modeling.layout import parameter_table
    from bam.train.optim import TRAIN_GROUPS

    experts = [make_hf_model("gpt_neox", tmp_path / f"e{j}", seed=j) for j in range(2)]
    assert main(["mix", "--method", "bam", "--out", str(tmp_path / "moe"), str(tmp_path / "e0"),
                 str(tmp_path / "e1")]) == 0
    moe = load_model(tmp_path / "moe")
    state = moe.state_dict()

    def theirs(name):
        return [expert.state_dict()[f"gpt_neox.layers.1.{name}"] for expert in experts]

    for ours, name, stacked in (("ffn.experts.up_proj_bias", "mlp.dense_h_to_4h.bias", True),
                                ("ffn.experts.down_proj_bias", "mlp.dense_4h_to_h.bias", True),
                                ("ffn.experts.up_proj", "mlp.dense_h_to_4h.weight", True),
                                ("attn.o_proj.bias", "attention.dense.bias", False),
                                ("ffn_input_norm.bias", "post_attention_layernorm.bias", False),
                                ("input_norm.bias", "input_layernorm.bias", False)):
        expected = torch.stack(theirs(name)) if stacked else (theirs(name)[0] + theirs(name)[1]) / 2
        torch.testing.assert_close(state[f"model.layers.1.{ours}"], expected, rtol=0, atol=1e-7)
    table = parameter_table(moe.config)
    biases = [param for name, param in table.items() if name.endswith("bias")]
    assert len(biases) == 3 * 8 + 1 and not any(param.decays for param in biases)  # + the final norm's
    assert table["model.layers.0.attn.o_proj.bias"].role in TRAIN_GROUPS["attention"]
    assert table["model.layers.0.ffn.experts.up_proj_bias"].role in TRAIN_GROUPS["experts"]


def test_phi3_longrope_cache_reset_changes_generation(tmp_path):
    """Phi-3's generate() recomputes the KV cache on passing its original context (16 here), so every
    key gets the long factors (our cache_reset_length); keeping the cache instead, as Llama's
    LongRoPE does, gives other tokens: the generation parity above tests the option."""
    reference = make_hf_model("phi3-longrope", tmp_path / "m", seed=3)
    ours = load_model(tmp_path / "m")
    assert ours.config.cache_reset_length == 16
    prompt = torch.randint(0, SHAPE["vocab_size"], (1, 10), generator=torch.Generator().manual_seed(2))
    kwargs = dict(max_new_tokens=20, do_sample=False, pad_token_id=0)
    expected = reference.generate(prompt, **kwargs).tolist()
    assert ours.generate(prompt, **kwargs).tolist() == expected
    ours.config.cache_reset_length = None
    assert ours.generate(prompt, **kwargs).tolist() != expected


def test_partial_rotary_is_transformers_rotation_and_its_backward_the_inverse():
    """Our fused RoPE on the first 2G of each head's A dims is GPT-NeoX's (and Phi-3's)
    apply_rotary_pos_emb, the other dims passed through; its backward passes gradcheck."""
    from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb

    from bam.modeling.attention import apply_rope, rope_cos_sin

    generator = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 3, 5, 16, generator=generator, dtype=torch.float64) for _ in range(2))
    positions = torch.arange(5).expand(2, 5)
    cos_BTG, sin_BTG = rope_cos_sin(positions, 6, 500.0, torch.float64)  # 6 of 16 dims rotated
    expected_q, expected_k = apply_rotary_pos_emb(q, k, torch.cat([cos_BTG] * 2, -1), torch.cat([sin_BTG] * 2, -1))
    torch.testing.assert_close(apply_rope(q, cos_BTG, sin_BTG), expected_q, rtol=0, atol=1e-12)
    torch.testing.assert_close(apply_rope(k, cos_BTG, sin_BTG), expected_k, rtol=0, atol=1e-12)
    assert torch.equal(apply_rope(q, cos_BTG, sin_BTG)[..., 6:], q[..., 6:])
    x = q.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: apply_rope(t, cos_BTG, sin_BTG), (x,))
    assert torch.autograd.gradgradcheck(lambda t: apply_rope(t, cos_BTG, sin_BTG), (x,))


@pytest.mark.parametrize("method", ["bam", "bam-shared"])
def test_adding_a_gpt_neox_expert_keeps_the_function_of_copies(method, tmp_path):
    """add-expert on a BAM mix of GPT-NeoX copies (renormalized top-2): the new copy's FFN weights and
    biases and its attention expert are appended, the output-projection and norm biases merged; the
    mixture still computes the dense model."""
    from bam.cli import main
    from bam.mix.add_expert import add_expert

    reference = make_hf_model("gpt_neox", tmp_path / "neox", seed=6)
    assert main(["mix", "--method", method, "--top-k", "2", "--renormalize", "--out", str(tmp_path / "moe"),
                 *[str(tmp_path / "neox")] * 2]) == 0
    add_expert(tmp_path / "moe", tmp_path / "neox", "third", None, tmp_path / "grown")
    grown = load_model(tmp_path / "grown")
    assert grown.config.n_ffn_experts == 3 and grown.config.n_attn_experts == 3
    assert grown.model.layers[0].ffn.experts.up_proj_bias.shape == (3, SHAPE["intermediate_size"])
    input_ids = torch.randint(0, SHAPE["vocab_size"], (2, 13), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (grown(input_ids).logits - reference(input_ids).logits).abs().max().item() < 1e-4


@pytest.mark.parametrize("family", ["phi3", "phi3-longrope", "gpt_neox", "gpt_neox-sequential"])
def test_phi3_and_gpt_neox_export_back_to_their_own_format(family, tmp_path):
    """`--format source` writes the family's own config (partial rotary, window, LongRoPE's original
    context, the block and biases) and fused tensors; transformers' class computes the reference's
    logits from it past the window and the original context, and generates the same tokens."""
    from bam.cli import main

    reference = make_hf_model(family, tmp_path / "m")
    assert main(["export", str(tmp_path / "m"), "--format", "source", "--out", str(tmp_path / "out")]) == 0
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(exported) is type(reference)
    assert exported.config.rope_parameters == reference.config.rope_parameters
    assert load_model(tmp_path / "out").config.to_dict() == load_model(tmp_path / "m").config.to_dict()
    input_ids = torch.randint(0, SHAPE["vocab_size"], (2, LONG), generator=torch.Generator().manual_seed(6))
    prompt = input_ids[:1, :10]
    kwargs = dict(max_new_tokens=20, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert (exported(input_ids).logits - reference(input_ids).logits).abs().max().item() < 1e-4
        assert exported.generate(prompt, **kwargs).tolist() == reference.generate(prompt, **kwargs).tolist()


def test_phi3_moe_with_every_dim_rotated_exports_to_mixtral(tmp_path, capsys):
    """A BTX of Phi-3 copies (Phi-3-mini: every dim rotated, a window in every layer) is Mixtral's
    maths: it exports (export's parity check ran past the window); with partial rotary it is refused
    naming it."""
    from bam.cli import main

    full = {**PARTIAL, "partial_rotary_factor": 1.0}
    for name, rope, code in (("full", full, 0), ("partial", PARTIAL, 2)):
        make_hf_model("phi3", tmp_path / name, rope_parameters=rope)
        assert main(["mix", "--method", "btx", "--top-k", "2", "--renormalize", "--out", str(tmp_path / f"{name}.moe"),
                     *[str(tmp_path / name)] * 2]) == 0
        capsys.readouterr()
        assert main(["export", str(tmp_path / f"{name}.moe"), "--format", "mixtral",
                     "--out", str(tmp_path / f"{name}.mixtral")]) == code
    assert "partial_rotary_factor" in capsys.readouterr().err
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "full.mixtral")
    assert exported.config.sliding_window == 8


def test_experts_with_different_windows_are_refused_by_mix(tmp_path, capsys):
    """A window is part of the function: Mistral copies with and without one do not mix."""
    from bam.cli import main

    make_hf_model("mistral-sliding", tmp_path / "a")
    make_hf_model("mistral", tmp_path / "b")
    capsys.readouterr()
    sources = [str(tmp_path / "a"), str(tmp_path / "b")]
    assert main(["mix", "--method", "btx", "--out", str(tmp_path / "moe"), *sources]) == 2
    assert "experts differ in sliding_window: 8" in capsys.readouterr().err and not (tmp_path / "moe").exists()


def test_gpt_neox_experts_with_biases_dispatch_the_same_grouped_and_looped(tmp_path):
    """Different GPT-NeoX experts (non-gated, biases per expert), top-2 not renormalized: the grouped
    matmul dispatch (biases gathered per sorted pair) and the per-expert loop give the same logits."""
    from bam.cli import main

    for j in range(2):
        make_hf_model("gpt_neox", tmp_path / f"e{j}", seed=j)
    assert main(["mix", "--method", "btx", "--top-k", "2", "--out", str(tmp_path / "moe"),
                 str(tmp_path / "e0"), str(tmp_path / "e1"), str(tmp_path / "e0")]) == 0
    moe = load_model(tmp_path / "moe")
    input_ids = torch.randint(0, SHAPE["vocab_size"], (2, 13), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        grouped = moe(input_ids).logits
        for layer in moe.model.layers:
            layer.ffn.experts.dispatch = "loop"
        looped = moe(input_ids).logits
    torch.testing.assert_close(looped, grouped, rtol=1e-5, atol=1e-5)


def test_gpt_neox_costs_match_the_model(tmp_path):
    """bam.modeling.cost counts a non-gated FFN with biases and the output and norm biases as the
    model holds and computes them: parameters, and matmul FLOPs per token (two FFN matrices, not three)."""
    from torch.utils.flop_counter import FlopCounterMode

    from bam.cli import main
    from bam.modeling import cost

    make_hf_model("gpt_neox", tmp_path / "neox")
    assert main(["mix", "--method", "btx", "--top-k", "2", "--out", str(tmp_path / "moe"),
                 *[str(tmp_path / "neox")] * 3]) == 0
    for path in ("neox", "moe"):
        model = load_model(tmp_path / path)
        config = model.config
        assert cost.params_total(config) == sum(p.numel() for p in model.parameters())
        for layer in model.model.layers:  # plain matmuls, which the counter sees (not grouped_mm)
            layer.ffn.experts.dispatch = "loop"
        tokens = 11
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(torch.randint(0, SHAPE["vocab_size"], (1, tokens)), use_cache=False)
        counts = counter.get_flop_counts()["Global"]
        matmul_flops = sum(counts.get(op, 0) for op in (torch.ops.aten.mm, torch.ops.aten.addmm))
        assert matmul_flops == tokens * cost.flops_per_token(config, n_ctx=0)


def test_gemma_embedding_multiplier_is_rounded_in_the_lookup_as_transformers_does(tmp_path):
    """Gemma multiplies the embeddings by sqrt(hidden_size) cast to their dtype (its ScaledWordEmbedding):
    in bf16 sqrt(48) becomes 6.9375, 0.13% off, and our first layer's input is transformers' bit for
    bit; multiplied as Granite's multiplier is (embedding_multiplier_in_lookup off), it is not."""
    from bam.modeling.config import BamConfig
    from bam.modeling.model import BamForCausalLM

    reference = make_hf_model("gemma", tmp_path / "m", hidden_size=48).to(torch.bfloat16)
    ours = load_model(tmp_path / "m", dtype=torch.bfloat16)
    granite_rule = BamForCausalLM(BamConfig.from_dict({**ours.config.to_dict(),
                                                       "embedding_multiplier_in_lookup": False}))
    granite_rule.load_state_dict(ours.state_dict())
    input_ids = torch.randint(0, SHAPE["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(1))
    first_inputs = []
    for model in (reference, ours, granite_rule.to(torch.bfloat16).eval()):
        hook = model.model.layers[0].register_forward_pre_hook(lambda module, args: first_inputs.append(args[0]))
        with torch.no_grad():
            model(input_ids)
        hook.remove()
    expected, actual, granite = first_inputs
    assert actual.dtype == torch.bfloat16 and torch.equal(actual, expected)
    assert not torch.equal(granite, expected)
