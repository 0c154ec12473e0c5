"""Batches: a deterministic, resumable training mixture, and evaluation windows over held-out splits.

`MixtureSampler.batch(step)` is a pure function of (seed, step): resuming at step k gives exactly the
batch the interrupted run got, and data-parallel ranks take interleaved rows of the same global batch.
`iter_eval_batches` cuts a held-out split into non-overlapping windows in which every token is
predicted exactly once, for perplexity and bits per byte.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from bam.data.shards import TokenizedDomain, empty_split_reason
from bam.errors import BamError


# ----------------------------------------------------------------------------------------------------
# Training batches: a deterministic, resumable mixture


class MixtureSampler:
    """Training batches drawn from a weighted mixture of domains, as a pure function of (seed, step).

    `batch(step)` returns one LongTensor `tokens` of shape [rows, seq_len + 1]; the model input is
    `tokens[:, :-1]` and the target `tokens[:, 1:]`. Each row picks a domain with probability
    proportional to its weight, then a uniformly random window of that domain's train split (windows
    may cross document boundaries, which are marked by EOS).

    `batch_size` is the global batch. With data parallelism each rank asks for
    `batch(step, rank, world_size)` and gets rows rank::world_size of the same global batch, so K
    processes together see exactly what one process would.
    """

    def __init__(
        self,
        domains: Sequence[TokenizedDomain],
        weights: Sequence[float],
        seq_len: int,
        batch_size: int,
        seed: int,
    ):
        if not domains:
            raise BamError("mixture: expected at least one domain")
        if len(weights) != len(domains):
            raise BamError(f"mixture weights: expected {len(domains)} (one per domain), got {len(weights)}")
        probs = np.asarray(weights, dtype=np.float64)
        if not np.all(np.isfinite(probs)) or np.any(probs < 0) or probs.sum() <= 0:
            raise BamError(f"mixture weights: expected non-negative numbers with a positive sum, got {list(weights)}")
        _check_positive_int(seq_len, "seq_len")
        _check_positive_int(batch_size, "batch_size")
        _check_seed(seed, "seed")
        for domain, p in zip(domains, probs):
            n = domain.splits["train"].tokens
            if p > 0 and n < seq_len + 1:
                raise BamError(
                    f"domain '{domain.name}': train split has {n} tokens, fewer than seq_len + 1 = {seq_len + 1}"
                )

        self.domains = list(domains)
        self.probs = probs / probs.sum()
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        # Number of valid window starts per domain; 1 for an unused (zero-weight) tiny domain so that
        # the vectorized draw below stays well defined.
        self._n_starts = np.array(
            [max(d.splits["train"].tokens - seq_len, 1) for d in self.domains], dtype=np.int64
        )

    def batch(self, step: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        """Rows rank::world_size of the global batch of `step`: LongTensor [batch_size/world_size, seq_len+1]."""
        domain_ids, starts = self._draw(step)
        rows = self._rows(rank, world_size)
        out = np.empty((len(rows), self.seq_len + 1), dtype=np.int64)
        for j, i in enumerate(rows):
            tokens = self.domains[domain_ids[i]].tokens("train")
            out[j] = tokens[starts[i] : starts[i] + self.seq_len + 1]
        return torch.from_numpy(out)

    def row_domains(self, step: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
        """Index (into `domains`) of the domain each row of `batch(step, rank, world_size)` came from."""
        domain_ids, _ = self._draw(step)
        return domain_ids[self._rows(rank, world_size)]

    def _draw(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        # A fresh generator seeded by (seed, step): no state carries over from earlier steps, which is
        # what makes any step reproducible on its own.
        _check_seed(step, "step")
        rng = np.random.default_rng([self.seed, step])
        domain_ids = rng.choice(len(self.domains), size=self.batch_size, p=self.probs)
        starts = rng.integers(0, self._n_starts[domain_ids])
        return domain_ids, starts

    def _rows(self, rank: int, world_size: int) -> range:
        _check_positive_int(world_size, "world_size")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise BamError(f"rank: expected an integer in [0, {world_size}), got {rank!r}")
        if self.batch_size % world_size:
            raise BamError(f"batch_size: {self.batch_size} is not divisible by world_size {world_size}")
        return range(rank, self.batch_size, world_size)


def _check_positive_int(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BamError(f"{name}: expected a positive integer, got {value!r}")


def _check_seed(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise BamError(f"{name}: expected a non-negative integer, got {value!r}")


# ----------------------------------------------------------------------------------------------------
# Evaluation batches: every held-out token predicted exactly once


@dataclass
class EvalBatches:
    """Non-overlapping windows over one split, for perplexity and bits per byte.

    Iterating yields `(tokens, mask)`: tokens LongTensor [rows, seq_len + 1] (input `tokens[:, :-1]`,
    target `tokens[:, 1:]`) and mask BoolTensor [rows, seq_len] marking real targets. Window k predicts
    split tokens k*seq_len .. (k+1)*seq_len - 1; the first window's context starts with EOS, so the
    split's first token is predicted like every other document start. The last window is padded with
    EOS and masked. Sum the masked token losses (nats) and pass the total to `perplexity` and
    `bits_per_byte`.
    """

    domain: str
    split: str
    seq_len: int
    batch_size: int
    n_targets: int  # target tokens evaluated (the split, or its first max_tokens tokens)
    split_tokens: int
    split_bytes: int
    eos_id: int
    _tokens: np.ndarray = field(repr=False)

    @property
    def n_windows(self) -> int:
        return -(-self.n_targets // self.seq_len)

    @property
    def n_bytes(self) -> float:
        """Text bytes behind the evaluated targets: exact for a whole split, proportional for a prefix."""
        return self.split_bytes * self.n_targets / self.split_tokens

    def __len__(self) -> int:
        return -(-self.n_windows // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for first in range(0, self.n_windows, self.batch_size):
            windows = range(first, min(first + self.batch_size, self.n_windows))
            tokens = np.full((len(windows), self.seq_len + 1), self.eos_id, dtype=np.int64)
            mask = np.zeros((len(windows), self.seq_len), dtype=bool)
            for row, k in enumerate(windows):
                n = self._fill(tokens[row], k)
                mask[row, :n] = True
            yield torch.from_numpy(tokens), torch.from_numpy(mask)

    def _fill(self, row: np.ndarray, k: int) -> int:
        """Write window k into `row`; return its number of targets."""
        lo, hi = k * self.seq_len, min((k + 1) * self.seq_len, self.n_targets)  # targets lo..hi-1
        if k == 0:
            row[1 : hi + 1] = self._tokens[:hi]  # row[0] stays EOS: the context of the first token
        else:
            row[: hi - lo + 1] = self._tokens[lo - 1 : hi]
        return hi - lo

    def perplexity(self, total_nll: float) -> float:
        return math.exp(total_nll / self.n_targets)

    def bits_per_byte(self, total_nll: float) -> float:
        # EOS targets are in the loss but not in the bytes: the standard per-document accounting.
        return total_nll / (math.log(2) * self.n_bytes)


def iter_eval_batches(
    domain: TokenizedDomain,
    split: str,
    seq_len: int,
    batch_size: int,
    max_tokens: int | None = None,
) -> EvalBatches:
    """Deterministic evaluation windows over `split` ("validation" or "test"); see EvalBatches."""
    _check_positive_int(seq_len, "seq_len")
    _check_positive_int(batch_size, "batch_size")
    if max_tokens is not None:
        _check_positive_int(max_tokens, "max_tokens")
    tokens = domain.tokens(split)
    stats = domain.splits[split]
    if stats.tokens == 0:
        raise BamError(
            f"domain '{domain.name}': {split} split is empty: {empty_split_reason(domain, split)}; "
            "raise its fraction or add text"
        )
    n_targets = stats.tokens if max_tokens is None else min(max_tokens, stats.tokens)
    return EvalBatches(
        domain=domain.name,
        split=split,
        seq_len=seq_len,
        batch_size=batch_size,
        n_targets=n_targets,
        split_tokens=stats.tokens,
        split_bytes=stats.bytes,
        eos_id=domain.eos_id,
        _tokens=tokens,
    )
