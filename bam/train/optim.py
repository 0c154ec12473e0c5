"""Which parameters train, which decay, and the optimizer that steps them (AdamW).

Which parameters decay and which never train are facts of the parameter layout
(bam/modeling/layout.py), read here. `--train-only` takes a comma-separated list of TRAIN_GROUPS,
each a set of the layout's roles, or raw fnmatch patterns over parameter names
(e.g. 'model.layers.0.*').
"""

from __future__ import annotations

import fnmatch

import torch

from bam.errors import BamError
from bam.modeling.layout import ROLES, ROUTER_ROLES, Param, parameter_table

# AdamW's betas: 0.95 for the second moment as in LLaMA/BTX-style LM training (faster to adapt
# than 0.999 after loss spikes).
ADAM_BETAS = (0.9, 0.95)
ADAM_EPS = 1e-8

# `--train-only` groups: roles of the parameter layout (bam/modeling/layout.py).
TRAIN_GROUPS: dict[str, tuple[str, ...]] = {
    "all": tuple(ROLES),
    # FFN and attention routers, the usual post-mix warm-up; a Nexus router's trainable part is its
    # projection (its domain embeddings are never trained).
    "routers": ROUTER_ROLES,
    "ffn_routers": ("ffn_router", "nexus_projection"),
    "attn_routers": ("attn_router",),
    "experts": ("ffn_experts", "shared_expert"),  # the FFN experts' SwiGLU weights
    "attention": ("attn_query", "attn_key_value", "attn_output"),
    "embeddings": ("embedding", "lm_head"),
    "norms": ("norm",),
    "adapter": ("adapter",),  # LoRA or (IA)³ tensors: what `bam train --adapter` trains, alone
}

# What a mixture of adapter experts trains unless told: its routers and adapters, and the seed's
# embeddings, LM head and norms, which every expert shares and the mixture holds once (the full
# methods average and train them too), so held parameters do not grow; the seed's projections stay
# frozen under the adapters. Half of a full expert's gain is in those shared tensors, out of any
# adapter's reach (measured in docs/adapters.md, "Training"). `routers,adapter` is MoLoRA's recipe.
ADAPTER_MIXTURE_TRAINS = "routers,adapter,embeddings,norms"


def parse_train_only(spec: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """`--train-only` as (roles, name patterns); unknown group names are refused."""
    roles: list[str] = []
    patterns: list[str] = []
    for item in (part.strip() for part in spec.split(",")):
        if item in TRAIN_GROUPS:
            roles.extend(TRAIN_GROUPS[item])
        elif any(ch in item for ch in "*?[") or "." in item:
            patterns.append(item)
        else:
            raise BamError(f"train_only={spec!r}: unknown group {item!r}, expected groups among "
                           f"{', '.join(TRAIN_GROUPS)} or name patterns like 'model.layers.0.*'")
    return tuple(roles), tuple(patterns)


def _layout(model) -> dict[str, Param]:
    table = parameter_table(model.config)
    names = [name for name, _ in model.named_parameters()]
    if set(names) != set(table):  # a model built outside bam's layout: a bug, not a user error
        raise RuntimeError(f"parameters and layout table disagree: {sorted(set(names) ^ set(table))[:4]}")
    return table


def set_trainable(model, spec: str) -> list[str]:
    """Freeze every parameter outside `spec`; returns the trainable names (refuses an empty set)."""
    roles, patterns = parse_train_only(spec)
    table = _layout(model)
    trainable = []
    for name, param in model.named_parameters():
        chosen = table[name].role in roles or any(fnmatch.fnmatchcase(name, p) for p in patterns)
        param.requires_grad_(chosen and table[name].trained)
        if param.requires_grad:
            trainable.append(name)
    if not trainable:
        hint = " (a dense model has no routers)" if "router" in spec else ""
        raise BamError(f"train_only={spec!r}: matches no parameter of this model{hint}")
    return trainable


def param_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups in parameter order: the layout table says which parameters decay."""
    table = _layout(model)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if table[name].decays else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay, "group": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "group": "no_decay"}]
    return [g for g in groups if g["params"]]


def make_optimizer(model, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over `param_groups`, with torch's fused kernel where it exists (CPU and CUDA).

    On CPU the default single-tensor implementation loops over the parameters in Python with
    several full passes each; the fused kernel does one pass per parameter: at d=256, vocab
    32000 (bench/train_step.py) the step takes 16 ms instead of 64-80 ms on one thread, and the
    multi-tensor `foreach=True` is slower still (88-103 ms).
    """
    device = next(model.parameters()).device
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS,
                             fused=device.type in ("cpu", "cuda"))
