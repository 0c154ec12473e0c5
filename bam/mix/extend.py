"""Extending a trained mixture by one domain (METHOD.md 3.3, `bam add-expert`): embed the new domain
the way the mixture's domains were embedded, append its dense expert (bam/mix/add_expert.py), and
optionally finetune briefly on 50% new domain, 50% old domains. mix.json records each step.

Domains are anything bam.train.config.TrainConfig's `data` accepts (`NAME=PATH` strings, DomainSpecs,
Domains, TokenizedDomains).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from bam.data.sources import check_unique_names, parse_domain_spec
from bam.errors import BamError
from bam.formats.model_dir import open_model
from bam.io.atomic import atomic_output_dir
from bam.mix.add_expert import add_expert
from bam.mix.nexus import DomainEmbeddings, EmbeddingSource, domain_name, embed_domains
from bam.mix.provenance import read_provenance, write_provenance
from bam.modeling.config import BamConfig


@dataclass(frozen=True)
class ExtendedMixture:
    model: Path  # the output model directory
    finetune_run: Path | None  # the finetune's run directory (the model before finetuning, the train run)


def extend_mixture(moe: str | Path, new: str | Path, domain: str, out: str | Path, *,
                   data: Sequence[str] = (), embedding_file: str | Path | None = None,
                   embedding_model: str | Path | None = None, tokenizer: str | None = None,
                   cache_dir: str | Path | None = None, val_fraction: float = 0.05, test_fraction: float = 0.0,
                   reset_router: bool = False, merge_weight: float | None = None,
                   router_init_std: float | None = None, seed: int = 0, finetune_steps: int = 0,
                   finetune_dir: str | Path | None = None, overwrite: bool = False,
                   **finetune_options) -> ExtendedMixture:
    """Append the dense model `new` to the mixture `moe` as the expert of `domain`, written to `out`.

    A Nexus router gets `domain`'s embedding: read from `embedding_file` (a bam embed-domains
    file), or computed from `data` exactly like the mixture's (`new_domain_embedding`). With
    `finetune_steps`, the model is then trained on 50% `domain`, 50% the other domains of `data`,
    in `finetune_dir` (default OUT.finetune), and `out` is the finetuned model.
    `finetune_options` are further TrainConfig fields (lr, warmup, batch_size, ...); warmup
    defaults to 10% of the steps. Everything that can be refused is refused before any work.
    """
    moe_source = open_model(moe)
    names = [parse_domain_spec(spec).name for spec in data]
    check_unique_names(names)
    specs = dict(zip(names, data))
    out = Path(out)
    if out.exists() and not overwrite:
        raise BamError(f"{out}: output already exists (choose another path or pass --overwrite)")
    if finetune_steps < 0:
        raise BamError(f"--finetune-steps {finetune_steps}: expected a non-negative integer")
    old_domains = [name for name in specs if name != domain]
    if finetune_steps:
        if domain not in specs:
            raise BamError(f"--finetune-steps: --data has no domain named {domain!r} to finetune on")
        finetune_weights(domain, old_domains)  # refuses a finetune without old domains, before any work
    nexus = moe_source.config.ffn_router == "nexus" and not reset_router
    embedding = new_domain_embedding(
        moe, moe_source.config, domain, specs, embedding_file=embedding_file, embedding_model=embedding_model,
        tokenizer=tokenizer, cache_dir=cache_dir, val_fraction=val_fraction, test_fraction=test_fraction,
    ) if nexus else None
    options = dict(reset_router=reset_router, merge_weight=merge_weight, router_init_std=router_init_std, seed=seed)

    if not finetune_steps:
        add_expert(moe_source, new, domain, embedding, out, overwrite=overwrite, **options)
        return ExtendedMixture(out, None)
    run_dir = Path(finetune_dir) if finetune_dir else out.with_name(out.name + ".finetune")
    if run_dir.exists():
        if not overwrite:
            raise BamError(f"{run_dir}: finetune directory already exists (pass --overwrite or --finetune-dir)")
        shutil.rmtree(run_dir)
    added = add_expert(moe_source, new, domain, embedding, run_dir / "added", **options)
    warmup = finetune_options.pop("warmup", None)
    trained = finetune_after_adding(
        added, specs[domain], [specs[name] for name in old_domains], run_dir / "train", finetune_steps,
        tokenizer=tokenizer, cache_dir=cache_dir, val_fraction=val_fraction, test_fraction=test_fraction,
        warmup=warmup if warmup is not None else max(1, finetune_steps // 10), seed=seed, **finetune_options,
    )
    # The finetuned model, with the provenance of the addition and of the finetune.
    provenance = read_provenance(added)
    provenance["added_experts"][-1]["finetune"] = {
        "steps": finetune_steps, "run": str(run_dir.resolve() / "train"),
        "weights": finetune_weights(domain, old_domains),
    }
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        for path in Path(trained).iterdir():
            _link_or_copy(path, tmp / path.name)
        write_provenance(tmp, provenance)
    return ExtendedMixture(out, run_dir)


def new_domain_embedding(moe: str | Path, config: BamConfig, domain: str, specs: dict[str, str], *,
                         embedding_file: str | Path | None = None, embedding_model: str | Path | None = None,
                         tokenizer: str | None = None, cache_dir: str | Path | None = None,
                         val_fraction: float = 0.05, test_fraction: float = 0.0) -> torch.Tensor:
    """The new domain's embedding, computed exactly like the mixture's (its nexus_embedding_source)."""
    recorded = config.nexus_embedding_source or {}
    if embedding_file:
        embeddings = DomainEmbeddings.load(embedding_file)
        method = embeddings.source.get("method")
        if recorded and method != recorded.get("method"):
            raise BamError(f"--embedding {embedding_file}: made by {method!r}, the mixture's domains by "
                           f"{recorded.get('method')!r}; embed the new domain the same way")
        return embeddings.select([domain]).vectors[domain]
    if not recorded:
        raise BamError(f"{moe}: its config does not record how its domain embeddings were made "
                       "(nexus_embedding_source); pass --embedding FILE")
    source = EmbeddingSource.from_dict(recorded, f"{moe}/config.json nexus_embedding_source")
    if embedding_model:
        source = replace(source, model=str(Path(embedding_model).resolve()))
    if not Path(source.model).is_dir():
        raise BamError(f"encoder {source.model} (recorded in {moe}/config.json) not found; "
                       "pass --embedding-model DIR or --embedding FILE")
    if domain not in specs:
        raise BamError(f"--data has no domain named {domain!r} to embed (or pass --embedding FILE)")
    if (val_fraction, test_fraction) != (source.val_fraction, source.test_fraction):
        raise BamError(f"--val-fraction/--test-fraction {val_fraction}/{test_fraction} differ from "
                       f"the ones the mixture's embeddings used ({source.val_fraction}/{source.test_fraction})")
    embeddings = embed_domains([specs[domain]], source, tokenizer=tokenizer, cache_dir=cache_dir)
    return embeddings.vectors[domain]


# ---------------------------------------------------------------------------------------------
# After adding an expert: a short finetune on half new domain, half old domains


def finetune_weights(new_domain: str, old_domains: Sequence[str]) -> dict[str, float]:
    """Mixture weights: 50% the new domain, 50% shared equally by the old ones (METHOD.md 3.3)."""
    if not old_domains:
        raise BamError("finetuning after adding an expert needs at least one old domain besides "
                       f"{new_domain!r} (METHOD.md 3.3: 50% new, 50% old)")
    if new_domain in old_domains:
        raise BamError(f"domain {new_domain!r} is both the new domain and an old one")
    return {new_domain: 0.5, **{name: 0.5 / len(old_domains) for name in old_domains}}


def finetune_after_adding(model_dir: str | Path, new_domain, old_domains: Sequence, out: str | Path,
                          steps: int, **train_options) -> Path:
    """Train `model_dir` for `steps` on 50% `new_domain`, 50% `old_domains`; returns OUT/model.

    `train_options` are further bam.train.config.TrainConfig fields (lr, batch_size, ...).
    """
    from bam.train.config import TrainConfig  # noqa: PLC0415
    from bam.train.loop import train  # noqa: PLC0415  (train imports torch.distributed)

    weights = finetune_weights(domain_name(new_domain), [domain_name(d) for d in old_domains])
    cfg = TrainConfig(model=model_dir, data=[new_domain, *old_domains], out=out, data_weights=weights,
                      max_steps=steps, **train_options)
    return train(cfg)


def _link_or_copy(src: Path, dst: Path) -> None:
    # Weights are hard-linked: free, and safe because a weight file is never rewritten in place.
    # Small files are copied: some (the manifest) are rewritten when the output is published.
    if src.suffix == ".safetensors":
        try:
            os.link(src, dst)
            return
        except OSError:
            pass
    shutil.copy2(src, dst)
