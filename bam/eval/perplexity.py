"""Per-domain perplexity and bits per byte on held-out text.

Each domain's split is cut into non-overlapping windows in which every token is predicted exactly
once (bam.data.batches.iter_eval_batches); we sum the per-token negative log-likelihood in nats, then

    perplexity    = exp(total nats / predicted tokens)
    bits per byte = total nats / ln 2 / UTF-8 bytes of the text behind those tokens

Bits per byte compares models with different tokenizers; perplexity is what the paper's tables
report (METHOD.md section 6). `evaluate_domains` is what `bam eval`, the training loop's periodic
validation and the demo pipeline all call.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from bam.data.batches import iter_eval_batches
from bam.data.shards import TokenizedDomain, default_cache_dir, prepare_domain
from bam.data.sources import check_unique_names, parse_domain_spec
from bam.data.tokenizer import load_tokenizer
from bam.errors import BamError
from bam.formats.model_dir import load_model, tokenizer_dir_of

# "all" scores every document of the given data (train + validation + test): for files the user
# held out themselves.
EVAL_SPLITS = ("validation", "test", "all")


@dataclass
class DomainScore:
    """Summed negative log-likelihood of one domain, and what it is measured over."""

    nll: float  # nats, summed over predicted tokens
    tokens: int  # predicted tokens
    bytes: float  # UTF-8 bytes of the text behind those tokens

    @property
    def loss(self) -> float:
        return self.nll / self.tokens

    @property
    def ppl(self) -> float:
        return math.exp(min(self.loss, 700.0))  # exp overflows past ~709; such a model is broken anyway

    @property
    def bpb(self) -> float:
        return self.nll / (math.log(2) * self.bytes)

    def as_dict(self) -> dict:
        return {"loss": self.loss, "ppl": self.ppl, "bpb": self.bpb, "tokens": self.tokens,
                "bytes": self.bytes, "nll": self.nll}


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA; plain fp32 elsewhere (CPU bf16 is slow and changes results)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def window_nll(model, tokens: torch.Tensor, mask: torch.Tensor) -> float:
    """Summed NLL (nats) of the masked targets `tokens[:, 1:]` given inputs `tokens[:, :-1]`."""
    device = next(model.parameters()).device
    tokens, mask = tokens.to(device), mask.to(device)
    with autocast_for(device):
        logits = model(input_ids=tokens[:, :-1], use_cache=False).logits
    nll = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
    return float(nll.double()[mask.flatten()].sum())


def evaluate_domain(model, domain: TokenizedDomain, split: str = "validation", seq_len: int = 512,
                    batch_size: int = 8, max_tokens: int | None = None) -> DomainScore:
    """Score one tokenized domain; `max_tokens` caps the predicted tokens (a prefix of the split)."""
    if split not in EVAL_SPLITS:
        raise BamError(f"split {split!r}: expected one of {', '.join(EVAL_SPLITS)}")
    context = model.config.max_position_embeddings
    if seq_len > context:
        raise BamError(f"seq_len={seq_len} is beyond the model's context "
                       f"(max_position_embeddings={context})")
    parts = ("train", "validation", "test") if split == "all" else (split,)
    total = DomainScore(0.0, 0, 0.0)
    for part in parts:
        if split == "all" and domain.splits[part].tokens == 0:
            continue
        budget = None if max_tokens is None else max_tokens - total.tokens
        if budget is not None and budget <= 0:
            break
        batches = iter_eval_batches(domain, part, seq_len, batch_size, budget)
        nll = sum(window_nll(model, tokens, mask) for tokens, mask in batches)
        total = DomainScore(total.nll + nll, total.tokens + batches.n_targets, total.bytes + batches.n_bytes)
    return total


def evaluate_domains(model, domains: Sequence[TokenizedDomain], split: str = "validation",
                     seq_len: int = 512, batch_size: int = 8,
                     max_tokens: int | None = None) -> dict[str, DomainScore]:
    """{domain name: DomainScore} for every domain; the model is left in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        return {d.name: evaluate_domain(model, d, split, seq_len, batch_size, max_tokens) for d in domains}
    finally:
        model.train(was_training)


def evaluate_model(model_dir: str | Path, data: Sequence[str], *, tokenizer: str | Path | None = None,
                   cache_dir: str | Path | None = None, val_fraction: float = 0.05, test_fraction: float = 0.0,
                   split: str = "validation", seq_len: int | None = None, batch_size: int = 8,
                   max_tokens: int | None = None) -> tuple[dict[str, DomainScore], int]:
    """`bam eval`: the model directory's scores on each NAME=PATH domain of `data`, and the window
    length used (default: min(context, 1024)). The tokenizer defaults to the model's own."""
    model = load_model(model_dir)
    context = model.config.max_position_embeddings
    if seq_len is not None and seq_len > context:  # refused before any tokenizing
        raise BamError(f"seq_len={seq_len} is beyond the model's context (max_position_embeddings={context})")
    tokenizer_dir = tokenizer or tokenizer_dir_of(model_dir) or model_dir
    loaded = load_tokenizer(tokenizer_dir)
    if len(loaded) > model.config.vocab_size:
        # Token ids >= vocab_size would index past the embedding table.
        raise BamError(f"tokenizer {tokenizer_dir} has {len(loaded)} tokens, more than the "
                       f"model's vocab_size={model.config.vocab_size}")
    specs = [parse_domain_spec(spec) for spec in data]
    check_unique_names(spec.name for spec in specs)  # before any domain is tokenized
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    domains = [prepare_domain(spec, loaded, cache, val_fraction, test_fraction) for spec in specs]
    seq_len = seq_len or min(context, 1024)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    return evaluate_domains(model, domains, split, seq_len, batch_size, max_tokens), seq_len


def summary(scores: dict[str, DomainScore]) -> dict:
    """The `bam eval --json` body: per-domain numbers and the paper's average (mean of perplexities)."""
    return {
        "domains": {name: {k: v for k, v in score.as_dict().items() if k in ("ppl", "bpb", "tokens", "loss")}
                    for name, score in scores.items()},
        "avg_ppl": sum(s.ppl for s in scores.values()) / len(scores),
        "avg_bpb": sum(s.bpb for s in scores.values()) / len(scores),
    }


def format_table(scores: dict[str, DomainScore]) -> str:
    rows = [("domain", "ppl", "bpb", "tokens")]
    rows += [(name, f"{s.ppl:.3f}", f"{s.bpb:.4f}", str(s.tokens)) for name, s in scores.items()]
    if len(scores) > 1:
        avg = summary(scores)
        rows.append(("average", f"{avg['avg_ppl']:.3f}", f"{avg['avg_bpb']:.4f}", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join(
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths)))
        for r in rows
    )

