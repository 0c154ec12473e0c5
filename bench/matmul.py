"""Matmul throughput: the machine's dense GEMM GFLOP/s, the denominator of MFU (train_step).

Square GEMMs of a few sizes plus the shapes a training step at d=256 actually runs (tokens x d by
d x 4d, and the LM head); the best median over those is the "peak". It is the limit for the
training-step benchmark, so it is measured in the same run, with the same threads.
"""

from __future__ import annotations

import torch

from bench.common import Options, check_result, compare, finish, log, new_result

NAME = "matmul"


def shapes(opts: Options) -> list[tuple[int, int, int]]:
    """(m, k, n): C[m, n] = A[m, k] @ B[k, n]."""
    return opts.pick(
        full=[(512, 512, 512), (1024, 1024, 1024), (2048, 2048, 2048), (2048, 256, 1024), (2048, 1024, 256),
              (2048, 256, 8192)],
        quick=[(512, 512, 512), (1024, 1024, 1024), (2048, 256, 1024), (2048, 256, 8192)],
        tiny=[(64, 64, 64)],
    )


# GEMMs that train_step times interleaved with its steps: square, and the LM-head shape of the
# training step (tokens x d by d x vocab).
REFERENCE_SHAPES = [(1024, 1024, 1024), (2048, 256, 32000)]


def gemm_fn(m: int, k: int, n: int, device: str, dtype, tiny: bool = False):
    """(callable doing ~0.1-0.5 s of back-to-back GEMMs, its FLOPs); tiny: one 64^3 GEMM."""
    if tiny:
        m = k = n = 64
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    out = torch.empty(m, n, device=device, dtype=dtype)
    flops = 2 * m * k * n
    inner = 1 if tiny else max(1, min(64, int(1e10 // flops)))

    def gemm():
        for _ in range(inner):
            torch.mm(a, b, out=out)

    return gemm, flops * inner


def measure(opts: Options) -> dict:
    """Run the GEMMs; returns the result dict (with config.peak_gflops)."""
    device, dtype = opts.device, opts.dtype
    result = new_result(NAME, "Matmul throughput (MFU denominator)", "the machine's own dense GEMM", opts,
                        {"shapes": shapes(opts)})
    rows, best = [], 0.0
    for m, k, n in shapes(opts):
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        flops = 2 * m * k * n
        # Enough back-to-back GEMMs per timed call that one call takes ~50 ms at ~50 GFLOP/s.
        inner = max(1, min(64, int(2.5e9 // flops))) if opts.size != "tiny" else 1
        out = torch.empty(m, n, device=device, dtype=dtype)

        def gemm(a=a, b=b, out=out, inner=inner):
            for _ in range(inner):
                torch.mm(a, b, out=out)

        t = compare({"mm": gemm}, repeats=opts.n_repeats(9, 7), warmup=opts.n_warmup(2, 1), device=device)["mm"]
        gflops = flops * inner / t.median / 1e9
        best = max(best, gflops)
        rows.append({"shape (m x k x n)": f"{m} x {k} x {n}", "GFLOP/s (median)": gflops,
                     "GFLOP/s (best)": flops * inner / t.best / 1e9, "spread": t.spread})
        log(f"[matmul] {m}x{k}x{n}: {gflops:.1f} GFLOP/s")
    for row in rows:
        row["fraction of peak"] = row["GFLOP/s (median)"] / best
    result["tables"].append({"title": f"{result['dtype']} GEMM on {device}",
                             "columns": ["shape (m x k x n)", "GFLOP/s (median)", "GFLOP/s (best)", "spread",
                                         "fraction of peak"], "rows": rows})
    result["config"]["peak_gflops"] = best
    result["notes"].append(f"peak = best median over the shapes = {best:.1f} GFLOP/s; train_step divides by it for MFU")
    return result


def run(opts: Options) -> dict:
    result = measure(opts)
    opts.context["matmul_peak_gflops"] = result["config"]["peak_gflops"]
    finish(result)
    check_result(result)
    return result


def peak_gflops(opts: Options) -> float:
    """The peak measured earlier in this run, or measure it now (quick shapes)."""
    if "matmul_peak_gflops" not in opts.context:
        sub = Options(size="quick" if opts.size == "full" else opts.size, device=opts.device,
                      repeats=opts.repeats, warmup=opts.warmup)
        opts.context["matmul_peak_gflops"] = measure(sub)["config"]["peak_gflops"]
    return opts.context["matmul_peak_gflops"]
