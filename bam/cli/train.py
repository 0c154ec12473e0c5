"""Verbs that make and train dense models: `init`, `branch`, `train`, `eval`, `tokenizer train`.

Each handler turns parsed arguments into a call of the library function that does the work
(bam.modeling.presets, bam.mix.branch, bam.train, bam.eval.perplexity, bam.data.tokenizer), so the
pipeline can call the same code.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from bam.errors import BamError, first_duplicate
from bam.mix.branch import BRANCH_MANIFEST, branch

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def register(subparsers) -> None:
    _register_init(subparsers)
    _register_branch(subparsers)
    _register_train(subparsers)
    _register_eval(subparsers)
    _register_tokenizer(subparsers)


# ---------------------------------------------------------------------------------------------
# bam init


def _register_init(subparsers) -> None:
    from bam.modeling.presets import preset_names  # noqa: PLC0415

    p = subparsers.add_parser("init", help="a fresh dense model from a preset or config file",
                              description="Create a randomly initialised dense model sized to a tokenizer.")
    shape = p.add_mutually_exclusive_group(required=True)
    shape.add_argument("--preset", choices=preset_names(), help="named shape (see bam/modeling/presets.py)")
    shape.add_argument("--config", metavar="FILE", help="JSON or YAML file of BamConfig fields")
    p.add_argument("--tokenizer", required=True, metavar="DIR", help="tokenizer directory (sets vocab_size)")
    p.add_argument("--out", required=True, metavar="DIR", help="model directory to create")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed (default 0)")
    p.set_defaults(func=cmd_init)


def cmd_init(args) -> int:
    from bam.data.tokenizer import load_tokenizer  # noqa: PLC0415
    from bam.formats.model_dir import init_model  # noqa: PLC0415
    from bam.modeling.presets import build_config, config_file_fields, preset_fields  # noqa: PLC0415

    tokenizer = load_tokenizer(args.tokenizer)
    if args.preset:
        fields, where = preset_fields(args.preset), f"preset {args.preset}"
    else:
        fields, where = config_file_fields(args.config), args.config
    config = build_config(fields, tokenizer, where)
    model = init_model(config, args.out, Path(args.tokenizer), args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"bam init: wrote {args.out} ({n_params / 1e6:.2f}M parameters, vocab {config.vocab_size}, "
          f"{config.num_hidden_layers} layers, d={config.hidden_size})")
    return 0


# ---------------------------------------------------------------------------------------------
# bam branch


def _register_branch(subparsers) -> None:
    p = subparsers.add_parser("branch", help="copy a seed model once per domain",
                              description="Make one copy of SEED per expert domain, plus a manifest "
                                          f"({BRANCH_MANIFEST}) recording the seed and its hash.")
    p.add_argument("seed", metavar="SEED", help="seed model directory (ours or a supported HF checkpoint)")
    p.add_argument("--experts", required=True, metavar="A,B,...", help="comma-separated domain names")
    p.add_argument("--out", required=True, metavar="DIR", help="directory to create: DIR/<domain>/ per expert")
    p.set_defaults(func=cmd_branch)


def parse_expert_names(spec: str) -> list[str]:
    names = [name.strip() for name in spec.split(",")]
    for name in names:
        if not _NAME_RE.match(name):
            raise BamError(f"--experts {spec}: domain name {name!r} must match [A-Za-z0-9][A-Za-z0-9_.-]*")
    duplicate = first_duplicate(names)
    if duplicate:
        raise BamError(f"--experts {spec}: domain {duplicate!r} is given twice")
    return names


def cmd_branch(args) -> int:
    experts = parse_expert_names(args.experts)
    out = branch(args.seed, experts, args.out)
    print(f"bam branch: wrote {len(experts)} experts ({', '.join(experts)}) to {out}")
    return 0


# ---------------------------------------------------------------------------------------------
# bam train


# What --data accepts and how it becomes documents: the one text every verb taking --data shows
# (train, eval, embed-domains, add-expert); `bam tokenizer train --data` refers to it.
DATA_HELP = ("a text file, directory, glob, .jsonl, .parquet or hf:DATASET; PATH#FIELD picks the text field. "
             "Each file of a directory or glob is one document, each .jsonl/.parquet/dataset record one; "
             "a text file named alone is cut into documents of 1-2 KB at blank lines (at line ends where "
             "there are none). Documents go to train/validation/test by a hash of their text")


def add_data_args(p, what: str, required: bool = True) -> None:
    p.add_argument("--data", required=required, nargs="+", action="extend", default=[], metavar="NAME=PATH[:WEIGHT]",
                   help=f"{what}: {DATA_HELP}")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory (default: the model's own)")
    p.add_argument("--cache-dir", metavar="DIR", help="tokenized-shard cache (default $BAM_CACHE or "
                                                     "~/.cache/bam/tokens)")
    p.add_argument("--val-fraction", type=float, default=0.05, help="documents held out for validation")
    p.add_argument("--test-fraction", type=float, default=0.0, help="documents held out for test")


def _register_train(subparsers) -> None:
    from bam.train.optim import ADAPTER_MIXTURE_TRAINS, TRAIN_GROUPS  # noqa: PLC0415

    p = subparsers.add_parser(
        "train", help="train a model on a weighted mixture of domains (torchrun for DDP/FSDP2)",
        description="Train MODEL with AdamW (warmup, then cosine). Run under `torchrun --nproc_per_node K` "
                    "for data parallelism; --batch-size is the global batch either way.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", metavar="MODEL", help="model directory (ours or a supported HF checkpoint)")
    add_data_args(p, "training domains, weight = mixture share")
    p.add_argument("--out", required=True, metavar="OUT", help="run directory (metrics, checkpoints, model/)")
    p.add_argument("--max-steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=16, help="global sequences per optimizer step")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (memory, not maths)")
    p.add_argument("--lr", type=float, default=3e-4, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=100, help="linear warmup steps")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine floor as a fraction of --lr")
    p.add_argument("--weight-decay", type=float, default=0.1, help="not applied to norms, biases, routers")
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip (0: none)")
    p.add_argument("--save-every", type=int, default=500, help="checkpoint interval (the last step always saves)")
    p.add_argument("--keep", type=int, default=2, help="checkpoints kept")
    p.add_argument("--eval-every", type=int, default=500, help="validation interval (0: never)")
    p.add_argument("--eval-tokens", type=int, default=65536, help="validation tokens per domain")
    p.add_argument("--seed", type=int, default=0, help="data-order seed")
    p.add_argument("--resume", action="store_true", help="continue from OUT's latest complete checkpoint")
    p.add_argument("--aux-loss-coef", type=float, default=None,
                   help="load-balancing loss coefficient; unset keeps the model config's")
    p.add_argument("--z-loss-coef", type=float, default=None,
                   help="router z-loss coefficient; unset keeps the model config's")
    p.add_argument("--train-only", default=None, metavar="GROUPS",
                   help=f"comma-separated groups ({', '.join(TRAIN_GROUPS)}) or name patterns; default all, "
                        f"but {ADAPTER_MIXTURE_TRAINS} for a mixture of adapter experts (the seed's "
                        f"projections stay frozen; routers,adapter freezes the whole seed)")
    adapter = p.add_argument_group("adapter: train only a LoRA or (IA)³ adapter on the frozen MODEL; "
                                   "OUT/model is then a PEFT adapter directory (adapter_config.json, adapter_model.safetensors)")
    adapter.add_argument("--adapter", choices=("lora", "ia3"), default=None, help="the adapter to train")
    adapter.add_argument("--rank", type=int, default=8, help="LoRA rank r")
    adapter.add_argument("--alpha", type=float, default=8.0, help="LoRA alpha (the update is scaled by alpha / r)")
    adapter.add_argument("--targets", metavar="P1,P2", default=None,
                         help="projections to adapt, among q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj "
                              "(unset: all of them for LoRA; k_proj,v_proj,down_proj for (IA)³)")
    p.add_argument("--dist", choices=("ddp", "fsdp"), default="ddp", help="data parallelism under torchrun")
    p.add_argument("--max-bad-steps", type=int, default=5,
                   help="stop after more than this many consecutive non-finite steps")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    from bam.train.config import TrainConfig  # noqa: PLC0415
    from bam.train.loop import train  # noqa: PLC0415

    cfg = TrainConfig(
        model=args.model, data=args.data, out=args.out, tokenizer=args.tokenizer, cache_dir=args.cache_dir,
        val_fraction=args.val_fraction, test_fraction=args.test_fraction, max_steps=args.max_steps,
        batch_size=args.batch_size, seq_len=args.seq_len, grad_accum=args.grad_accum, lr=args.lr,
        warmup=args.warmup, min_lr_ratio=args.min_lr_ratio, weight_decay=args.weight_decay, clip=args.clip,
        save_every=args.save_every, eval_every=args.eval_every, eval_tokens=args.eval_tokens, seed=args.seed,
        resume=args.resume, keep=args.keep, aux_loss_coef=args.aux_loss_coef, z_loss_coef=args.z_loss_coef,
        train_only=args.train_only, adapter=args.adapter, adapter_rank=args.rank, adapter_alpha=args.alpha,
        adapter_targets=[t.strip() for t in args.targets.split(",")] if args.targets else None,
        dist=args.dist, max_bad_steps=args.max_bad_steps,
        progress=not args.no_progress,
    )
    final = train(cfg)
    if int(os.environ.get("RANK", 0)) == 0:  # under torchrun, one line from rank 0
        print(f"bam train: wrote {final}")
    return 0


# ---------------------------------------------------------------------------------------------
# bam eval


def _register_eval(subparsers) -> None:
    p = subparsers.add_parser("eval", help="per-domain perplexity and bits per byte",
                              description="Perplexity and bits per byte of MODEL on each domain's held-out split.")
    p.add_argument("model", metavar="MODEL", help="model directory")
    add_data_args(p, "evaluation domains", required=False)
    p.add_argument("--split", choices=("validation", "test", "all"), default="validation",
                   help="held-out split, or all documents (for files held out by hand)")
    p.add_argument("--seq-len", type=int, default=None, help="window length (default: min(context, 1024))")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=None, help="cap on scored tokens per domain")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    tasks = p.add_argument_group("downstream tasks through lm-evaluation-harness (pip install 'bam[eval]')")
    tasks.add_argument("--tasks", metavar="T1,T2", help="lm-eval task names, e.g. hellaswag or a local YAML task")
    tasks.add_argument("--include-path", metavar="DIR", help="directory of local lm-eval task YAML files")
    tasks.add_argument("--limit", type=int, default=None, help="examples per task (for a quick look)")
    long = p.add_argument_group("long context, with SnapKV prompt compression (docs/kv-compression.md)")
    long.add_argument("--long-context", choices=("retrieval", "continuation"), default=None,
                      help="retrieval: a passkey at --depths of --lengths tokens of real text, exact-match accuracy; "
                           "continuation: perplexity of the next --continuation tokens after a --lengths prompt")
    long.add_argument("--kv-budget", default=None, metavar="B[,B...]",
                      help="compress each prompt's KV cache with SnapKV to B positions per KV head: tokens (512) or "
                           "a fraction of the prompt (0.25); 'none' = uncompressed; several budgets run on the same cases")
    long.add_argument("--kv-split", default="even", choices=("even", "gate"),
                      help="with KV experts, split the budget evenly (default) or by the router's gates")
    long.add_argument("--lengths", default="1024", metavar="N[,N...]", help="tokens of text per prompt (default 1024)")
    long.add_argument("--depths", default="0.1,0.5,0.9", metavar="D[,D...]",
                      help="retrieval: where the passkey goes, as fractions of the text (default 0.1,0.5,0.9)")
    long.add_argument("--cases", type=int, default=5, help="prompts per length and depth (default 5)")
    long.add_argument("--continuation", type=int, default=128, help="continuation tokens scored (default 128)")
    long.add_argument("--seed", type=int, default=0, help="seed of the cases (passkeys, text offsets)")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    from bam.eval.perplexity import evaluate_model, format_table, summary  # noqa: PLC0415

    if not args.data and not args.tasks and not args.long_context:
        raise BamError("give --data NAME=PATH ... (perplexity), --tasks T1,T2 (lm-eval) and/or --long-context TASK")
    if args.long_context:
        if args.tasks or args.data:
            raise BamError("--long-context runs alone (without --data or --tasks)")
        return cmd_eval_long_context(args)
    if args.kv_budget is not None:
        raise BamError("--kv-budget applies to --long-context (perplexity windows are scored without a cache)")
    if args.tasks:
        from bam.eval.harness import format_results, run_lm_eval  # noqa: PLC0415

        results = run_lm_eval(args.model, args.tasks.split(","), include_path=args.include_path,
                              limit=args.limit, batch_size=args.batch_size)
        print(json.dumps(results["results"], default=str) if args.json else format_results(results))
        if not args.data:
            return 0
    scores, seq_len = evaluate_model(
        args.model, args.data, tokenizer=args.tokenizer, cache_dir=args.cache_dir, val_fraction=args.val_fraction,
        test_fraction=args.test_fraction, split=args.split, seq_len=args.seq_len, batch_size=args.batch_size,
        max_tokens=args.max_tokens)
    if args.json:
        result = {"model": str(args.model), "split": args.split, "seq_len": seq_len, **summary(scores)}
        json.dump(result, sys.stdout)
        sys.stdout.write("\n")
    else:
        print(f"{args.model} ({args.split} split, seq_len {seq_len})")
        print(format_table(scores))
    return 0


def cmd_eval_long_context(args) -> int:
    from bam.eval.long_context import evaluate_long_context, format_long_context, parse_list  # noqa: PLC0415
    from bam.modeling.kv_compression import parse_budget  # noqa: PLC0415

    budgets = [None if b.strip().lower() == "none" else parse_budget(b.strip())
               for b in (args.kv_budget or "none").split(",") if b.strip()]
    result = evaluate_long_context(
        args.model, args.long_context, budgets, split=args.kv_split,
        lengths=parse_list(args.lengths, int, "--lengths"), depths=parse_list(args.depths, float, "--depths"),
        n_cases=args.cases, seed=args.seed, n_continuation=args.continuation)
    if args.json:
        json.dump(result, sys.stdout)
        sys.stdout.write("\n")
    else:
        print(format_long_context(result))
    return 0


# ---------------------------------------------------------------------------------------------
# bam tokenizer train


def _register_tokenizer(subparsers) -> None:
    p = subparsers.add_parser("tokenizer", help="tokenizer tools")
    verbs = p.add_subparsers(dest="tokenizer_command", required=True, metavar="VERB")
    t = verbs.add_parser("train", help="train a byte-level BPE tokenizer on domains' text")
    t.add_argument("--data", required=True, nargs="+", action="extend", metavar="NAME=PATH",
                   help="text to train on (same syntax as bam train; weights are ignored)")
    t.add_argument("--vocab-size", required=True, type=int, help="vocabulary size (>= 257)")
    t.add_argument("--out", required=True, metavar="DIR", help="tokenizer directory to write")
    t.set_defaults(func=cmd_tokenizer_train)


def cmd_tokenizer_train(args) -> int:
    import itertools  # noqa: PLC0415

    from bam.data.sources import Domain  # noqa: PLC0415
    from bam.data.tokenizer import load_tokenizer, train_tokenizer  # noqa: PLC0415

    domains = [Domain.from_spec(spec) for spec in args.data]  # bad paths fail before any training
    train_tokenizer(itertools.chain.from_iterable(d.documents() for d in domains), args.vocab_size, Path(args.out))
    print(f"bam tokenizer train: wrote {args.out} ({len(load_tokenizer(args.out))} tokens)")
    return 0
