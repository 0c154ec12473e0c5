"""Per-tensor rules: which function builds each output tensor of a mix, and the pure functions
that implement them (METHOD.md section 3).

Every output tensor is a pure function of the same-named tensors of the dense sources, chosen by
its role in the parameter layout (bam/modeling/layout.py):

    tensor                        btx       bam       bam-shared   upcycle (one source)
    ffn experts (weights, biases) stack     stack     stack        repeat N times
    attn q (weight, bias), o      average   stack     stack        copy
    attn k, v (weight, bias)      average   stack     average      copy
    attn o bias (GPT-NeoX)        average   average   average      copy  (one per layer: gates sum to 1)
    everything else               average   average   average      copy
    ffn router                    new       new       new          new
    attn router                   -         new       new          -

Nexus (METHOD.md 3.3) takes the seed first, then N domain experts. The seed's FFN becomes the
always-on shared expert, the N domain experts' FFNs are stacked as the routed experts, and every
other tensor is averaged over all N+1 models, as btx does. The router is Nexus's: the given domain
embeddings (one per domain expert) and a new projection (small normals like any new router).
`nexus-bam` and `nexus-bam-shared` are our extension: attention experts as in bam / bam-shared,
one per model, the seed's included (attention has no shared expert; all N+1 are soft-routed).

"stack" puts expert j's tensor in slot j, expert-major (the layout bam/modeling/config.py describes): rows
of q/k/v, columns of o_proj, dim 0 of the 3-D FFN expert tensors. Averages are uniform unless
weights are given (they are normalized to sum to 1). Routers are new, N(0, router_init_std), drawn
from a generator seeded by (seed, tensor name), so a router does not depend on which tensors were
computed before it.

Adding one dense expert to a mixture (bam/mix/add_expert.py) has rules of its own:
`added_tensor_rule`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from bam.errors import BamError
from bam.modeling.config import BamConfig
from bam.modeling.layout import ROUTER_ROLES, Param

NEXUS_METHODS = ("nexus", "nexus-bam", "nexus-bam-shared")
METHODS = ("btx", "bam", "bam-shared", "upcycle", *NEXUS_METHODS)


@dataclass(frozen=True)
class Rule:
    # mix: "average" | "copy" | "stack" | "repeat" | "router" | "shared_expert" | "domain_embeddings"
    # add_expert: "keep" | "append" | "append_embedding" | "router_row" | "merge"
    kind: str
    dim: int = 0  # the dimension experts are stacked along ("stack", "repeat")
    routed_only: bool = False  # "stack" over the domain experts only (Nexus: not the seed)


# The attention roles (bam/modeling/layout.py) each method keeps per expert, stacked along the
# tensor's expert dimension: rows of the input projections ([H*A, D] -> [E*H*A, D]), columns of
# the output projection. Every other attention tensor is averaged.
PER_EXPERT_ATTENTION = {
    "bam": ("attn_query", "attn_key_value"),
    "bam-shared": ("attn_query",),
}
PER_EXPERT_ATTENTION["nexus-bam"] = PER_EXPERT_ATTENTION["bam"]
PER_EXPERT_ATTENTION["nexus-bam-shared"] = PER_EXPERT_ATTENTION["bam-shared"]


def tensor_rule(param: Param, method: str) -> Rule:
    """How output tensor `param` is built under `method` (the table in this module's docstring)."""
    if param.role in ROUTER_ROLES:  # new, like any router
        return Rule("router")
    if param.role == "domain_embeddings":
        return Rule("domain_embeddings")
    if param.role == "shared_expert":
        return Rule("shared_expert")
    if param.role == "ffn_experts":
        kind = "repeat" if method == "upcycle" else "stack"
        return Rule(kind, param.expert_dim, routed_only=method in NEXUS_METHODS)
    if method == "upcycle":
        return Rule("copy")
    if param.role in PER_EXPERT_ATTENTION.get(method, ()):
        return Rule("stack", param.expert_dim)
    return Rule("average")


def added_tensor_rule(param: Param, config: BamConfig) -> Rule:
    """How tensor `param` of a mixture with config `config` grows when one dense expert is appended.

        FFN experts; q/o of attention experts (k/v too with KV experts)  append the new model's slice
        Nexus domain embeddings                                         append the new domain's vector
        Nexus projection W1, W2; the shared expert                      keep
        linear FFN router, attention router                             append a new row
        everything else (k/v too with KV sharing)                       merge (1 - λ) * moe + λ * new
    """
    if param.role == "domain_embeddings":
        return Rule("append_embedding")
    if param.role in ("attn_router", "ffn_router"):
        return Rule("router_row")
    if param.role in ("nexus_projection", "shared_expert"):
        return Rule("keep")
    if param.role == "ffn_experts":
        return Rule("append", param.expert_dim)
    if config.n_attn_experts > 1 and param.role in PER_EXPERT_ATTENTION["bam-shared" if config.kv_shared else "bam"]:
        return Rule("append", param.expert_dim)
    return Rule("merge")


def average(tensors: Iterable[torch.Tensor], weights: Sequence[float] | None = None,
            dtype: torch.dtype | None = None) -> torch.Tensor:
    """sum_j w_j * t_j with w normalized to sum to 1 (uniform without weights).

    Accumulates in at least fp32, so averaging bf16 experts loses nothing before the final cast.
    With weights given, `tensors` may be a lazy iterator: only one input is held at a time.
    """
    if weights is None:
        tensors = list(tensors)
        weights = [1.0] * len(tensors)
    total = float(sum(weights))
    if not weights or total <= 0 or any(w < 0 for w in weights):
        raise BamError(f"averaging weights {list(weights)}: expected non-negative numbers with a positive sum")
    acc = None
    for weight, tensor in zip(weights, tensors, strict=True):
        if acc is None:
            # The first term starts the sum: no zero-filled accumulator to add it to. Scale in
            # place only a copy made by the cast, never the caller's tensor.
            acc = tensor.to(torch.promote_types(tensor.dtype, torch.float32))
            acc = acc * (weight / total) if acc is tensor else acc.mul_(weight / total)
            dtype = dtype or tensor.dtype
        else:
            acc.add_(tensor, alpha=weight / total)  # a bf16 `tensor` is upcast inside the kernel, no copy
    return acc.to(dtype)


def stack(tensors: Iterable[torch.Tensor], n: int, dim: int = 0, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Concatenate n equal-shaped tensors along `dim`, tensor j in slot j (expert-major).

    The output is allocated once and filled in place, so a lazy iterator holds one input at a time.
    """
    out, count = None, 0
    for j, tensor in enumerate(tensors):
        if out is None:
            shape = list(tensor.shape)
            shape[dim] *= n
            out = torch.empty(shape, dtype=dtype or tensor.dtype)
        width = tensor.shape[dim]
        out.narrow(dim, j * width, width).copy_(tensor)
        count += 1
    if count != n:
        raise ValueError(f"stack expected {n} tensors, got {count}")
    return out


def router_seed(seed: int, name: str) -> int:
    """A 63-bit generator seed from (seed, tensor name): independent of processing order."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def new_router(name: str, shape: Sequence[int], std: float, seed: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A fresh router weight ~ N(0, std^2), the same for the same (seed, name) on every machine."""
    generator = torch.Generator().manual_seed(router_seed(seed, name))
    return (torch.randn(tuple(shape), generator=generator, dtype=torch.float32) * std).to(dtype)
