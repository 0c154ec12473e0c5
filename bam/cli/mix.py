"""`bam mix` (dense experts -> one MoE checkpoint, by any method of bam/mix/rules.py, Nexus's included)
and `bam inspect` (what a checkpoint costs)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bam.errors import BamError
from bam.formats.model_dir import open_model
from bam.mix.adapter_mix import ADAPTER_METHODS, mix_adapters
from bam.mix.mixing import mix, source_dtype
from bam.mix.nexus import DomainEmbeddings
from bam.mix.provenance import PROVENANCE_NAME
from bam.mix.rules import METHODS, NEXUS_METHODS
from bam.modeling.config import ATTN_MIXINGS, ATTN_ROUTINGS
from bam.modeling import cost


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "mix", help="mix dense experts into one MoE (BTX, BAM, BAM with KV sharing, sparse upcycling)",
        description="Mix dense models branched from one seed into one Mixture-of-Experts (METHOD.md 3). "
                    "btx/bam/bam-shared make one expert per DIR; upcycle copies one DIR's FFN N times.",
    )
    p.add_argument("dirs", nargs="+", metavar="DIR",
                   help="dense model directories (ours or Hugging Face), or with --base the adapter directories")
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--out", required=True, type=Path, help="output model directory")
    p.add_argument("--top-k", type=int, default=1, help="FFN experts per token (default 1, as BAM)")
    p.add_argument("--renormalize", action=argparse.BooleanOptionalAction, default=False,
                   help="renormalize the top-k gates to sum to 1 (Mixtral/original BTX); default off, as BAM")
    p.add_argument("--num-experts", type=int, default=None, help="number of FFN copies (upcycle)")
    p.add_argument("--attn-routing", choices=ATTN_ROUTINGS, default="soft",
                   help="attention experts' routing (bam methods): soft over all (default, as BAM) or topk, "
                        "the paper's ablation")
    p.add_argument("--attn-top-k", type=int, default=1,
                   help="attention experts per token with --attn-routing topk (gates renormalized; default 1)")
    p.add_argument("--router-init-std", type=float, default=0.02, help="std of the new routers (default 0.02)")
    p.add_argument("--seed", type=int, default=0, help="seed of the new routers")
    p.add_argument("--weights", type=_weights, default=None, metavar="W1,W2,..",
                   help="weighted instead of uniform average of the shared parameters, one weight per DIR")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    adapters = p.add_argument_group(
        "adapter experts (--base SEED, then one PEFT/bam adapter DIR per expert; btx, bam, bam-shared)")
    adapters.add_argument("--base", type=Path, metavar="SEED",
                          help="the seed the adapters were trained on: expert j is SEED plus adapter j")
    adapters.add_argument("--base-expert", action=argparse.BooleanOptionalAction, default=True,
                          help="the seed itself (a zero adapter) is also an expert, the general one (default on)")
    adapters.add_argument("--attn-mixing", choices=ATTN_MIXINGS, default="outputs",
                          help="how attention experts mix: their outputs (BAM, default) or their "
                               "parameters (MoLoRA/MoV: one attention, one KV cache)")
    adapters.add_argument("--materialize", action="store_true",
                          help="write the equivalent MoE of full experts (each W + delta_j) instead")
    nexus = p.add_argument_group(
        "Nexus (--method nexus, nexus-bam, nexus-bam-shared): the seed DIR first (its FFN becomes the shared "
        "expert), then one DIR per domain expert")
    nexus.add_argument("--domain-embeddings", type=Path, metavar="FILE",
                       help="bam embed-domains output, one vector per domain expert")
    nexus.add_argument("--domains", metavar="A,B,..",
                       help="the domains of the expert DIRs, in order (default: the file's order)")
    nexus.add_argument("--nexus-hidden-dim", type=int, default=None,
                       help="hidden width h' of the router projection (default: hidden_size)")
    p.set_defaults(func=run_mix)

    p = subparsers.add_parser(
        "inspect", help="parameters (total/active), FLOPs and KV-cache bytes per token of a model",
        description="Cost accounting of a model directory (METHOD.md 5), from its config.",
    )
    p.add_argument("dir", metavar="DIR", help="model directory (ours or Hugging Face)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--n-ctx", type=int, default=256, help="context length for attention FLOPs (default 256)")
    p.add_argument("--dtype-bytes", type=int, default=None,
                   help="bytes per KV-cache element (default: the checkpoint's dtype)")
    p.set_defaults(func=run_inspect)


def _weights(text: str) -> list[float]:
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")


def run_mix(args) -> int:
    if args.method in NEXUS_METHODS:
        if args.domain_embeddings is None:
            raise BamError(f"{args.method} needs --domain-embeddings FILE (make one with `bam embed-domains`)")
        embeddings = DomainEmbeddings.load(args.domain_embeddings)
        if args.domains:
            embeddings = embeddings.select([name.strip() for name in args.domains.split(",")])
    elif args.domain_embeddings or args.domains or args.nexus_hidden_dim:
        raise BamError(f"--domain-embeddings, --domains and --nexus-hidden-dim apply to the nexus methods, "
                       f"not {args.method}")
    else:
        embeddings = None
    if args.base is not None:
        return _mix_adapters(args)
    if args.materialize or args.attn_mixing != "outputs" or not args.base_expert:
        raise BamError("--materialize, --attn-mixing and --no-base-expert apply to adapter experts (--base SEED)")
    sources = [open_model(d) for d in args.dirs]
    out = mix(sources, args.method, args.out, top_k=args.top_k, renormalize=args.renormalize,
              num_experts=args.num_experts, router_init_std=args.router_init_std, seed=args.seed,
              weights=args.weights, overwrite=args.overwrite, domain_embeddings=embeddings,
              nexus_hidden_dim=args.nexus_hidden_dim, attn_routing=args.attn_routing, attn_top_k=args.attn_top_k)
    config = open_model(out).config
    params = (f"params {_count(cost.params_total(config))} total, {_count(cost.params_active(config))} active; "
              f"provenance in {out / PROVENANCE_NAME}")
    if args.method in NEXUS_METHODS:
        attention = ("one averaged attention" if config.n_attn_experts == 1 else
                     f"{config.n_attn_experts} attention experts ({'shared' if config.kv_shared else 'own'} K/V)")
        print(f"wrote {out} ({args.method}): shared expert from {args.dirs[0]}, {config.n_ffn_experts} routed FFN "
              f"experts ({', '.join(config.ffn_expert_domains)}) top-{config.ffn_top_k}, {attention}; {params}")
        return 0
    attention = ("one shared attention" if config.n_attn_experts == 1 else
                 f"{config.n_attn_experts} attention experts ({'shared' if config.kv_shared else 'own'} K/V)")
    if config.attn_routing == "topk":
        attention += f" top-{config.attn_top_k}"
    gates = "renormalized" if config.ffn_renormalize else "not renormalized"
    print(f"wrote {out} ({args.method}): {attention}, {config.n_ffn_experts} FFN experts top-{config.ffn_top_k} "
          f"{gates}; {params}")
    return 0


def _mix_adapters(args) -> int:
    if args.method not in ADAPTER_METHODS:
        raise BamError(f"--method {args.method} with --base: expected one of {', '.join(ADAPTER_METHODS)}")
    if args.weights or args.num_experts or args.domain_embeddings or args.attn_routing != "soft":
        raise BamError("--weights, --num-experts, --domain-embeddings and --attn-routing do not apply to adapter experts")
    out = mix_adapters(open_model(args.base), args.dirs, args.method, args.out, base_expert=args.base_expert,
                       attn_mixing=args.attn_mixing, top_k=args.top_k, renormalize=args.renormalize,
                       router_init_std=args.router_init_std, seed=args.seed, materialize=args.materialize,
                       overwrite=args.overwrite)
    config = open_model(out).config
    experts = "full experts" if args.materialize else f"{config.adapter} adapter experts"
    attention = ("one attention" if config.n_attn_experts == 1 else
                 f"{config.n_attn_experts} attention experts ({'shared' if config.kv_shared else 'own'} K/V, "
                 f"mixing {config.attn_mixing})")
    print(f"wrote {out} ({args.method} of {len(args.dirs)} adapters{' and the seed' if args.base_expert else ''}, "
          f"{experts}): {attention}, {config.n_ffn_experts} FFN experts top-{config.ffn_top_k}; params "
          f"{_count(cost.params_total(config))} total, {_count(cost.params_active(config))} active")
    return 0


def run_inspect(args) -> int:
    if args.n_ctx < 1:
        raise BamError(f"--n-ctx {args.n_ctx}: expected a positive integer")
    if args.dtype_bytes is not None and args.dtype_bytes < 1:
        raise BamError(f"--dtype-bytes {args.dtype_bytes}: expected a positive integer")
    source = open_model(args.dir)
    dtype_bytes = args.dtype_bytes or source_dtype(source).itemsize
    summary = cost.summarize(source.config, args.n_ctx, dtype_bytes)
    summary = {"path": str(source.path), "family": source.family, **summary}
    if args.json:
        print(json.dumps(summary))
    else:
        print(_table(summary))
    return 0


def _table(s: dict) -> str:
    c = s["config"]
    attention = f"{c['num_attention_heads']} heads, {c['num_key_value_heads']} KV heads, head_dim {c['head_dim']}"
    if c["n_attn_experts"] > 1:
        kv = "KV shared" if c["kv_shared"] else "KV experts"
        attention += f"; {c['n_attn_experts']} experts, {kv}, {c['attn_routing']} routing, mixing {c['attn_mixing']}"
    ffn = f"d_ff {c['intermediate_size']}"
    if c["n_ffn_experts"] > 1:
        norm = "renormalized" if c["ffn_renormalize"] else "not renormalized"
        ffn += f"; {c['n_ffn_experts']} experts, top-{c['ffn_top_k']}, {norm}"
    adapter, full = c["adapter"], s["full_experts"]  # full: the costs of adapter experts materialized
    if adapter:
        kind = f"lora rank {c['lora_rank']} (alpha {c['lora_alpha']:g})" if adapter == "lora" else adapter
        experts = " per expert" if c["adapter_experts"] else ""
        targets = ", ".join(t.removesuffix("_proj") for t in c["adapter_targets"])
        held = " (the seed's weights held once)" if c["adapter_experts"] else ""
        adapter = f"{kind}{experts} on {targets}{held}: {_count(s['params_adapter'])} of the parameters"
    sets = c["n_kv_caches"]
    kv_sets = f"; {sets} K/V set{'s' if sets > 1 else ''} per layer" if c["n_attn_experts"] > 1 else ""
    rows = [
        ("model", f"{s['path']} ({s['family']} checkpoint)"),
        ("layout", c["layout"]),
        ("block", f"{c['block']}, {c['norm']}, {c['num_hidden_layers']} layers, d {c['hidden_size']}, "
                  f"vocab {c['vocab_size']}{', tied embeddings' if c['tie_word_embeddings'] else ''}"),
        ("attention", attention),
        ("ffn", ffn),
        ("params", f"{_count(s['params_total'])} total, {_count(s['params_active'])} active per token"),
        *([("adapter", adapter)] if adapter else []),
        ("flops/token", f"{_count(s['flops_per_token'])} inference, {_count(s['training_flops_per_token'])} "
                        f"training (n_ctx {s['n_ctx']})"),
        ("kv cache", f"{s['kv_cache_bytes_per_token']:,} bytes/token ({s['dtype_bytes']} bytes/element){kv_sets}"),
        *([("as full experts", f"{_count(full['params_total'])} total, {_count(full['params_active'])} active, "
                               f"{_count(full['flops_per_token'])} flops/token, "
                               f"{full['kv_cache_bytes_per_token']:,} KV bytes/token")] if full else []),
    ]
    width = max(len(key) for key, _ in rows)
    return "\n".join(f"{key:<{width}}  {value}" for key, value in rows)


def _count(n: int) -> str:
    """1234567 -> '1.23M (1,234,567)': readable magnitude, exact value alongside."""
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit} ({n:,})"
    return f"{n:,}"
