"""`python -m bench [--quick] [--only NAME,...] [--device cpu|cuda]`: run the benchmarks, write
bench/results/<name>.json and bench/results/results.md (one table per benchmark, with targets)."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from bench.common import RESULTS_DIR, Options, log, render_markdown, write_json, write_markdown

# matmul first: train_step's MFU divides by the peak it measures in the same run.
BENCHMARKS = ("matmul", "moe_ffn", "attention", "train_step", "generation", "mixing", "adapter_experts",
              "kv_compression")


def load(name: str):
    return importlib.import_module(f"bench.{name}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller shapes and fewer repeats (a few minutes)")
    p.add_argument("--size", choices=("full", "quick", "tiny"), default=None,
                   help="full (default), quick (= --quick) or tiny (smoke test: meaningless timings)")
    p.add_argument("--only", default=None, metavar="NAME,...", help=f"run only these, of: {', '.join(BENCHMARKS)}")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available; bf16 on cuda)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per implementation (default per size)")
    p.add_argument("--warmup", type=int, default=None, help="warmup calls per implementation (default per size)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help=f"results directory (default {RESULTS_DIR})")
    p.add_argument("--no-install", action="store_true",
                   help="mixing, kv_compression: do not create the mergekit / kvpress virtualenv")
    p.add_argument("--no-peers", action="store_true", help="mixing, kv_compression: do not run mergekit-moe / kvpress")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    p.add_argument("--study", type=Path, default=None, metavar="OUT",
                   help="kv_compression: the seed and the data-matched BAM KV experts / KV sharing mixtures a study "
                        "trained (`bam run`/`bam demo` OUT, its report/report.json; seed 0) instead of mixtures of "
                        "identical SmolLM2 copies")
    args = p.parse_args(argv)
    if args.size and args.quick and args.size != "quick":
        p.error("--quick and --size disagree")
    args.size = args.size or ("quick" if args.quick else "full")
    names = BENCHMARKS if args.only is None else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        p.error(f"unknown benchmark(s) {', '.join(unknown)}; expected some of {', '.join(BENCHMARKS)}")
    args.names = [n for n in BENCHMARKS if n in names]
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    opts = Options(size=args.size, device=args.device, repeats=args.repeats, warmup=args.warmup,
                   install=not args.no_install, peers=not args.no_peers, study=args.study)
    load_avg, cpus = os.getloadavg()[0], os.cpu_count() or 1
    if load_avg > cpus:
        log(f"warning: load average {load_avg:.1f} on {cpus} CPUs: other processes compete for the cores, so "
            f"timings are noisy (multi-threaded GEMMs stall when a thread is descheduled); ratios within "
            f"this run are still comparable but rerun on a quiet machine for the record "
            f"(--threads 1 gives steadier ratios on a busy machine)")
    failed = []
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        opts.context["tmp_dir"] = tmp
        start = time.time()
        for name in args.names:
            log(f"=== {name} ({args.size}, {args.device})")
            t0 = time.time()
            try:
                result = load(name).run(opts)
            except Exception as err:  # noqa: BLE001  (one broken benchmark must not lose the others' results)
                log(f"[{name}] FAILED: {type(err).__name__}: {err}\n{traceback.format_exc()}")
                failed.append(name)
                continue
            path = write_json(result, args.out)
            print(render_markdown(result), flush=True)
            log(f"[{name}] done in {time.time() - t0:.0f} s -> {path}")
        md = write_markdown(args.out, list(BENCHMARKS))
        log(f"all done in {time.time() - start:.0f} s; tables in {md}")
    if failed:
        log(f"benchmarks that raised: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
