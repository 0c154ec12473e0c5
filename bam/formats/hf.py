"""Import dense Hugging Face checkpoints as our model: a config translation and a tensor-name map.

An imported directory is read lazily, tensor by tensor, exactly like one of ours (a `ModelSource`),
so `bam mix`, `bam train` and `load_model` accept it directly. Each family's features that our
model cannot express are refused by name rather than silently dropped.

Supported: Llama, Mistral, Qwen2 (sequential block, RMSNorm), Cohere (parallel block, LayerNorm
without bias, interleaved RoPE, logit scale). Recognised but refused, because every checkpoint of
these families needs something our model lacks: GPT-NeoX and Phi (a non-gated GELU MLP, LayerNorm
and projection biases, partial rotary embeddings); the error lists each missing feature.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from transformers import AutoConfig, PreTrainedConfig

from bam.formats.source import ModelSource
from bam.io.tensor_files import SafetensorsFiles
from bam.modeling.config import config_from_dict
from bam.errors import BamError

SEQUENTIAL_FAMILIES = ("llama", "mistral", "qwen2")
PARALLEL_FAMILIES = ("cohere",)
SUPPORTED_FAMILIES = SEQUENTIAL_FAMILIES + PARALLEL_FAMILIES
# Families we know and whose checkpoints we cannot express today (see `_missing_features`): they
# get an error naming every missing feature instead of "model_type not supported".
REFUSED_FAMILIES = ("gpt_neox", "phi")


def _refuse(path: Path, family: str, feature: str) -> None:
    raise BamError(f"{path}: {family} checkpoint uses {feature}, which bam's model cannot express")


def _rope_theta(hf: PreTrainedConfig, path: Path, family: str) -> float:
    rope = getattr(hf, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default":
        _refuse(path, family, f"rope_type={rope_type!r} (only plain RoPE is supported)")
    theta = rope.get("rope_theta", getattr(hf, "rope_theta", None))
    if theta is None:
        raise BamError(f"{path}/config.json: field rope_theta missing")
    return float(theta)


def _missing_features(hf: PreTrainedConfig) -> list[str]:
    """What a GPT-NeoX or Phi checkpoint needs that our block (SwiGLU, bias-free norms) lacks.

    Both families always have a non-gated MLP (two matrices with biases, GELU by default),
    LayerNorms with a bias, and a bias on the attention output; the rest depends on the config.
    """
    rope = getattr(hf, "rope_parameters", None) or {}
    partial = rope.get("partial_rotary_factor", 1.0)
    features = [f"a non-gated MLP with biases and hidden_act={hf.hidden_act!r} (bam has SwiGLU only)",
                "LayerNorm with a bias"]
    if hf.model_type == "gpt_neox":
        if getattr(hf, "attention_bias", True):
            features.append("biases on the attention projections, the output projection included")
        if getattr(hf, "use_parallel_residual", True):
            features.append("a parallel block with two norms (bam's parallel block shares one)")
    else:  # phi
        features.append("biases on the attention output projection and the LM head")
        if getattr(hf, "qk_layernorm", False):
            features.append("qk_layernorm=True")
    if partial != 1.0:
        features.append(f"partial rotary embeddings (partial_rotary_factor={partial})")
    return features


def translate_config(hf: PreTrainedConfig, path: Path) -> dict:
    """Our config fields for a dense HF model, or BamError naming the unsupported feature."""
    family = hf.model_type
    if family in REFUSED_FAMILIES:
        _refuse(path, family, "; ".join(_missing_features(hf)))
    if getattr(hf, "hidden_act", "silu") != "silu":
        _refuse(path, family, f"hidden_act={hf.hidden_act!r} (only SwiGLU with silu)")
    if getattr(hf, "mlp_bias", False):
        _refuse(path, family, "mlp_bias=True")
    if family in ("mistral", "qwen2") and getattr(hf, "sliding_window", None) is not None \
            and getattr(hf, "use_sliding_window", True) \
            and hf.sliding_window < hf.max_position_embeddings:
        _refuse(path, family, f"sliding-window attention (sliding_window={hf.sliding_window})")
    if family == "llama" and getattr(hf, "attention_bias", False):
        _refuse(path, family, "attention_bias=True (a bias on o_proj)")
    if family == "cohere" and getattr(hf, "use_qk_norm", False):
        _refuse(path, family, "use_qk_norm=True")

    heads = hf.num_attention_heads
    fields = dict(
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        intermediate_size=hf.intermediate_size,
        num_hidden_layers=hf.num_hidden_layers,
        num_attention_heads=heads,
        num_key_value_heads=getattr(hf, "num_key_value_heads", None) or heads,
        head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // heads,
        max_position_embeddings=hf.max_position_embeddings,
        rope_theta=_rope_theta(hf, path, family),
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        bos_token_id=getattr(hf, "bos_token_id", None),
        eos_token_id=getattr(hf, "eos_token_id", None),
        pad_token_id=getattr(hf, "pad_token_id", None),
        initializer_range=getattr(hf, "initializer_range", 0.02),
    )
    if family in SEQUENTIAL_FAMILIES:
        fields.update(block="sequential", norm="rmsnorm", norm_eps=hf.rms_norm_eps, qkv_bias=family == "qwen2")
    else:
        fields.update(block="parallel", norm="layernorm", norm_eps=hf.layer_norm_eps,
                      logit_scale=float(hf.logit_scale), qkv_bias=bool(getattr(hf, "attention_bias", False)))
        if fields["qkv_bias"]:
            _refuse(path, family, "attention_bias=True (a bias on o_proj)")
    return fields


def interleaved_to_half_rope(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Reorder each head's rows so interleaved-pair RoPE (Cohere) becomes rotate-half RoPE (ours).

    Interleaved RoPE rotates dims (2i, 2i+1) by angle i; rotate-half rotates (i, i + Dh/2). Moving
    even dims to the first half and odd dims to the second, in both q and k, leaves every q.k
    product unchanged, so attention is exactly the same function.
    """
    perm = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])
    rows = weight.view(-1, head_dim, *weight.shape[1:])
    return rows[:, perm].reshape(weight.shape)


def tensor_map(family: str, config: dict) -> dict[str, Callable[[Callable[[str], torch.Tensor]], torch.Tensor]]:
    """Our tensor name -> function of the HF reader producing our tensor."""
    head_dim = config["head_dim"]
    rope_fix = (lambda w: interleaved_to_half_rope(w, head_dim)) if family == "cohere" else (lambda w: w)
    plain = lambda hf_name, fix=(lambda w: w): lambda read: fix(read(hf_name))  # noqa: E731

    mapping = {"model.embed_tokens.weight": plain("model.embed_tokens.weight"),
               "model.norm.weight": plain("model.norm.weight")}
    for i in range(config["num_hidden_layers"]):
        ours, theirs = f"model.layers.{i}.", f"model.layers.{i}."
        mapping[ours + "input_norm.weight"] = plain(theirs + "input_layernorm.weight")
        if config["block"] == "sequential":
            mapping[ours + "post_attention_norm.weight"] = plain(theirs + "post_attention_layernorm.weight")
        for proj in ("q", "k", "v"):
            fix = rope_fix if proj in ("q", "k") else (lambda w: w)
            mapping[ours + f"attn.{proj}_proj.weight"] = plain(theirs + f"self_attn.{proj}_proj.weight", fix)
            if config.get("qkv_bias"):
                mapping[ours + f"attn.{proj}_proj.bias"] = plain(theirs + f"self_attn.{proj}_proj.bias", fix)
        mapping[ours + "attn.o_proj.weight"] = plain(theirs + "self_attn.o_proj.weight")
        mapping[ours + "ffn.experts.gate_up_proj"] = (
            lambda read, p=theirs: torch.cat(list(gate_up_parts(read, p)))[None]
        )
        mapping[ours + "ffn.experts.down_proj"] = (lambda read, p=theirs: read(p + "mlp.down_proj.weight")[None])
    if not config["tie_word_embeddings"]:
        mapping["lm_head.weight"] = plain("lm_head.weight")
    return mapping


def gate_up_parts(read: Callable[[str], torch.Tensor], prefix: str) -> Iterator[torch.Tensor]:
    """Our one-expert `gate_up_proj` [1, 2*d_ff, d] as its two stored pieces, gate rows first,
    read one at a time (a writer can append them without the concatenation)."""
    yield read(prefix + "mlp.gate_proj.weight")
    yield read(prefix + "mlp.up_proj.weight")


def open_hf_model(path: Path, config_dict: dict, tokenizer_dir: Path | None) -> ModelSource:
    family = config_dict.get("model_type")
    if family not in SUPPORTED_FAMILIES + REFUSED_FAMILIES:
        raise BamError(f"{path}/config.json: model_type={family!r} is not supported "
                       f"(expected bam or one of {', '.join(SUPPORTED_FAMILIES)})")
    try:
        hf_config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (ValueError, TypeError, OSError) as err:
        raise BamError(f"{path}/config.json: not a valid {family} config ({err})")
    fields = translate_config(hf_config, path)
    config = config_from_dict({"model_type": "bam", **fields}, path / "config.json")
    files = SafetensorsFiles(path)
    available = set(files.names())
    mapping = tensor_map(family, fields)

    def read(hf_name: str) -> torch.Tensor:
        if hf_name not in available:
            raise BamError(f"{path}: tensor {hf_name} missing from the {family} checkpoint")
        return files.get(hf_name)

    def read_parts(name: str) -> Iterable[torch.Tensor]:
        if name.endswith(".ffn.experts.gate_up_proj") and name in mapping:
            # "model.layers.{i}." prefixes the tensor in both namings
            return gate_up_parts(read, name.removesuffix("ffn.experts.gate_up_proj"))
        return [mapping[name](read)]

    return ModelSource(path, family, config, list(mapping), lambda name: mapping[name](read), tokenizer_dir,
                       read_parts=read_parts)
