"""Export: our models as standard Hugging Face checkpoints (an MoE format, or a dense model's own
family), or as a self-contained directory.

Formats (`bam export MODEL --format F --out DIR`):

    mixtral    MixtralForCausalLM. Router `mlp.gate`, experts as 3-D `mlp.experts.gate_up_proj`
               [E, 2F, D] (gate rows first) and `down_proj` [E, D, F]: our layout, so experts are
               copied as they are. Mixtral always renormalizes the top-k gates.
    qwen2_moe  Qwen2MoeForCausalLM with norm_topk_prob = our ffn_renormalize, so it expresses both
               gate rules, and q/k/v biases. Its shared expert is always on, scaled by
               sigmoid(shared_expert_gate . h): with a zero gate row that is exactly 0.5, so our
               shared expert goes there with down_proj doubled (a power of two: exact in floating
               point). Without one, we write a width-1 shared expert of zeros, which adds exactly 0.
    olmoe      refused: OLMoE applies RMSNorm to every query and key (q_norm/k_norm, no switch), and
               bam does not write it for a model that does (qk_norm_scope='all', an OLMo 2 seed).
    FAMILY     a dense model in a family's own format (llama, mistral, qwen2, qwen3, olmo2, granite,
               smollm3, cohere, cohere2, gemma, gemma2, gemma3_text, ...: bam/formats/families.py
               FAMILY_EXPORT_FIELDS), its config built by `family_config` and checked by
               translating it back with import's translate_config: any field that does not come
               back is something the family cannot express.
    source     the family the model was imported from (config field source_model_type).
    hf         our own model with its modeling code (`auto_map`), for every variant (BAM included):
               loads with `trust_remote_code=True` in a Python without bam installed.

The MoE formats express our maths exactly only for a sequential block with RMSNorm and one
attention per layer (BTX, sparse upcycling, Nexus, dense): `export_blockers` lists what stands in
the way. A Nexus router's logits `h . e_i` depend on fixed tensors only once trained, so it is
written as the linear router whose rows are the expert embeddings e_i, computed by our own
`NexusRouter` in fp32. Every tensor of the model must have a counterpart in the target (a tensor we do
not know how to express is refused, never dropped). The export is then written to a temporary
directory, loaded back with vanilla transformers, and its logits compared with ours on random
tokens in fp32; only then does the directory appear at `--out`.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import math
import re
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, PreTrainedConfig
from transformers.utils import logging as hf_logging

from bam.formats.families import FAMILY_EXPORT_FIELDS, common_fields, family_config, translate_config
from bam.formats.hf import family_tensor_plan
from bam.formats.names import LLAMA_NAMES, MOE_MLP, hf_name
from bam.formats.model_dir import copy_tokenizer, load_model, open_model
from bam.formats.source import ModelSource
from bam.io.atomic import atomic_output_dir
from bam.io.tensor_files import StreamingSafetensorsWriter, WEIGHTS_NAME
from bam.modeling.config import COMPATIBILITY_FIELDS, BamConfig, config_from_dict
from bam.errors import BamError, first_line
from bam.modeling.layout import parameter_shapes, parameters

MOE_FORMATS = ("mixtral", "qwen2_moe", "olmoe")
FAMILY_FORMATS = tuple(FAMILY_EXPORT_FIELDS)
FORMATS = MOE_FORMATS + FAMILY_FORMATS + ("source", "hf")

# Parity: max |logit difference| allowed, relative to the largest logit (absolute below 1).
PARITY_TOLERANCE = 1e-4
PARITY_TOKENS = (2, 24)  # batch, sequence length of the random input


def export(model_dir: str | Path, fmt: str, out: str | Path, overwrite: bool = False) -> Path:
    """Write `model_dir` in format `fmt` to `out` (atomically); returns `out`. BamError says why not."""
    if fmt not in FORMATS:
        raise BamError(f"unknown export format {fmt!r}: expected one of {', '.join(FORMATS)}")
    source = open_model(model_dir)
    out = Path(out)
    if out.exists() and out.resolve() == Path(source.path).resolve():
        raise BamError(f"{out}: output would replace the input model")
    if fmt == "source":
        fmt = source_family(source)
    if fmt == "hf":
        return export_remote_code(source, out, overwrite)
    if fmt in MOE_FORMATS:
        return export_standard(source, fmt, out, overwrite)
    return export_family(source, fmt, out, overwrite)


def source_family(source: ModelSource) -> str:
    """The family `--format source` writes: the one the model was imported from."""
    family = source.config.source_model_type
    if family is None:
        raise BamError(f"{source.path}: --format source: config field source_model_type is null (the model was "
                       f"not imported from a Hugging Face family); name a format: {', '.join(FAMILY_FORMATS)}, "
                       f"{', '.join(MOE_FORMATS[:2])} or hf")
    return family


# ---------------------------------------------------------------------------------------------
# Which models a standard format expresses


def export_blockers(config: BamConfig, fmt: str) -> list[tuple[str, str]]:
    """Why `fmt` cannot express a model with this config, each reason with the format that can.

    Empty when it can (the parity check still has the last word).
    """
    if fmt == "olmoe":
        if config.qk_norm and config.qk_norm_scope == "all":
            return [("bam does not write OLMoE checkpoints", "hf")]
        return [("OLMoE always applies RMSNorm across all heads' queries and keys (q_norm/k_norm), which "
                 "this model does not (only qk_norm with qk_norm_scope='all' does)", "qwen2_moe")]
    reasons = []
    if config.block != "sequential":
        norms = "each its own norm" if config.parallel_ffn_norm else "the same norm"
        reasons.append((f"{fmt} has a sequential block and this model a parallel one "
                        f"(attention and FFN read {norms})", "hf"))
    if config.norm != "rmsnorm":
        reasons.append((f"{fmt} uses RMSNorm and this model {config.norm}", "hf"))
    if config.n_attn_experts > 1:
        kind = "shared K/V" if config.kv_shared else "KV experts"
        reasons.append((f"this model has {config.n_attn_experts} attention experts (BAM, {kind}) and "
                        f"{fmt} one attention per layer", "hf"))
    if config.adapter_experts:
        reasons.append((f"this model's experts are the seed plus an adapter each and {fmt} holds full experts "
                        f"(`bam mix --materialize` writes them)", "hf"))
    if config.ffn_router not in ("linear", "nexus"):
        reasons.append((f"ffn_router={config.ffn_router!r} and {fmt} has a linear router only", "hf"))
    if config.ffn_shared_expert and fmt == "mixtral":
        reasons.append((f"this model has an always-on shared expert and {fmt} has none", "qwen2_moe"))
    if config.logit_scale != 1.0:
        reasons.append((f"logit_scale={config.logit_scale} and {fmt} does not scale logits", "hf"))
    if config.qk_norm:
        scope = "each head's" if config.qk_norm_scope == "head" else "all heads'"
        reasons.append((f"this model normalizes {scope} queries and keys (qk_norm) and {fmt} does not", "hf"))
    if config.norm_placement != "pre":
        reasons.append((f"this model normalizes each sublayer's output (norm_placement="
                        f"{config.norm_placement!r}) and {fmt} each sublayer's input", "hf"))
    if config.nope_layers:
        reasons.append((f"layers {config.nope_layers} of this model have no positional encoding "
                        f"(nope_layers) and {fmt} applies RoPE in every layer", "hf"))
    if config.rotary_dim != config.head_dim:
        reasons.append((f"this model applies RoPE to {config.rotary_dim} of each head's {config.head_dim} dims "
                        f"(partial_rotary_factor) and {fmt} to all of them", "hf"))
    if config.cache_reset_length is not None:
        reasons.append((f"this model's generation recomputes its KV cache on passing {config.cache_reset_length} "
                        f"positions (cache_reset_length, Phi-3's LongRoPE) and {fmt}'s does not", "hf"))
    if not config.ffn_gated:
        reasons.append((f"this model's FFN has no gate (ffn_gated=False) and {fmt}'s experts are gated", "hf"))
    for field, what in (("ffn_bias", "biases on its FFN projections"),
                        ("attn_output_bias", "a bias on the attention's output projection"),
                        ("norm_bias", "a bias on each norm")):
        if getattr(config, field):
            reasons.append((f"this model has {what} ({field}) and {fmt} does not", "hf"))
    if config.attention_scale is not None:
        reasons.append((f"attention_scale={config.attention_scale} and {fmt} scales attention by "
                        f"1/sqrt(head_dim)", "hf"))
    for field in ("embedding_multiplier", "residual_multiplier"):
        if getattr(config, field) != 1.0:
            reasons.append((f"{field}={getattr(config, field)} and {fmt} has no such multiplier", "hf"))
    if config.hidden_act != "silu":
        reasons.append((f"this model's gated MLP uses hidden_act={config.hidden_act!r} and {fmt}'s silu", "hf"))
    if config.norm_weight_offset != 0.0:
        reasons.append((f"this model's norms multiply by {config.norm_weight_offset} + weight (norm_weight_offset) "
                        f"and {fmt}'s by the weight", "hf"))
    for field in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(config, field) is not None:
            reasons.append((f"{field}={getattr(config, field)} and {fmt} does not cap logits", "hf"))
    if None not in config.rope_by_type():
        reasons.append((f"this model's layer types have different RoPE (rope_parameters by layer type) and {fmt} "
                        f"one RoPE for every layer", "hf"))
    sliding = _sliding_layers(config)
    if sliding and fmt == "mixtral" and len(sliding) < config.num_hidden_layers:
        reasons.append((f"only layers {sliding} of this model attend to a sliding window and Mixtral's "
                        f"sliding_window applies to every layer", "qwen2_moe"))
    if fmt == "mixtral":
        if not config.ffn_renormalize and config.ffn_top_k < config.n_ffn_experts:
            reasons.append((f"Mixtral renormalizes the top-k gates and this model does not "
                            f"(top-{config.ffn_top_k}, gate = router probability)", "qwen2_moe"))
        if config.qkv_bias:
            reasons.append(("Mixtral has no q/k/v biases and this model does", "qwen2_moe"))
    if fmt == "qwen2_moe" and config.head_dim * config.num_attention_heads != config.hidden_size:
        reasons.append((f"Qwen2-MoE derives head_dim from hidden_size/num_attention_heads "
                        f"({config.hidden_size // config.num_attention_heads}) and this model has "
                        f"head_dim={config.head_dim}", "mixtral" if not config.qkv_bias else "hf"))
    return reasons


def _sliding_layers(config: BamConfig) -> list[int]:
    """The layers whose attention sees a sliding window of keys."""
    return [i for i in range(config.num_hidden_layers) if config.attention_window(i) is not None]


def _refusal(source: ModelSource, fmt: str, blockers: list[tuple[str, str]]) -> BamError:
    """One line: every reason, then one format that avoids them all (hf expresses everything)."""
    alternatives = {alternative for _, alternative in blockers}
    alternative = alternatives.pop() if len(alternatives) == 1 else "hf"
    reasons = "; ".join(reason for reason, _ in blockers)
    return BamError(f"{source.path}: cannot export to {fmt}: {reasons} (use --format {alternative})")


def family_blockers(config: BamConfig, family: str) -> list[tuple[str, str]]:
    """Why `family`'s own (dense) format cannot express a model with this config, each reason with
    the format that can, as export_blockers. Empty when it can (the parity check has the last word).

    A family expresses a dense model when its config, built by family_config, translates back on
    import to the same function: every field in which they differ is a reason.
    """
    if family not in FAMILY_EXPORT_FIELDS:
        return [(f"bam does not write {family} checkpoints", "hf")]
    if not config.is_dense:
        reasons = []
        if config.n_attn_experts > 1:
            kind = "shared K/V" if config.kv_shared else "KV experts"
            reasons.append((f"this model has {config.n_attn_experts} attention experts (BAM, {kind}) and "
                            f"{family} one attention per layer", "hf"))
        if config.n_ffn_experts > 1 or config.ffn_router != "linear" or config.ffn_shared_expert:
            moe_format = next((fmt for fmt in ("mixtral", "qwen2_moe") if not export_blockers(config, fmt)), "hf")
            shared = " and a shared expert" if config.ffn_shared_expert else ""
            reasons.append((f"{family} is dense and this model has {config.n_ffn_experts} FFN experts with a "
                            f"{config.ffn_router} router{shared}", moe_format))
        return reasons
    reasons = _round_trip_differences(config, family)
    if not reasons:
        return []
    others = dict.fromkeys([config.source_model_type, *FAMILY_FORMATS])
    alternative = next((other for other in others if other in FAMILY_EXPORT_FIELDS and other != family
                        and not _round_trip_differences(config, other)), "hf")
    return [(reason, alternative) for reason in reasons]


def _round_trip_differences(config: BamConfig, family: str) -> list[str]:
    """Each field of our dense `config` that `family`'s config does not give back on import."""
    try:
        hf_config = family_config(config, family)
    except (ValueError, TypeError) as err:  # transformers' own checks of the family's config
        return [f"{family}'s config does not accept this model's shape ({first_line(err)})"]
    try:
        fields = translate_config(hf_config, Path(f"{family} config"))
    except BamError as err:  # the family's config needs an option import refuses
        return [str(err)]
    back = config_from_dict({"model_type": "bam", **fields}, f"{family} config")
    return [f"{field}={getattr(config, field)!r}, which {family} cannot express (its config gives "
            f"{getattr(back, field)!r})"
            for field in ("max_position_embeddings", *COMPATIBILITY_FIELDS)
            if not _same_value(_effective(config, field), _effective(back, field))]


def _effective(config: BamConfig, field: str):
    """The value `field` computes with: a null attention_scale is SDPA's 1/sqrt(head_dim)."""
    value = getattr(config, field)
    return config.head_dim ** -0.5 if field == "attention_scale" and value is None else value


def _same_value(a, b) -> bool:
    """Equal, floats within rounding (Granite's logits_scaling is the reciprocal of our logit_scale)."""
    if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b)):
        return math.isclose(a, b, rel_tol=1e-12)
    return a == b


# ---------------------------------------------------------------------------------------------
# The target config and the tensor plan


def target_config(config: BamConfig, fmt: str, dtype: torch.dtype) -> PreTrainedConfig:
    """The transformers config of `fmt` whose model computes what ours computes."""
    common = dict(common_fields(config), dtype=str(dtype).removeprefix("torch."))
    moe = dict(num_experts_per_tok=config.ffn_top_k, router_aux_loss_coef=config.router_aux_loss_coef)
    if fmt == "mixtral":
        return transformers.MixtralConfig(
            **common, **moe, head_dim=config.head_dim,
            num_local_experts=config.n_ffn_experts,
            sliding_window=config.sliding_window if _sliding_layers(config) else None,  # every layer or none
            architectures=["MixtralForCausalLM"],
        )
    if fmt == "qwen2_moe":
        return transformers.Qwen2MoeConfig(
            **common, **moe, moe_intermediate_size=config.intermediate_size, num_experts=config.n_ffn_experts,
            norm_topk_prob=config.ffn_renormalize, qkv_bias=config.qkv_bias,
            shared_expert_intermediate_size=config.intermediate_size if config.ffn_shared_expert else 1,
            decoder_sparse_step=1, mlp_only_layers=[], **_qwen2_moe_window(config),
            architectures=["Qwen2MoeForCausalLM"],
        )
    raise ValueError(f"no target config for {fmt!r}")


def _qwen2_moe_window(config: BamConfig) -> dict:
    """Qwen2-MoE's fields for our sliding layers: its layer_types name them, as ours do."""
    sliding = _sliding_layers(config)
    if not sliding:
        return dict(use_sliding_window=False)
    return dict(use_sliding_window=True, sliding_window=config.sliding_window,
                layer_types=["sliding_attention" if i in sliding else "full_attention"
                             for i in range(config.num_hidden_layers)])


# A target tensor is made from some of our tensors (read lazily, in this order) by a function.
Producer = tuple[tuple[str, ...], Callable[..., torch.Tensor]]


def _same(name: str) -> Producer:
    return (name,), lambda t: t


def tensor_plan(config: BamConfig, fmt: str, dtype: torch.dtype) -> dict[str, Producer]:
    """Target tensor name -> how to make it from ours (see the module docstring for the layouts).

    Every tensor the Llama naming renames (embeddings, norms, attention, LM head) is copied under
    its name in bam/formats/names.py; the FFN of each layer is rebuilt per format below.
    """
    d = config.hidden_size

    def zeros(*shape: int) -> Producer:
        return (), lambda: torch.zeros(shape, dtype=dtype)

    plan = {hf_name(param): _same(param.name) for param in parameters(config) if param.local in LLAMA_NAMES}
    for i in range(config.num_hidden_layers):
        ours = theirs = f"model.layers.{i}."
        gate_up, down = ours + "ffn.experts.gate_up_proj", ours + "ffn.experts.down_proj"
        router, gate = ours + "ffn.router.", theirs + MOE_MLP["ffn.router.weight"]
        if config.ffn_router == "nexus":
            nexus = (router + "domain_embeddings", router + "gate_up_proj", router + "down_proj")
            plan[gate] = nexus, lambda *t: nexus_router_weight(config, *t)
        elif config.n_ffn_experts > 1:
            plan[gate] = _same(router + "weight")
        else:  # a dense model has no router: one expert with a zero gate row gets probability 1, as ours
            plan[gate] = zeros(1, d)
        plan[theirs + MOE_MLP["ffn.experts.gate_up_proj"]] = _same(gate_up)
        plan[theirs + MOE_MLP["ffn.experts.down_proj"]] = _same(down)
        if fmt == "qwen2_moe":
            plan.update(_qwen2_moe_shared_expert(config, ours + "ffn.shared_expert.", theirs + "mlp.", zeros))
    return plan


def _qwen2_moe_shared_expert(config: BamConfig, ours: str, theirs: str, zeros) -> dict[str, Producer]:
    """Qwen2-MoE adds sigmoid(g . h) * shared(h). With g = 0 the factor is exactly 0.5, so ours goes in
    with down_proj doubled; without a shared expert, a width-1 one of zeros adds exactly 0."""
    d, f = config.hidden_size, config.intermediate_size
    plan = {theirs + "shared_expert_gate.weight": zeros(1, d)}
    if not config.ffn_shared_expert:
        plan[theirs + "shared_expert.gate_proj.weight"] = zeros(1, d)
        plan[theirs + "shared_expert.up_proj.weight"] = zeros(1, d)
        plan[theirs + "shared_expert.down_proj.weight"] = zeros(d, 1)
        return plan
    plan[theirs + "shared_expert.gate_proj.weight"] = (ours + "gate_up_proj",), lambda t: t[:f]
    plan[theirs + "shared_expert.up_proj.weight"] = (ours + "gate_up_proj",), lambda t: t[f:]
    plan[theirs + "shared_expert.down_proj.weight"] = (ours + "down_proj",), lambda t: t * 2
    return plan


def nexus_router_weight(config: BamConfig, domain_embeddings, gate_up_proj, down_proj) -> torch.Tensor:
    """The [E, D] linear router equal to a trained Nexus router: its expert embeddings e_i."""
    from bam.modeling.moe import NexusRouter  # noqa: PLC0415

    with torch.device("meta"):
        router = NexusRouter(config)
    router.load_state_dict({"domain_embeddings": domain_embeddings, "gate_up_proj": gate_up_proj,
                            "down_proj": down_proj}, assign=True)
    with torch.no_grad():
        return router.expert_embeddings()


def _target_shapes(target: PreTrainedConfig) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of the target model, built on the meta device (tied duplicates left out)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(target)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


# ---------------------------------------------------------------------------------------------
# Standard formats


def export_standard(source: ModelSource, fmt: str, out: Path, overwrite: bool = False) -> Path:
    config = source.config
    blockers = export_blockers(config, fmt)
    if blockers:
        raise _refusal(source, fmt, blockers)
    dtype = _checkpoint_dtype(source)
    return _write_checked(source, fmt, target_config(config, fmt, dtype), tensor_plan(config, fmt, dtype),
                          dtype, out, overwrite)


def export_family(source: ModelSource, family: str, out: Path, overwrite: bool = False) -> Path:
    """A dense model in `family`'s own format: its config from bam/formats/families.py
    (`family_config`), its tensors named by bam/formats/hf.py (`family_tensor_plan`)."""
    config = source.config
    blockers = family_blockers(config, family)
    if blockers:
        raise _refusal(source, family, blockers)
    dtype = _checkpoint_dtype(source)
    target = family_config(config, family)
    target.dtype = dtype
    return _write_checked(source, family, target, family_tensor_plan(config, family), dtype, out, overwrite)


def _write_checked(source: ModelSource, fmt: str, target: PreTrainedConfig, plan: dict[str, Producer],
                   dtype: torch.dtype, out: Path, overwrite: bool) -> Path:
    """Write `target` and the planned tensors to `out` if transformers' model of it gives our logits."""
    used = {name for inputs, _ in plan.values() for name in inputs}
    _require_tensors(source, used)
    unused = [name for name in source.tensor_names if name not in used]
    if unused:
        raise BamError(f"{source.path}: cannot export to {fmt}: tensor {unused[0]} has no counterpart in "
                       f"{fmt} ({len(unused)} such tensors); use --format hf")
    shapes = _target_shapes(target)
    if set(shapes) != set(plan):  # a bug in the plan, not a user error
        raise RuntimeError(f"{fmt} plan and model disagree: {sorted(set(shapes) ^ set(plan))[:4]}")

    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        target.save_pretrained(tmp)
        _write_tensors(tmp, plan, shapes, source, dtype)
        copy_tokenizer(source.tokenizer_dir, tmp)
        check_parity(source.path, tmp, fmt)
    return out


def _require_tensors(source: ModelSource, names) -> None:
    present = set(source.tensor_names)
    missing = sorted(name for name in names if name not in present)
    if missing:
        raise BamError(f"{source.path}: tensor {missing[0]} missing ({len(missing)} missing in all)")


def _write_tensors(directory: Path, plan: dict[str, Producer], shapes: dict[str, tuple[int, ...]],
                   source: ModelSource, dtype: torch.dtype) -> None:
    """Stream the planned tensors into one safetensors file: one output tensor in memory at a time."""
    specs = {name: (dtype, shapes[name]) for name in plan}
    with StreamingSafetensorsWriter(directory / WEIGHTS_NAME, specs) as writer:
        for name, (inputs, make) in plan.items():
            tensor = make(*(source.tensor(n) for n in inputs))
            if tuple(tensor.shape) != shapes[name]:
                raise BamError(f"{source.path}: tensor {', '.join(inputs)} has shape {tuple(tensor.shape)} "
                               f"where {shapes[name]} was expected from config.json")
            writer.write(name, tensor.to(dtype).contiguous())


def _checkpoint_dtype(source: ModelSource) -> torch.dtype:
    # A matmul weight rather than a norm, which some checkpoints keep in fp32 (as bam.mix.mixing does).
    return source.tensor("model.layers.0.attn.q_proj.weight").dtype


@contextlib.contextmanager
def _quiet_transformers():
    """No "Loading weights" progress bar from the internal load-back: it is not the user's load."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def check_parity(model_dir: Path, exported_dir: Path, fmt: str) -> float:
    """Load both models in fp32, compare logits on random tokens; BamError if they differ.

    Returns the max abs difference. The exported directory is loaded by transformers itself (no bam
    code involved), so this checks the files a user gets, config.json included.
    """
    ours = load_model(model_dir, dtype=torch.float32)
    with _quiet_transformers():
        theirs, info = AutoModelForCausalLM.from_pretrained(exported_dir, dtype=torch.float32,
                                                            output_loading_info=True)
    problems = {key: info.get(key) for key in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    problems = {key: value for key, value in problems.items() if value}
    if problems:
        raise RuntimeError(f"{fmt} export loads with {problems}")  # a bug in the plan
    theirs.eval()
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, ours.config.vocab_size, PARITY_TOKENS, generator=generator)
    with torch.no_grad():
        expected = ours(input_ids, use_cache=False).logits
        actual = theirs(input_ids, use_cache=False).logits
    diff = (actual - expected).abs().max().item()
    tolerance = PARITY_TOLERANCE * max(1.0, expected.abs().max().item())
    if not diff < tolerance:
        raise BamError(f"{model_dir}: cannot export to {fmt}: the exported model's logits differ from "
                       f"ours by {diff:.2e} (tolerance {tolerance:.1e}); nothing written")
    return diff


# ---------------------------------------------------------------------------------------------
# --format hf: our weights and our modeling code, loadable with trust_remote_code=True

# Our modules and the file each becomes in the exported directory; any other bam module a bundled
# file imports becomes bam_<name>.py. transformers copies the auto_map files and their relative
# imports into its module cache, so the directory needs nothing but torch and transformers.
REMOTE_CODE_FILES = {"bam.modeling.config": "configuration_bam", "bam.modeling.model": "modeling_bam"}
AUTO_MAP = {"AutoConfig": "configuration_bam.BamConfig", "AutoModelForCausalLM": "modeling_bam.BamForCausalLM"}

_FROM_BAM = re.compile(r"^(?P<indent>[ \t]*)from bam\.(?P<module>[\w.]+) import ", re.MULTILINE)
_OTHER_BAM_IMPORT = re.compile(r"^[ \t]*(import bam\b|from bam import )", re.MULTILINE)


def _remote_file(module: str) -> str:
    return REMOTE_CODE_FILES.get(module, "bam_" + module.removeprefix("bam.").replace(".", "_"))


def _bam_version() -> str:
    try:
        return importlib.metadata.version("bam")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def remote_code_files() -> dict[str, str]:
    """File name -> text of the remote code, generated from bam's own source at call time.

    Each bundled module is our source file with `from bam.x import` rewritten to a relative import
    of the file x becomes, so the remote code is the package's code and cannot drift from it.
    """
    files: dict[str, str] = {}
    pending = list(REMOTE_CODE_FILES)
    while pending:
        module = pending.pop()
        name = _remote_file(module) + ".py"
        if name in files:
            continue
        path = Path(importlib.util.find_spec(module).origin)
        text = path.read_text(encoding="utf-8")
        other = _OTHER_BAM_IMPORT.search(text)
        if other:
            raise BamError(f"cannot bundle {path} as remote code: `{other.group(0).strip()}` "
                           f"(only `from bam.<module> import ...` can be rewritten)")
        pending += ["bam." + match["module"] for match in _FROM_BAM.finditer(text)]
        text = _FROM_BAM.sub(lambda m: f"{m['indent']}from .{_remote_file('bam.' + m['module'])} import ", text)
        header = (f"# Generated by `bam export --format hf` (bam {_bam_version()}) from "
                  f"{module.replace('.', '/')}.py; do not edit: re-export instead.\n")
        files[name] = header + text
    return files


def export_remote_code(source: ModelSource, out: Path, overwrite: bool = False) -> Path:
    """Our config (+ auto_map), our weights in our layout, the remote code and the tokenizer.

    No parity check here: the weights are ours unchanged and the code is our source, and running
    the bundled files in-process would mean trusting remote code, which bam never does by itself
    (tests/test_export.py loads the directory in a Python without bam and compares).
    """
    config = BamConfig.from_dict(source.config.to_dict())
    dtype = _checkpoint_dtype(source)
    config.dtype = dtype
    config.architectures = ["BamForCausalLM"]
    config.auto_map = dict(AUTO_MAP)
    files = remote_code_files()
    for name, text in files.items():  # never write a directory whose code does not even compile
        compile(text, name, "exec")

    shapes = parameter_shapes(config)
    _require_tensors(source, shapes)

    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        config.save_pretrained(tmp)
        _write_tensors(tmp, {name: _same(name) for name in shapes}, shapes, source, dtype)
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8")
        copy_tokenizer(source.tokenizer_dir, tmp)
    return out
