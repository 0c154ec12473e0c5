"""Parity with transformers' own models: an imported dense checkpoint gives the same logits."""

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
NEW_FAMILIES = ["qwen3", "olmo2", "granite", "smollm3", *SCALED]


def seq_len(family: str, usual: int) -> int:
    """Past the original context where RoPE scaling applies, else the length the test always used."""
    return LONG if family in SCALED else usual


def make_hf_model(family: str, out, seed: int = 0, **overrides):
    """A tiny random transformers model with every parameter perturbed (norms too) and saved."""
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    config = config_cls(**{**SHAPE, **extra, **overrides})
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
    prompt_len, new = (10, 20) if family in SCALED else (5, 12)
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
    ("mistral", {"sliding_window": 16}, "sliding"),
    ("qwen3", {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 0}, "sliding"),
    ("qwen3", {"attention_bias": True}, "attention_bias"),
    ("olmo2", {"attention_bias": True}, "attention_bias"),
    ("granite", {"attention_bias": True}, "attention_bias"),
    ("granite", {"mlp_bias": True}, "mlp_bias"),
    ("smollm3", {"attention_bias": True}, "attention_bias"),
    ("smollm3", {"use_sliding_window": True, "sliding_window": 8}, "sliding_window=8"),
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


# GPT-NeoX and Phi: every checkpoint needs something our block lacks; the error lists each feature
# the config actually uses (and none it does not).
REFUSED = {
    "gpt_neox": (transformers.GPTNeoXConfig, transformers.GPTNeoXForCausalLM),
    "phi": (transformers.PhiConfig, transformers.PhiForCausalLM),
}
ALWAYS = ["non-gated MLP", "LayerNorm with a bias"]


@pytest.mark.parametrize("family, overrides, named, not_named", [
    ("gpt_neox", {}, ALWAYS + ["hidden_act='gelu'", "two norms", "partial_rotary_factor=0.25",
                               "biases on the attention"], []),
    ("gpt_neox", {"use_parallel_residual": False, "rotary_pct": 1.0, "attention_bias": False,
                  "hidden_act": "silu"}, ALWAYS + ["hidden_act='silu'"],
     ["two norms", "partial rotary", "biases on the attention"]),
    ("phi", {}, ALWAYS + ["hidden_act='gelu_new'", "partial_rotary_factor=0.5", "LM head"], ["qk_layernorm"]),
    ("phi", {"qk_layernorm": True, "partial_rotary_factor": 1.0}, ALWAYS + ["qk_layernorm"], ["partial rotary"]),
])
def test_gpt_neox_and_phi_refusals_name_the_features(family, overrides, named, not_named, tmp_path):
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

    config_cls, model_cls = REFUSED["gpt_neox"]
    shape = {k: v for k, v in SHAPE.items() if k != "num_key_value_heads"}
    model_cls(config_cls(**shape)).save_pretrained(tmp_path / "neox")
    assert main(["mix", str(tmp_path / "neox"), "--method", "upcycle", "--num-experts", "2",
                 "--out", str(tmp_path / "moe")]) == 2
    assert "non-gated MLP" in capsys.readouterr().err
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
    assert main(["export", str(tmp_path / "m"), "--format", "llama", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.strip().endswith("(use --format hf)") and not (tmp_path / "out").exists()
    for reason in STANDARD_REFUSALS[family]:
        assert reason in err
    config = load_model(tmp_path / "m").config
    for fmt in ("mixtral", "qwen2_moe", "llama"):
        reasons = [reason for reason, alternative in export_blockers(config, fmt) if alternative == "hf"]
        assert len(reasons) == len(STANDARD_REFUSALS[family])
        for expected in STANDARD_REFUSALS[family]:
            assert sum(expected in reason for reason in reasons) == 1
    # OLMoE's q/k norms are OLMo 2's, but bam does not write OLMoE: only hf remains
    olmoe = export_blockers(config, "olmoe")
    assert olmoe == [("bam does not write OLMoE checkpoints", "hf")] if family == "olmo2" else olmoe[0][1] == "qwen2_moe"


def test_hf_export_of_new_families_runs_without_bam(tmp_path):
    """`bam export --format hf` of a BAM mix of OLMo 2 copies (post norms, q/k norms over all heads
    stacked per attention expert), a BAM-shared mix of Granite copies (multipliers, attention scale)
    and a BTX mix of SmolLM3 copies (NoPE layer): our logits and tokens in a Python without bam."""
    from bam.cli import main
    from test_export import ours, run_outside

    cases = {"olmo2": "bam", "granite": "bam-shared", "smollm3": "btx"}
    exported = {}
    for family, method in cases.items():
        make_hf_model(family, tmp_path / family)
        moe = tmp_path / f"{family}.moe"
        assert main(["mix", "--method", method, "--top-k", "2", "--out", str(moe), *[str(tmp_path / family)] * 2]) == 0
        exported[family] = tmp_path / f"{family}.hf"
        assert main(["export", str(moe), "--format", "hf", "--out", str(exported[family])]) == 0
    outside = run_outside(exported, tmp_path / "outside", remote_code=True)
    for family in cases:
        logits, tokens = ours(tmp_path / f"{family}.moe")
        assert outside[family]["tokens"] == tokens
        assert (torch.tensor(outside[family]["logits"]) - logits).abs().max().item() < 1e-5


def test_qwen3_export_to_llama_is_refused_naming_qk_norm(tmp_path, capsys):
    from bam.cli import main

    make_hf_model("qwen3", tmp_path / "m")
    assert main(["export", str(tmp_path / "m"), "--format", "llama", "--out", str(tmp_path / "out")]) == 2
    assert "qk_norm" in capsys.readouterr().err and not (tmp_path / "out").exists()
