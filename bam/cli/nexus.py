"""Nexus verbs (METHOD.md 3.3): `bam embed-domains` and `bam add-expert`.

Each handler turns arguments into one call of the library: bam.mix.nexus.embed_domains (domain
embeddings) and bam.mix.extend.extend_mixture (add an expert, then optionally finetune). `bam mix
--method nexus` is registered with the other methods by bam/cli/mix.py.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bam.cli.train import add_data_args
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
    add_data_args(p, "domains to embed")
    p.add_argument("--out", required=True, metavar="FILE", help="output: FILE.json or FILE.safetensors")
    p.add_argument("--sentence-model", metavar="DIR",
                   help="local sentence-transformers / Hugging Face encoder directory (no download)")
    p.add_argument("--max-tokens", type=int, default=65536, help="tokens sampled per domain")
    p.add_argument("--seq-len", type=int, default=256, help="window (hidden-mean) or truncation length")
    p.add_argument("--batch-size", type=int, default=8)
    p.set_defaults(func=cmd_embed_domains)


def cmd_embed_domains(args) -> int:
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
    cosines = embeddings.cosine_range()
    spread = f"; cosine similarity between domains {cosines[0]:.3f} to {cosines[1]:.3f}" if cosines else ""
    print(f"bam embed-domains: wrote {args.out}: {len(embeddings.names)} domains ({', '.join(embeddings.names)}), "
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
    add_data_args(p, "finetuning domains", required=False)
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


def cmd_add_expert(args) -> int:
    from bam.formats.model_dir import open_model  # noqa: PLC0415
    from bam.mix.extend import extend_mixture  # noqa: PLC0415

    result = extend_mixture(
        args.moe, args.new, args.domain, args.out, data=args.data, embedding_file=args.embedding,
        embedding_model=args.embedding_model, tokenizer=args.tokenizer, cache_dir=args.cache_dir,
        val_fraction=args.val_fraction, test_fraction=args.test_fraction, reset_router=args.reset_router,
        merge_weight=args.merge_weight, router_init_std=args.router_init_std, seed=args.seed,
        finetune_steps=args.finetune_steps, finetune_dir=args.finetune_dir, overwrite=args.overwrite,
        lr=args.lr, warmup=args.warmup, batch_size=args.batch_size, seq_len=args.seq_len,
        eval_every=args.eval_every, train_only=args.train_only, progress=not args.no_progress,
    )
    config = open_model(result.model).config
    # Only a Nexus router that was kept got the new domain's embedding.
    embedded = ("" if config.ffn_router != "nexus" else
                f", embedded by {config.nexus_embedding_source.get('method')}")
    finetuned = f", finetuned {args.finetune_steps} steps in {result.finetune_run}" if result.finetune_run else ""
    print(f"bam add-expert: wrote {result.model}: expert {config.n_ffn_experts - 1} ({args.domain}) added, "
          f"{config.n_ffn_experts} routed FFN experts{embedded}{finetuned}")
    return 0
