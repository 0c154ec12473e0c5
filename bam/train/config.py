"""The settings of one training run (TrainConfig), checked on construction so that a bad value
fails before any work, and where tokenized shards are cached unless a run says otherwise."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bam.data.shards import TokenizedDomain
from bam.data.sources import Domain, DomainSpec
from bam.errors import BamError, need
from bam.modeling.config import ADAPTER_TARGETS, ADAPTERS
from bam.train.optim import parse_train_only

DIST_MODES = ("ddp", "fsdp")
# LoRA on every linear projection of attention and FFN; (IA)³ as PEFT's default for Llama and as
# MoV (METHOD.md 7): keys, values and the FFN's hidden activation.
DEFAULT_ADAPTER_TARGETS = {"lora": ADAPTER_TARGETS["lora"], "ia3": ("k_proj", "v_proj", "down_proj")}


@dataclass
class TrainConfig:
    """Everything `bam train` needs; validated on construction so a bad value fails before any work.

    `data` items are `NAME=PATH[:WEIGHT]` strings, DomainSpecs, in-memory Domains or already
    prepared TokenizedDomains (the pipeline passes those); `data_weights` overrides weights by name.
    """

    model: str | Path
    data: Sequence[str | DomainSpec | Domain | TokenizedDomain]
    out: str | Path
    tokenizer: str | Path | None = None  # default: the tokenizer stored with the model
    cache_dir: str | Path | None = None  # tokenized shards; default $BAM_CACHE or ~/.cache/bam/tokens
    data_weights: dict[str, float] = field(default_factory=dict)
    val_fraction: float = 0.05
    test_fraction: float = 0.0
    max_steps: int = 1000
    batch_size: int = 16  # global sequences per optimizer step (all ranks, all micro-batches)
    seq_len: int = 256
    grad_accum: int = 1
    lr: float = 3e-4
    warmup: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    clip: float = 1.0  # 0 disables clipping (the gradient norm is still measured and logged)
    save_every: int = 500  # the last step always saves too
    eval_every: int = 500  # 0 disables validation; else also at step 0 and at the last step
    eval_tokens: int | None = 65536  # per domain; None evaluates the whole validation split
    eval_batch_size: int | None = None  # default: the per-rank micro-batch
    seed: int = 0
    resume: bool = False
    keep: int = 2
    aux_loss_coef: float | None = None  # None keeps the model config's router_aux_loss_coef
    z_loss_coef: float | None = None  # None keeps the model config's router_z_loss_coef
    # `--train-only` groups (bam/train/optim.py); None: the model's default, every parameter, but
    # for a mixture of adapter experts optim.ADAPTER_MIXTURE_TRAINS (the seed's projections frozen)
    train_only: str | None = None
    # An adapter trained alone on the frozen model (bam/modeling/adapters.py): "lora" or "ia3"; the run's
    # model is then a PEFT adapter directory (bam/formats/peft.py). Targets default to every linear
    # projection for LoRA, and to PEFT's Llama default (k_proj, v_proj, down_proj) for (IA)³.
    adapter: str | None = None
    adapter_rank: int = 8  # PEFT's default r and lora_alpha
    adapter_alpha: float = 8.0
    adapter_targets: Sequence[str] | None = None
    dist: str = "ddp"
    max_bad_steps: int = 5
    progress: bool = True

    def __post_init__(self):
        def check(ok: bool, name: str, expected: str) -> None:
            # Named as the field (max_steps=0: expected ...): the config may come from `bam train`'s
            # flags (--max-steps) or from a study's YAML (max_steps:), and the field is both's name.
            need(ok, name, getattr(self, name), expected)

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        for name in ("max_steps", "batch_size", "seq_len", "grad_accum", "keep"):
            check(is_int(getattr(self, name)) and getattr(self, name) > 0, name, "a positive integer")
        for name in ("warmup", "save_every", "eval_every", "seed", "max_bad_steps"):
            check(is_int(getattr(self, name)) and getattr(self, name) >= 0, name, "a non-negative integer")
        check(is_num(self.lr) and self.lr > 0, "lr", "a positive finite number")
        check(is_num(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "a number in [0, 1]")
        check(is_num(self.weight_decay) and self.weight_decay >= 0, "weight_decay", "a non-negative number")
        check(is_num(self.clip) and self.clip >= 0, "clip", "a non-negative number (0 disables clipping)")
        for name in ("aux_loss_coef", "z_loss_coef"):
            value = getattr(self, name)
            check(value is None or (is_num(value) and value >= 0), name, "a non-negative number")
        for name in ("eval_tokens", "eval_batch_size"):
            value = getattr(self, name)
            check(value is None or (is_int(value) and value > 0), name, "a positive integer")
        check(self.dist in DIST_MODES, "dist", f"one of {', '.join(DIST_MODES)}")
        if not self.data:
            raise BamError("data: expected at least one domain (NAME=PATH[:WEIGHT])")
        if self.train_only is not None:
            parse_train_only(self.train_only)  # unknown group names fail here
        if self.adapter is not None:
            check(self.adapter in ADAPTERS, "adapter", f"one of {', '.join(ADAPTERS)}")
            check(self.train_only in (None, "all", "adapter"), "train_only",
                  "'adapter' (or unset) with an adapter: it trains alone on the frozen model")

    def adapter_fields(self) -> dict | None:
        """The model config fields of the adapter this run adds (bam/modeling/config.py), or None."""
        if self.adapter is None:
            return None
        allowed = ADAPTER_TARGETS[self.adapter]  # in the config's order; an unknown name is refused there
        targets = sorted(self.adapter_targets or DEFAULT_ADAPTER_TARGETS[self.adapter],
                         key=lambda t: allowed.index(t) if t in allowed else len(allowed))
        fields = {"adapter": self.adapter, "adapter_targets": targets}
        if self.adapter == "lora":
            fields.update(lora_rank=self.adapter_rank, lora_alpha=self.adapter_alpha)
        return fields
