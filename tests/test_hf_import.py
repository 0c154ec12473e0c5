"""Parity with transformers' own models: an imported dense checkpoint gives the same logits."""

import pytest
import torch
import transformers

import bam  # noqa: F401  (registers the Auto classes)
from bam.formats.model_dir import load_model
from bam.errors import BamError

SHAPE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)

FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {"sliding_window": None}),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
    "cohere": (transformers.CohereConfig, transformers.CohereForCausalLM, {"logit_scale": 0.5}),
}


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
    input_ids = torch.randint(0, SHAPE["vocab_size"], (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(input_ids).logits
        actual = ours(input_ids).logits
    assert (actual - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("family", ["llama", "cohere"])
def test_imported_generation_matches_transformers(family, tmp_path):
    reference = make_hf_model(family, tmp_path / family, seed=3)
    ours = load_model(tmp_path / family)
    prompt = torch.randint(0, SHAPE["vocab_size"], (1, 5), generator=torch.Generator().manual_seed(2))
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
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
    ("llama", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}, "rope_type"),
])
def test_unsupported_features_are_named(family, overrides, feature, tmp_path):
    make_hf_model(family, tmp_path / "m", **overrides)
    with pytest.raises(BamError, match=feature):
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


@pytest.mark.parametrize("family", ["llama", "cohere"])
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
    input_ids = torch.randint(0, SHAPE["vocab_size"], (2, 13), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (moe(input_ids).logits - reference(input_ids).logits).abs().max().item() < 1e-4
