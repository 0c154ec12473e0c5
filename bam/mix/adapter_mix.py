"""Mixing adapters of one seed into an MoE of adapter experts (METHOD.md 7), and materializing one.

`bam mix --base SEED ADAPTER...` makes expert j the seed plus adapter j, and (unless
`base_expert=False`) the seed itself the first expert, a zero adapter: LoRA's B = 0 (A drawn as PEFT
draws a new adapter's, so the general expert can train), (IA)³'s vectors = 1. The output holds the
seed's tensors once and the adapters stacked one per expert (config.adapter_experts,
bam/modeling/adapters.py). The methods keep their meaning from bam/mix/rules.py: what a full mix
stacks per expert stays per expert (as adapters), what it averages is averaged, exactly, by
averaging the experts' full weights W + delta_j into the one stored weight:

    adapter on             btx        bam                      bam-shared
    FFN (gate/up, down)    experts    experts                  experts
    q, o                   averaged   experts                  experts
    k, v                   averaged   experts                  averaged

A bam mix whose adapters leave k and v alone has K/V sharing, exactly (every expert's keys are the
seed's), so one KV cache instead of N copies of the same one. Attention experts mix their outputs
(BAM) or, with attn_mixing='parameters', their projections (MoLoRA, MoV); both from the same tensors.

`materialize` turns an adapter-expert model into the equivalent MoE of full experts (each expert's
weights W + delta_j), so every export and tool that takes a full mixture takes it.

Adapters are checked against the seed before anything is written: the base fingerprint in
bam_base.json (bam/formats/peft.py) when there is one, the family, the tensors' shapes, and across
experts the kind, targets and rank (their stacks share one shape). Different lora_alpha values are
fine: each B is rescaled to the first adapter's scaling, which leaves its update unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from bam.errors import BamError
from bam.formats.model_dir import copy_tokenizer
from bam.formats.peft import ADAPTER_CONFIG, adapter_family, base_identity, is_adapter_dir, open_adapter
from bam.formats.source import ModelSource
from bam.io.atomic import atomic_output_dir
from bam.io.tensor_files import StreamingSafetensorsWriter, WEIGHTS_NAME
from bam.mix.mixing import _one_compute_thread, progress_disabled, source_dtype
from bam.mix.provenance import write_provenance
from bam.mix.rules import new_router, router_seed
from bam.modeling.config import ATTN_MIXINGS, BamConfig, config_from_dict, full_experts_config
from bam.modeling.layout import Param, adapted_projections, parameters
from bam.train.fingerprint import model_fingerprint

ADAPTER_METHODS = ("btx", "bam", "bam-shared")
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
KV_TARGETS = ("k_proj", "v_proj")
ADAPTER_FIELDS = ("adapter", "adapter_targets", "lora_rank")  # what every expert's adapter must share

Reader = Callable[[str], torch.Tensor]


# ---------------------------------------------------------------------------------------------
# The mixed config


def adapter_mixed_config(base: BamConfig, adapter: BamConfig, method: str, n_experts: int, *,
                         attn_mixing: str = "outputs", top_k: int = 1, renormalize: bool = False,
                         router_init_std: float = 0.02) -> BamConfig:
    """The seed's config with n_experts adapter experts under `method`: the adapters' targets that
    stay per expert (the table in this module's docstring), the rest averaged into the seed's weights."""
    targets = list(adapter.adapter_targets)
    kv_per_expert = method == "bam" and any(t in targets for t in KV_TARGETS)
    if method == "btx":
        targets = [t for t in targets if t not in ATTENTION_TARGETS]
    elif not kv_per_expert:
        targets = [t for t in targets if t not in KV_TARGETS]
    has_ffn = any(t not in ATTENTION_TARGETS for t in targets)
    has_attention = any(t in ATTENTION_TARGETS for t in targets)  # (else its experts would all be the seed's)
    if not targets:
        raise BamError(f"{method} of {adapter.adapter} adapters on {', '.join(adapter.adapter_targets)}: every "
                       f"adapter would be averaged into one model; btx needs adapters on the FFN "
                       f"(gate_proj/up_proj/down_proj)")
    fields = base.to_dict()
    fields.update(
        adapter=adapter.adapter, adapter_targets=targets, lora_rank=adapter.lora_rank, lora_alpha=adapter.lora_alpha,
        adapter_experts=True,
        n_attn_experts=n_experts if has_attention else 1,
        kv_shared=has_attention and not kv_per_expert,
        attn_routing="soft", attn_top_k=1, attn_mixing=attn_mixing,
        n_ffn_experts=n_experts if has_ffn else 1,
        ffn_top_k=top_k if has_ffn else 1,
        ffn_renormalize=renormalize,
        router_init_std=router_init_std,
        architectures=["BamForCausalLM"],
    )
    return config_from_dict(fields, f"mixed config ({method} of adapters)")


# ---------------------------------------------------------------------------------------------
# Checks that run before any output exists


def open_adapters(base: ModelSource, adapter_dirs: Sequence[Path]) -> list[ModelSource]:
    """Each adapter directory on `base`, checked: an adapter, of this base (fingerprint, family,
    shapes), and of the same kind, targets and rank as the first."""
    if base.config.adapter is not None or not base.config.is_dense:
        raise BamError(f"--base {base.path}: expected a dense model without an adapter (the seed)")
    family = adapter_family(base)
    fingerprint = None
    adapters = []
    for adapter_dir in adapter_dirs:
        if not is_adapter_dir(adapter_dir):
            raise BamError(f"{adapter_dir}: not an adapter directory (no {ADAPTER_CONFIG}); with --base every "
                           f"DIR is an adapter of the seed (bam train --adapter, or PEFT's save_pretrained)")
        identity = base_identity(adapter_dir)
        if identity is not None:
            if identity.get("family") not in (None, family):
                raise BamError(f"{adapter_dir}: bam_base.json field base.family={identity['family']!r}, expected "
                               f"{family!r} (the family of --base {base.path})")
            fingerprint = fingerprint or model_fingerprint(Path(base.path))
            if identity.get("fingerprint") != fingerprint:
                raise BamError(f"{adapter_dir}: bam_base.json field base.fingerprint differs from --base "
                               f"{base.path}'s: an adapter of another base (trained on {identity.get('path')})")
        adapters.append(open_adapter(Path(adapter_dir), base))  # (checks every tensor's name and shape)
    if not adapters:
        raise BamError("mix --base needs at least one adapter directory")
    first = adapters[0]
    for source in adapters:
        for field in ADAPTER_FIELDS:
            a, b = getattr(first.config, field), getattr(source.config, field)
            if a != b:
                raise BamError(f"{source.path}: adapter field {field}={b!r} but {a!r} in {first.path}; "
                               f"adapter experts stack into one tensor per projection")
    return adapters


# ---------------------------------------------------------------------------------------------
# Expert weights: the seed's projection with one expert's adapter, as a full weight


def projection_tensors(config: BamConfig, layer: int) -> dict[str, tuple[str, str, int]]:
    """Each adapted projection of layer `layer`: our adapter name -> (weight name, adapter prefix,
    dim of the full mixture it is stacked along: rows 0 for q/k/v, columns 1 for o; the FFN's
    weights are 3-D [E, ...], which `materialize` stacks along a new leading dim)."""
    prefix = f"model.layers.{layer}."
    found = {}
    for sublayer in ("attn", "ffn"):
        for name, _, _, _ in adapted_projections(config, sublayer):
            weight = f"{prefix}attn.{name}.weight" if sublayer == "attn" else f"{prefix}ffn.experts.{name}"
            found[name] = (weight, f"{prefix}{sublayer}.adapter.{name}", 1 if name == "o_proj" else 0)
    return found


def expert_weight(config: BamConfig, name: str, weight: torch.Tensor, bias: torch.Tensor | None,
                  adapter: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Projection `name`'s weight [O, I] (and bias [O]) with one expert's adapter merged, as PEFT's
    merge_and_unload does: W + s B A (the fused gate_up_proj: [B_g A_g; B_u A_u]); (IA)³ scales the
    output's rows (and bias), or down_proj's input columns. `adapter` holds its tensors by suffix."""
    w = weight.float()
    if config.adapter == "lora":
        a, b = adapter["lora_A"].float(), adapter["lora_B"].float()
        delta = b @ a if a.dim() == 2 else torch.cat([b[p] @ a[p] for p in range(a.shape[0])])
        return w + delta * (config.lora_alpha / config.lora_rank), bias
    scale = adapter["ia3"].float()
    if name == "down_proj":
        return w * scale, bias
    return w * scale[:, None], None if bias is None else bias.float() * scale


def adapter_slice(read: Reader, prefix: str, kind: str, e: int) -> dict[str, torch.Tensor]:
    """Expert e's adapter tensors of one projection from the stacks, by suffix (lora_A, lora_B or ia3)."""
    suffixes = ("lora_A", "lora_B") if kind == "lora" else ("ia3",)
    return {suffix: read(f"{prefix}_{suffix}")[e] for suffix in suffixes}


# ---------------------------------------------------------------------------------------------
# The adapter MoE, tensor by tensor


def zero_adapter(param: Param, config: BamConfig, seed: int) -> torch.Tensor:
    """The seed's own expert, one expert's slice of `param`: an adapter that changes nothing. LoRA's A
    is drawn as PEFT draws a new adapter's (kaiming-uniform, from a generator seeded by the name),
    so the general expert's adapter trains like any new one; B and (IA)³'s vectors are identities."""
    shape = param.shape[1:]
    if param.name.endswith("_lora_A"):
        bound = 1 / math.sqrt(shape[-1])
        generator = torch.Generator().manual_seed(router_seed(seed, param.name))
        return (torch.rand(shape, generator=generator) * 2 - 1) * bound
    return torch.zeros(shape) if param.name.endswith("_lora_B") else torch.ones(shape)


def adapter_mix_reader(base: ModelSource, adapters: Sequence[ModelSource], config: BamConfig, *,
                       base_expert: bool, seed: int, dtype: torch.dtype) -> Reader:
    """Tensor `name` of the adapter MoE, computed on demand from the seed and the adapters."""
    table = {param.name: param for param in parameters(config)}
    scaling = config.lora_alpha / config.lora_rank if config.adapter == "lora" else None
    merged = {}  # weight or bias name -> (projection, adapter prefix)
    for layer in range(config.num_hidden_layers):
        per_expert = projection_tensors(config, layer)
        for name, (weight, prefix, _) in projection_tensors(adapters[0].config, layer).items():
            if name not in per_expert:
                merged[weight] = (name, prefix)
                merged[weight.replace(".weight", ".bias")] = (name, prefix)

    def expert_adapter(source: ModelSource, name: str) -> torch.Tensor:
        tensor = source.tensor(name).float()
        if name.endswith("_lora_B") and source.config.lora_alpha != config.lora_alpha:
            tensor = tensor * (source.config.lora_alpha / source.config.lora_rank) / scaling
        return tensor

    def average_into_seed(name: str) -> torch.Tensor:
        projection, prefix = merged[name]
        weight_name = name.replace(".bias", ".weight")
        weight = base.tensor(weight_name)
        bias = base.tensor(name) if name.endswith(".bias") else None
        suffixes = ("lora_A", "lora_B") if config.adapter == "lora" else ("ia3",)
        experts = [{s: expert_adapter(source, f"{prefix}_{s}") for s in suffixes} for source in adapters]
        if base_expert:
            experts.append(None)  # the seed: its own weight
        total = None
        for adapter in experts:
            w, b = (weight.float(), bias) if adapter is None else \
                expert_weight(adapters[0].config, projection, weight, bias, adapter)
            term = b.float() if name.endswith(".bias") else w
            total = term if total is None else total + term
        return total / len(experts)

    def read(name: str) -> torch.Tensor:
        param = table[name]
        if param.role in ("attn_router", "ffn_router"):
            return new_router(name, param.shape, config.router_init_std, seed, dtype)
        if param.role == "adapter":
            slices = [expert_adapter(source, name) for source in adapters]
            if base_expert:
                slices.insert(0, zero_adapter(param, config, seed))
            return torch.stack(slices).to(dtype)
        if name in merged:
            return average_into_seed(name).to(dtype)
        return base.tensor(name).to(dtype)

    return read


def mix_adapters(base: ModelSource, adapter_dirs: Sequence[Path], method: str, out: str | Path, *,
                 base_expert: bool = True, attn_mixing: str = "outputs", top_k: int = 1,
                 renormalize: bool = False, router_init_std: float = 0.02, seed: int = 0,
                 materialize: bool = False, overwrite: bool = False, progress: bool | None = None) -> Path:
    """Write the MoE of adapter experts (or with `materialize`, its full-expert equivalent) to `out`."""
    if method not in ADAPTER_METHODS:
        raise BamError(f"--method {method} with --base: expected one of {', '.join(ADAPTER_METHODS)} "
                       f"(the methods that mix adapters)")
    if attn_mixing not in ATTN_MIXINGS:
        raise BamError(f"--attn-mixing {attn_mixing}: expected one of {', '.join(ATTN_MIXINGS)}")
    out = Path(out)
    adapters = open_adapters(base, adapter_dirs)
    n_experts = len(adapters) + int(base_expert)
    if n_experts < 2:
        raise BamError(f"{n_experts} expert: a mixture needs at least two (another adapter, or the seed "
                       f"as an expert: drop --no-base-expert)")
    if not 1 <= top_k <= n_experts:
        raise BamError(f"--top-k {top_k}: expected between 1 and the number of experts ({n_experts})")
    if out.exists() and not overwrite:
        raise BamError(f"{out}: output already exists (choose another path or pass --overwrite)")
    if any(out.resolve() == Path(p).resolve() for p in (base.path, *adapter_dirs)):
        raise BamError(f"{out}: output would replace an input")
    config = adapter_mixed_config(base.config, adapters[0].config, method, n_experts, attn_mixing=attn_mixing,
                                  top_k=top_k, renormalize=renormalize, router_init_std=router_init_std)
    dtype = source_dtype(base)
    read = adapter_mix_reader(base, adapters, config, base_expert=base_expert, seed=seed, dtype=dtype)
    outputs = parameters(config)
    if materialize:
        config, outputs, read = materialized(config, read)
    config.dtype = dtype
    with atomic_output_dir(out, overwrite=overwrite) as tmp, _one_compute_thread():
        config.save_pretrained(tmp)
        specs = {param.name: (dtype, param.shape) for param in outputs}
        with StreamingSafetensorsWriter(tmp / WEIGHTS_NAME, specs) as writer:
            for param in tqdm(outputs, desc=f"bam mix ({method} of adapters)", unit="tensor",
                              disable=progress_disabled(progress)):
                writer.write(param.name, read(param.name).to(dtype))
        copy_tokenizer(base.tokenizer_dir, tmp)
        write_provenance(tmp, {
            "method": method, "adapter_experts": not materialize, "materialized": materialize,
            "base": {"path": str(Path(base.path).resolve()), "family": base.family},
            "base_expert": base_expert,
            "sources": [{"path": str(Path(p).resolve()), "family": "peft"} for p in adapter_dirs],
            "n_experts": n_experts, "attn_mixing": attn_mixing, "top_k": top_k, "renormalize": renormalize,
            "router_init_std": router_init_std, "seed": seed, "dtype": str(dtype).removeprefix("torch."),
        })
    return out


# ---------------------------------------------------------------------------------------------
# Materializing: adapter experts -> full experts


def materialized(config: BamConfig, read: Reader) -> tuple[BamConfig, list[Param], Reader]:
    """The full-expert MoE computing what the adapter-expert model (config, read) computes: its
    config, tensors and a reader of them. Expert j of each projection is W + delta_j; tensors of
    one copy that the full layout keeps per expert (q/k norms) are repeated."""
    full = full_experts_config(config)
    adapted = {}  # weight or bias name of the full layout -> (projection, adapter prefix, stack dim)
    for layer in range(config.num_hidden_layers):
        for name, (weight, prefix, dim) in projection_tensors(config, layer).items():
            biases = [] if name == "o_proj" else [weight.replace(".weight", ".bias"), f"{weight}_bias"]
            for tensor in (weight, *biases):  # (o_proj's bias is one per layer, not per expert)
                adapted[tensor] = (name, prefix, dim)
    outputs = parameters(full)
    table = {param.name: param for param in outputs}
    copies = {param.name: param for param in parameters(config)}

    def read_full(name: str) -> torch.Tensor:
        param, stored = table[name], copies[name]
        if name not in adapted:
            if param.shape == stored.shape:
                return read(name)
            n = param.shape[param.expert_dim] // stored.shape[param.expert_dim]  # the one copy, per expert
            return torch.cat([read(name)] * n, dim=param.expert_dim)
        projection, prefix, dim = adapted[name]
        n = config.projection_experts(projection)
        is_bias = name.endswith("bias")
        seed = read(name)
        if param.role == "ffn_experts":  # [1, ...] -> [E, ...]
            seed = seed[0]
        weight_name = name.replace(".bias", ".weight").removesuffix("_bias")
        weight = read(weight_name)[0] if param.role == "ffn_experts" else read(weight_name)
        experts = []
        for e in range(n):
            w, b = expert_weight(config, projection, weight, seed if is_bias else None,
                                 adapter_slice(read, prefix, config.adapter, e))
            experts.append(b if is_bias else w)
        if param.role == "ffn_experts":
            return torch.stack(experts)
        return torch.cat(experts, dim=0 if is_bias else dim)

    return full, outputs, read_full
