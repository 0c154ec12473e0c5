"""Nexus verbs (METHOD.md 3.3): `bam embed-domains`, `bam add-expert`, and `bam mix --method nexus`.

Each handler turns arguments into calls of the library: bam.mix.nexus (domain embeddings, the
finetune after adding) and bam.mix.mixing (mix, add_expert), which the pipeline calls directly.

`bam mix` itself is registered by bam/cli/mix.py, which hands the Nexus methods to
`cmd_mix_nexus` here.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

from bam.cli.train import _add_data_args
from bam.errors import BamError


def register(subparsers) -> None:
    _register_embed_domains(subparsers)
    _register_add_expert(subparsers)


# ---------------------------------------------------------------------------------------------
# bam embed-domains


def _register_embed_domains(subparsers) -> None:
    p = subparsers.add_parser(
        "embed-domains", help="one fixed embedding per domain, for the Nexus router",
        description="Embed each domain's training data: by default the mean final hidden state of MODEL "
                    "(normally the seed) over a sample of the domain; or, with --sentence-model, the mean "
                    "of a local sentence encoder's mean-pooled document embeddings. Vectors are rescaled "
                    "to RMS 1. The file records how they were made, and `bam add-expert` reuses it.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", nargs="?", metavar="MODEL",
                   help="model whose hidden states are averaged (omit with --sentence-model)")
    _add_data_args(p, "domains to embed")
    p.add_argument("--out", required=True, metavar="FILE", help="output: FILE.json or FILE.safetensors")
    p.add_argument("--sentence-model", metavar="DIR",
                   help="local sentence-transformers / Hugging Face encoder directory (no download)")
    p.add_argument("--max-tokens", type=int, default=65536, help="tokens sampled per domain")
    p.add_argument("--seq-len", type=int, default=256, help="window (hidden-mean) or truncation length")
    p.add_argument("--batch-size", type=int, default=8)
    p.set_defaults(func=cmd_embed_domains)


def cmd_embed_domains(args) -> int:
    import torch  # noqa: PLC0415

    from bam.mix.nexus import EmbeddingSource, embed_domains  # noqa: PLC0415

    if (args.model is None) == (args.sentence_model is None):
        raise BamError("give either MODEL (mean of its hidden states) or --sentence-model DIR, not both or neither")
    if Path(args.out).suffix not in (".json", ".safetensors"):
        raise BamError(f"--out {args.out}: expected a .json or .safetensors file name")
    encoder = Path(args.sentence_model or args.model)
    if not encoder.is_dir():
        raise BamError(f"{encoder}: no such model directory")
    source = EmbeddingSource(
        method="sentence-model" if args.sentence_model else "hidden-mean", model=str(encoder.resolve()),
        max_tokens=args.max_tokens, seq_len=args.seq_len, val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
    )
    embeddings = embed_domains(args.data, source, tokenizer=args.tokenizer, cache_dir=args.cache_dir,
                               batch_size=args.batch_size)
    embeddings.save(args.out)
    # How far apart the domains are: nearly parallel vectors give the router little to start from.
    unit = torch.nn.functional.normalize(torch.stack(list(embeddings.vectors.values())), dim=-1)
    cosine = unit @ unit.T
    off_diagonal = cosine[~torch.eye(len(unit), dtype=torch.bool)]
    spread = (f"; cosine similarity between domains {off_diagonal.min():.3f} to {off_diagonal.max():.3f}"
              if len(unit) > 1 else "")
    print(f"bam embed-domains: wrote {args.out}: {len(unit)} domains ({', '.join(embeddings.names)}), "
          f"{embeddings.dim}-dim, {source.method} of {encoder}{spread}")
    return 0


# ---------------------------------------------------------------------------------------------
# bam add-expert


def _register_add_expert(subparsers) -> None:
    p = subparsers.add_parser(
        "add-expert", help="append a new dense expert to a trained MoE (Nexus, METHOD.md 3.3)",
        description="Append NEW_DENSE (branched from the same seed) as one more routed expert of MOE: its FFN "
                    "(and attention, if MOE has attention experts) is appended, every other tensor is merged "
                    "as (1-λ)·moe + λ·new with λ = 1/(n+1). A Nexus router gets the new domain's embedding "
                    "(computed like the others) and keeps its projection; a linear router gets a new small "
                    "random row; --reset-router replaces either by a new random linear router. Optionally "
                    "finetune on 50%% new domain, 50%% old domains.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("moe", metavar="MOE", help="the mixture (a bam mix / bam train output)")
    p.add_argument("new", metavar="NEW_DENSE", help="the new domain's dense expert")
    p.add_argument("--domain", required=True, metavar="NAME", help="the new expert's domain (its --data name)")
    _add_data_args(p, "finetuning domains", required=False)
    p.add_argument("--out", required=True, type=Path, metavar="OUT", help="output model directory")
    p.add_argument("--embedding", metavar="FILE", help="take the new domain's embedding from this "
                                                       "bam embed-domains file instead of computing it")
    p.add_argument("--embedding-model", metavar="DIR",
                   help="encoder to embed with, if the one recorded in MOE's config has moved")
    p.add_argument("--reset-router", action="store_true",
                   help="replace the FFN router (linear or Nexus) by a new random linear one over all experts "
                        "(the baseline Nexus is compared with)")
    p.add_argument("--merge-weight", type=float, default=None, help="λ (default 1/(n+1), n = experts in MOE)")
    p.add_argument("--router-init-std", type=float, default=None,
                   help="std of new router rows (default: MOE's router_init_std)")
    p.add_argument("--seed", type=int, default=0, help="seed of new router rows and of the finetune's data order")
    f = p.add_argument_group("finetune after adding (bam train on 50%% --domain, 50%% the other --data domains)")
    f.add_argument("--finetune-steps", type=int, default=0, help="optimizer steps (0: no finetune)")
    f.add_argument("--finetune-dir", type=Path, default=None,
                   help="run directory (default OUT.finetune): the model before finetuning and the train run")
    f.add_argument("--lr", type=float, default=1e-4, help="peak learning rate")
    f.add_argument("--warmup", type=int, default=None, help="warmup steps (default: 10%% of the steps)")
    f.add_argument("--batch-size", type=int, default=16, help="global sequences per step")
    f.add_argument("--seq-len", type=int, default=256)
    f.add_argument("--eval-every", type=int, default=0, help="validation interval (0: never)")
    f.add_argument("--train-only", default="all", metavar="GROUPS", help="as bam train --train-only")
    f.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--overwrite", action="store_true", help="replace OUT (and the finetune directory)")
    p.set_defaults(func=cmd_add_expert)


def new_domain_embedding(args, config, specs: dict[str, str]):
    """The new domain's embedding, computed exactly like the mixture's (its nexus_embedding_source)."""
    from bam.mix.nexus import DomainEmbeddings, EmbeddingSource, embed_domains  # noqa: PLC0415

    recorded = config.nexus_embedding_source or {}
    if args.embedding:
        embeddings = DomainEmbeddings.load(args.embedding)
        method = embeddings.source.get("method")
        if recorded and method != recorded.get("method"):
            raise BamError(f"--embedding {args.embedding}: made by {method!r}, the mixture's domains by "
                           f"{recorded.get('method')!r}; embed the new domain the same way")
        return embeddings.select([args.domain]).vectors[args.domain]
    if not recorded:
        raise BamError(f"{args.moe}: its config does not record how its domain embeddings were made "
                       "(nexus_embedding_source); pass --embedding FILE")
    source = EmbeddingSource.from_dict(recorded, f"{args.moe}/config.json nexus_embedding_source")
    if args.embedding_model:
        source = replace(source, model=str(Path(args.embedding_model).resolve()))
    if not Path(source.model).is_dir():
        raise BamError(f"encoder {source.model} (recorded in {args.moe}/config.json) not found; "
                       "pass --embedding-model DIR or --embedding FILE")
    if args.domain not in specs:
        raise BamError(f"--data has no domain named {args.domain!r} to embed (or pass --embedding FILE)")
    if (args.val_fraction, args.test_fraction) != (source.val_fraction, source.test_fraction):
        raise BamError(f"--val-fraction/--test-fraction {args.val_fraction}/{args.test_fraction} differ from "
                       f"the ones the mixture's embeddings used ({source.val_fraction}/{source.test_fraction})")
    embeddings = embed_domains([specs[args.domain]], source, tokenizer=args.tokenizer, cache_dir=args.cache_dir)
    return embeddings.vectors[args.domain]


def cmd_add_expert(args) -> int:
    from bam.formats.model_dir import open_model  # noqa: PLC0415
    from bam.io.atomic import atomic_output_dir  # noqa: PLC0415
    from bam.data.shards import parse_domain_spec  # noqa: PLC0415
    from bam.mix.mixing import PROVENANCE_NAME, add_expert  # noqa: PLC0415
    from bam.mix.nexus import finetune_after_adding, finetune_weights  # noqa: PLC0415

    moe = open_model(args.moe)
    specs = {}
    for spec in args.data:
        name = parse_domain_spec(spec).name
        if name in specs:
            raise BamError(f"--data: domain {name!r} is given twice")
        specs[name] = spec
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise BamError(f"{out}: output already exists (choose another path or pass --overwrite)")
    if args.finetune_steps < 0:
        raise BamError(f"--finetune-steps {args.finetune_steps}: expected a non-negative integer")
    old_domains = [name for name in specs if name != args.domain]
    if args.finetune_steps:
        if args.domain not in specs:
            raise BamError(f"--finetune-steps: --data has no domain named {args.domain!r} to finetune on")
        finetune_weights(args.domain, old_domains)  # refuses a finetune without old domains, before any work
    nexus = moe.config.ffn_router == "nexus" and not args.reset_router
    embedding = new_domain_embedding(args, moe.config, specs) if nexus else None
    options = dict(reset_router=args.reset_router, merge_weight=args.merge_weight,
                   router_init_std=args.router_init_std, seed=args.seed)

    if not args.finetune_steps:
        add_expert(moe, args.new, args.domain, embedding, out, overwrite=args.overwrite, **options)
        final = out
    else:
        run_dir = args.finetune_dir or out.with_name(out.name + ".finetune")
        if run_dir.exists():
            if not args.overwrite:
                raise BamError(f"{run_dir}: finetune directory already exists (pass --overwrite or --finetune-dir)")
            shutil.rmtree(run_dir)
        added = add_expert(moe, args.new, args.domain, embedding, run_dir / "added", **options)
        trained = finetune_after_adding(
            added, specs[args.domain], [specs[name] for name in old_domains], run_dir / "train",
            args.finetune_steps, tokenizer=args.tokenizer, cache_dir=args.cache_dir,
            val_fraction=args.val_fraction, test_fraction=args.test_fraction, lr=args.lr,
            warmup=args.warmup if args.warmup is not None else max(1, args.finetune_steps // 10),
            batch_size=args.batch_size, seq_len=args.seq_len, eval_every=args.eval_every,
            train_only=args.train_only, seed=args.seed, progress=not args.no_progress,
        )
        # The finetuned model, with the provenance of the addition and of the finetune.
        provenance = json.loads((added / PROVENANCE_NAME).read_text(encoding="utf-8"))
        provenance["added_experts"][-1]["finetune"] = {
            "steps": args.finetune_steps, "run": str(run_dir.resolve() / "train"),
            "weights": finetune_weights(args.domain, old_domains),
        }
        with atomic_output_dir(out, overwrite=args.overwrite) as tmp:
            for path in Path(trained).iterdir():
                _link_or_copy(path, tmp / path.name)
            (tmp / PROVENANCE_NAME).write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
        final = out
    config = open_model(final).config
    embedded = "" if embedding is None else f", embedded by {config.nexus_embedding_source.get('method')}"
    finetuned = f", finetuned {args.finetune_steps} steps in {run_dir}" if args.finetune_steps else ""
    print(f"bam add-expert: wrote {final}: expert {config.n_ffn_experts - 1} ({args.domain}) added, "
          f"{config.n_ffn_experts} routed FFN experts{embedded}{finetuned}")
    return 0


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


# ---------------------------------------------------------------------------------------------
# bam mix --method nexus | nexus-bam | nexus-bam-shared


def cmd_mix_nexus(args) -> int:
    from bam.modeling import cost  # noqa: PLC0415
    from bam.formats.model_dir import open_model  # noqa: PLC0415
    from bam.cli.mix import _count  # noqa: PLC0415
    from bam.mix.mixing import PROVENANCE_NAME, mix  # noqa: PLC0415
    from bam.mix.nexus import DomainEmbeddings  # noqa: PLC0415

    if args.domain_embeddings is None:
        raise BamError(f"{args.method} needs --domain-embeddings FILE (make one with `bam embed-domains`)")
    embeddings = DomainEmbeddings.load(args.domain_embeddings)
    if args.domains:
        embeddings = embeddings.select([name.strip() for name in args.domains.split(",")])
    sources = [open_model(d) for d in args.dirs]
    out = mix(sources, args.method, args.out, top_k=args.top_k, renormalize=args.renormalize,
              num_experts=args.num_experts, router_init_std=args.router_init_std, seed=args.seed,
              weights=args.weights, overwrite=args.overwrite, domain_embeddings=embeddings,
              nexus_hidden_dim=args.nexus_hidden_dim)
    config = open_model(out).config
    attention = ("one averaged attention" if config.n_attn_experts == 1 else
                 f"{config.n_attn_experts} attention experts ({'shared' if config.kv_shared else 'own'} K/V)")
    print(f"wrote {out} ({args.method}): shared expert from {args.dirs[0]}, {config.n_ffn_experts} routed FFN "
          f"experts ({', '.join(config.ffn_expert_domains)}) top-{config.ffn_top_k}, {attention}; params "
          f"{_count(cost.params_total(config))} total, {_count(cost.params_active(config))} active; "
          f"provenance in {out / PROVENANCE_NAME}")
    return 0
