"""Parity with transformers' own models: an imported dense checkpoint gives the same logits."""

import pytest
import torch
import transformers

import bam  # noqa: F401  (registers the Auto classes)
from bam.checkpoint import load_model
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
