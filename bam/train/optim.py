"""Which parameters train, which decay, and the optimizer that steps them (AdamW).

`--train-only` takes a comma-separated list of TRAIN_GROUPS (or raw fnmatch patterns over
parameter names, e.g. 'model.layers.0.*'). The patterns follow bam/modeling/model.py's names.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

import torch

from bam.errors import BamError

# AdamW's betas: 0.95 for the second moment as in LLaMA/BTX-style LM training (faster to adapt
# than 0.999 after loss spikes).
ADAM_BETAS = (0.9, 0.95)
ADAM_EPS = 1e-8

TRAIN_GROUPS: dict[str, tuple[str, ...]] = {
    "all": ("*",),
    # FFN and attention routers, the usual post-mix warm-up; a Nexus router's trainable part is its
    # projection (its domain embeddings stay fixed, see FIXED_PATTERNS).
    "routers": ("*.router.weight", "*.ffn.router.gate_up_proj", "*.ffn.router.down_proj"),
    "ffn_routers": ("*.ffn.router.weight", "*.ffn.router.gate_up_proj", "*.ffn.router.down_proj"),
    "attn_routers": ("*.attn.router.weight",),
    "experts": ("*.ffn.experts.*", "*.ffn.shared_expert.*"),  # the FFN experts' SwiGLU weights
    "attention": ("*.attn.q_proj.*", "*.attn.k_proj.*", "*.attn.v_proj.*", "*.attn.o_proj.*"),
    "embeddings": ("model.embed_tokens.weight", "lm_head.weight"),
    "norms": ("*norm.weight",),
}

# No weight decay on norms and biases (nanoGPT/LLaMA convention) nor on routers: decay pulls
# router weights to zero, i.e. towards uniform routing, which fights the experts' specialisation.
NO_DECAY_PATTERNS = ("*norm.weight", "*.bias", "*.router.weight", "*.ffn.router.gate_up_proj",
                     "*.ffn.router.down_proj")
# Never trained: a Nexus expert's domain embedding is a fixed description of its data (METHOD.md 3.3).
FIXED_PATTERNS = ("*.ffn.router.domain_embeddings",)


def select_patterns(spec: str) -> tuple[str, ...]:
    patterns: list[str] = []
    for item in (part.strip() for part in spec.split(",")):
        if item in TRAIN_GROUPS:
            patterns.extend(TRAIN_GROUPS[item])
        elif any(ch in item for ch in "*?[") or "." in item:
            patterns.append(item)
        else:
            raise BamError(f"--train-only {spec}: unknown group {item!r}, expected groups among "
                           f"{', '.join(TRAIN_GROUPS)} or name patterns like 'model.layers.0.*'")
    return tuple(patterns)


def matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def set_trainable(model, spec: str) -> list[str]:
    """Freeze every parameter outside `spec`; returns the trainable names (refuses an empty set)."""
    patterns = select_patterns(spec)
    trainable = []
    for name, param in model.named_parameters():
        param.requires_grad_(matches(name, patterns) and not matches(name, FIXED_PATTERNS))
        if param.requires_grad:
            trainable.append(name)
    if not trainable:
        hint = " (a dense model has no routers)" if "router" in spec else ""
        raise BamError(f"--train-only {spec}: matches no parameter of this model{hint}")
    return trainable


def param_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups in parameter order: matrices decay; norms, biases and routers do not."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or matches(name, NO_DECAY_PATTERNS) else decay).append(param)
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
