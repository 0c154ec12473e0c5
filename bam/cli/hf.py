"""`bam export` (to Mixtral / Qwen2-MoE, a dense model's own family, or a self-contained remote-code
directory) and `bam generate` (greedy or sampled text, streamed to the terminal). See docs/huggingface.md."""

from __future__ import annotations

from pathlib import Path

from bam.formats.export import FAMILY_FORMATS, FORMATS


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="write a model as a standard Hugging Face MoE (mixtral, qwen2_moe), a dense model in its "
                       "family's format (source, llama, qwen3, ...) or with its code (hf)",
        description="Export MODEL. mixtral/qwen2_moe need a sequential block, RMSNorm and one attention "
                    "per layer (BTX, sparse upcycling, Nexus, dense); a family format (source: the family "
                    "the model was imported from) takes a dense model whose every option the family has. "
                    "Both are checked for logit parity with vanilla transformers before anything is "
                    "written; olmoe is always refused (it normalizes queries and keys). "
                    "hf writes our model with its modeling code, for every variant: it loads with "
                    "AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True) without bam installed.",
    )
    p.add_argument("model", metavar="MODEL", help="model directory (ours or an imported Hugging Face one)")
    p.add_argument("--format", required=True, choices=FORMATS, dest="fmt",
                   help="mixtral: renormalized top-k; qwen2_moe: either gate rule; source: the family the "
                        f"model was imported from; {', '.join(FAMILY_FORMATS)}: a dense model in that "
                        "family's format; hf: any model, with its code")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=run_export)

    p = subparsers.add_parser(
        "generate", help="continue a prompt (greedy by default, sampling with --temperature)",
        description="Generate text with MODEL's own tokenizer. Temperature 0 (the default) is greedy "
                    "decoding; a positive temperature samples, optionally restricted by --top-p / --top-k.",
    )
    p.add_argument("model", metavar="MODEL", help="model directory with tokenizer files")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0 = off)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (default 0 = off)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--kv-budget", default=None, metavar="B",
                   help="compress the prompt's KV cache with SnapKV to B positions per KV head: tokens (512) or "
                        "a fraction of the prompt (0.25); docs/kv-compression.md")
    p.add_argument("--kv-split", default="even", choices=("even", "gate"),
                   help="with KV experts, split the budget evenly (default) or by the router's gates")
    p.add_argument("--no-stream", dest="stream", action="store_false",
                   help="print the text once at the end instead of token by token")
    p.set_defaults(func=run_generate)


def run_export(args) -> int:
    from bam.formats.export import export  # noqa: PLC0415

    out = export(args.model, args.fmt, args.out, overwrite=args.overwrite)
    how = ("AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True), no bam needed" if args.fmt == "hf"
           else "vanilla transformers; logits checked against ours")
    print(f"wrote {out} ({args.fmt}): loads with {how}")
    return 0


def run_generate(args) -> int:
    from bam.eval.generate import generate  # noqa: PLC0415

    generate(args.model, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
             top_p=args.top_p, top_k=args.top_k, seed=args.seed, stream=args.stream, device=args.device,
             kv_budget=args.kv_budget, kv_split=args.kv_split)
    return 0
