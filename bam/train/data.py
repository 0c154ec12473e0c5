"""The run's data: its tokenizer, and its domains tokenized into shards with their mixture weights.

Rank 0 tokenizes (into the shard cache, bam.data.shards); the other ranks wait, then find every
domain in the cache.
"""

from __future__ import annotations

from pathlib import Path

from bam.data.shards import TokenizedDomain, default_cache_dir, prepare_domain
from bam.data.sources import check_unique_names, parse_domain_spec
from bam.errors import BamError
from bam.train.config import TrainConfig
from bam.train.distributed import Dist


def tokenizer_for(cfg: TrainConfig):
    """(tokenizer, its directory): `--tokenizer`, else the model's own; (None, None) if it has none."""
    from bam.data.tokenizer import load_tokenizer  # noqa: PLC0415
    from bam.formats.model_dir import tokenizer_dir_of  # noqa: PLC0415

    directory = Path(cfg.tokenizer) if cfg.tokenizer else tokenizer_dir_of(cfg.model)
    has_files = directory is not None and any(
        (directory / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json"))
    if cfg.tokenizer is None and not has_files:
        return None, None
    return load_tokenizer(directory), directory


def prepare_domains(cfg: TrainConfig, tokenizer, env: Dist) -> tuple[list[TokenizedDomain], list[float]]:
    """Tokenized domains and their mixture weights; rank 0 tokenizes, the others then hit the cache."""
    cache = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    items = [parse_domain_spec(d) if isinstance(d, str) else d for d in cfg.data]
    names = [item.name for item in items]
    check_unique_names(names)
    unknown = sorted(set(cfg.data_weights) - set(names))
    if unknown:
        raise BamError(f"data weight for {unknown[0]!r}: no such domain among {', '.join(names)}")

    def prepare() -> list[TokenizedDomain]:
        if tokenizer is None and not all(isinstance(i, TokenizedDomain) for i in items):
            raise BamError(f"{cfg.model}: no tokenizer files; pass --tokenizer DIR")
        return [i if isinstance(i, TokenizedDomain)
                else prepare_domain(i, tokenizer, cache, cfg.val_fraction, cfg.test_fraction)
                for i in items]

    domains = prepare() if env.is_main else None
    env.barrier()
    if domains is None:
        domains = prepare()
    weights = [float(cfg.data_weights.get(i.name, getattr(i, "weight", 1.0))) for i in items]
    return domains, weights
