"""Adding one more dense expert to a mixture (METHOD.md 3.3, "adding an expert after training").

`add_expert` appends one dense model's FFN (and attention, if the mixture has attention experts)
as expert N+1 and merges every other tensor as (1 - λ) * moe + λ * new (see its docstring; the
per-tensor rules are `added_tensor_rule` in bam/mix/rules.py). It checks and streams like `mix`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from bam.errors import BamError
from bam.formats.model_dir import copy_tokenizer, open_model
from bam.formats.source import ModelSource
from bam.io.atomic import atomic_output_dir
from bam.io.tensor_files import StreamingSafetensorsWriter, WEIGHTS_NAME
from bam.mix.mixing import (
    check_output,
    check_sources,
    check_tokenizers,
    progress_disabled,
    source_dtype,
)
from bam.mix.provenance import read_provenance, write_provenance
from bam.mix.rules import added_tensor_rule, average, new_router
from bam.modeling.config import COMPATIBILITY_FIELDS, BamConfig, config_from_dict
from bam.modeling.layout import Param, parameter_shapes, parameters


def grown_config(config: BamConfig, domain: str, linear_router: bool = False) -> BamConfig:
    """The mixture's config with one more routed FFN expert (and attention expert, if it has them);
    `linear_router` swaps a Nexus router for a linear one (`add_expert(..., reset_router=True)`)."""
    fields = config.to_dict()
    fields.update(
        n_ffn_experts=config.n_ffn_experts + 1,
        n_attn_experts=config.n_attn_experts + 1 if config.n_attn_experts > 1 else 1,
        ffn_expert_domains=None if config.ffn_expert_domains is None else [*config.ffn_expert_domains, domain],
    )
    if linear_router:
        fields.update(ffn_router="linear", nexus_embed_dim=None, nexus_hidden_dim=None, nexus_embedding_source=None)
    return config_from_dict(fields, "config with the added expert")


def check_add_request(moe: ModelSource, new: ModelSource, domain: str, embedding: torch.Tensor | None,
                      merge_weight: float, reset_router: bool, router_init_std: float) -> None:
    config = moe.config
    if config.is_dense:
        raise BamError(f"{moe.path}: a dense model; add-expert appends to a mixture (make one with bam mix)")
    if not new.config.is_dense:
        raise BamError(f"{new.path}: already a mixture (n_ffn_experts={new.config.n_ffn_experts}); "
                       "the new expert must be a dense model")
    for field in COMPATIBILITY_FIELDS:
        a, b = getattr(config, field), getattr(new.config, field)
        if a != b:
            raise BamError(f"new expert differs from the mixture in {field}: {b!r} in {new.path} vs {a!r} in {moe.path}")
    if not isinstance(domain, str) or not domain:
        raise BamError(f"--domain {domain!r}: expected a domain name")
    if domain in (config.ffn_expert_domains or []):
        raise BamError(f"--domain {domain}: the mixture already has an expert for it "
                       f"(experts: {', '.join(config.ffn_expert_domains)})")
    if config.ffn_router == "nexus" and not reset_router:
        if embedding is None:
            raise BamError(f"{moe.path}: a Nexus mixture needs the new domain's embedding")
        if tuple(embedding.shape) != (config.nexus_embed_dim,):
            raise BamError(f"domain embedding of {domain!r} has shape {tuple(embedding.shape)}, the mixture's "
                           f"have ({config.nexus_embed_dim},) (nexus_embed_dim): embed it like the others")
        if not bool(torch.isfinite(embedding).all()):
            raise BamError(f"domain embedding of {domain!r} has non-finite values")
    elif embedding is not None:
        router = "a reset (new linear) router" if reset_router else f"ffn_router={config.ffn_router!r}"
        raise BamError(f"{moe.path}: {router} has no domain embeddings; pass none")
    if not 0 < merge_weight <= 1:
        raise BamError(f"--merge-weight {merge_weight}: expected a number in (0, 1]")
    if router_init_std < 0:
        raise BamError(f"--router-init-std {router_init_std}: expected a non-negative number")


def add_expert(moe: str | Path | ModelSource, new: str | Path | ModelSource, domain: str,
               embedding: torch.Tensor | None, out: str | Path, *, reset_router: bool = False,
               merge_weight: float | None = None, router_init_std: float | None = None, seed: int = 0,
               overwrite: bool = False, progress: bool | None = None) -> Path:
    """Write `moe` with the dense model `new` appended as routed expert N+1 to `out`; returns `out`.

    - The new model's FFN becomes the last routed expert. If the mixture has attention experts,
      the new model's Q and O (and K, V, unless K/V are shared) become the last attention expert.
    - Nexus: `embedding` [nexus_embed_dim] becomes the last row of every layer's domain
      embeddings. Compute it the way the mixture's were (bam.mix.nexus with the mixture's
      `nexus_embedding_source`). The projection is kept as trained (no router reset), so the new
      expert is routed by P(d_new) from the start.
    - A linear FFN router and an attention router each get one new row ~ N(0, router_init_std^2)
      (default: the mixture's router_init_std), seeded by (seed, tensor name, domain); the
      trained rows are kept.
    - `reset_router` replaces the whole FFN router by a new linear one ~ N(0, router_init_std^2)
      over all N+1 experts, whatever the mixture had (a Nexus router's projection and domain
      embeddings are dropped): the "linear router reset" baseline METHOD.md 3.3 compares Nexus with.
    - The shared expert is kept. Every other tensor (embeddings, norms, LM head, averaged
      attention, shared K/V) becomes (1 - λ) * moe + λ * new with λ = `merge_weight`, by default
      1/(N+1), N = routed experts before adding (METHOD.md 3.3). (For a Nexus mixture of a seed and
      N experts those tensors average N+1 models, so 1/(N+2) would be the exact running mean; we
      keep the paper's 1/(N+1).)

    `out` gets the mixture's dtype and tokenizer and a mix.json: the mixture's, plus this addition.
    Everything is checked before `out` is created, and tensors are streamed as in `mix`.
    """
    moe = moe if isinstance(moe, ModelSource) else open_model(moe)
    new = new if isinstance(new, ModelSource) else open_model(new)
    out = Path(out)
    config = moe.config
    n_experts = config.n_ffn_experts
    lam = 1.0 / (n_experts + 1) if merge_weight is None else float(merge_weight)
    std = config.router_init_std if router_init_std is None else float(router_init_std)
    check_add_request(moe, new, domain, embedding, lam, reset_router, std)
    check_sources([new])
    check_tokenizers([moe, new])
    check_output(out, [moe, new], overwrite)

    new_config = grown_config(config, domain, linear_router=reset_router and config.ffn_router == "nexus")
    dtype = source_dtype(moe)
    new_config.dtype = dtype
    moe_shapes, new_shapes = parameter_shapes(config), parameter_shapes(new.config)
    outputs = parameters(new_config)

    def read(source: ModelSource, name: str) -> torch.Tensor:
        tensor = source.tensor(name)
        expected = (moe_shapes if source is moe else new_shapes)[name]
        if tuple(tensor.shape) != expected:
            raise BamError(f"{source.path}: tensor {name} has shape {tuple(tensor.shape)}, expected {expected}")
        return tensor.to(dtype)

    def output_tensor(param: Param) -> torch.Tensor:
        name, rule = param.name, added_tensor_rule(param, config)
        if rule.kind == "keep":
            return read(moe, name)
        if rule.kind == "append_embedding":
            return torch.cat([read(moe, name), embedding.detach().reshape(1, -1).to(dtype)])
        if rule.kind == "router_row":
            # No old linear router: the mixture had a Nexus one (reset), or a single routed expert,
            # which needs no router (bam/modeling/moe.py).
            if name not in moe_shapes or (reset_router and param.role == "ffn_router"):
                return new_router(name, param.shape, std, seed, dtype)
            row = new_router(f"{name}/added/{domain}", (1, param.shape[1]), std, seed, dtype)
            return torch.cat([read(moe, name), row])
        if rule.kind == "append":
            return torch.cat([read(moe, name), read(new, name)], dim=rule.dim)
        return average([read(moe, name), read(new, name)], [1.0 - lam, lam], dtype)

    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        new_config.save_pretrained(tmp)
        specs = {param.name: (dtype, param.shape) for param in outputs}
        with StreamingSafetensorsWriter(tmp / WEIGHTS_NAME, specs) as writer:
            for param in tqdm(outputs, desc="bam add-expert", unit="tensor", disable=progress_disabled(progress)):
                writer.write(param.name, output_tensor(param))
        copy_tokenizer(moe.tokenizer_dir, tmp)
        provenance = read_provenance(moe.path)
        provenance.setdefault("added_experts", []).append({
            "domain": domain,
            "path": str(Path(new.path).resolve()),
            "family": new.family,
            "into": str(Path(moe.path).resolve()),
            "expert_index": n_experts,
            "merge_weight": lam,
            "reset_router": reset_router,
            "router_init_std": std,
            "seed": seed,
        })
        write_provenance(tmp, provenance)
    return out
