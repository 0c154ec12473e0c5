"""torch.profiler on the benchmark shapes: `python -m bench.profiling [--only moe_ffn,attention,train_step]
[--rows 15] [--d 256]`. Prints, per workload, the top operators by self CPU time (forward and
backward ops both show: autograd nodes appear as e.g. `GroupedMmBackward0`), so one can see where
ours spends time that the dense limit or the peer does not. Findings go into bench/README.md.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from bench import attention, moe_ffn, train_step
from bench.common import Options


def profiled(fn, steps: int = 3, rows: int = 15, label: str = "") -> str:
    fn()  # warmup (lazy inits)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        for _ in range(steps):
            fn()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=48)
    return f"### {label} ({steps} calls)\n{table}"


def moe_workloads(d: int, n: int):
    batch, seq, k = 8, 256, moe_ffn.TOP_K
    d_ff = 4 * d // k
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, seq, d, generator=gen).requires_grad_()
    grad = torch.randn(batch, seq, d, generator=gen)
    ours = moe_ffn.MoEFFN(moe_ffn.bam_ffn_config(d, d_ff, n, k))
    moe_ffn.init_ours(ours, gen)
    dense = moe_ffn.MoEFFN(moe_ffn.bam_ffn_config(d, k * d_ff, 1, 1))
    moe_ffn.init_ours(dense, gen)
    peer = moe_ffn.mixtral_block(ours, d, d_ff, n, k, "grouped_mm")
    return {
        f"MoE FFN ours, d={d} N={n} top-{k}": moe_ffn.fwd_bwd(ours, x, grad, lambda o: o.y_BTD),
        f"MoE FFN Mixtral grouped_mm, d={d} N={n}": moe_ffn.fwd_bwd(peer, x, grad),
        f"dense FFN hidden {k * d_ff}, d={d}": moe_ffn.fwd_bwd(dense, x, grad, lambda o: o.y_BTD),
    }


def attention_workloads(d: int, n: int):
    batch, seq = 8, 256
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(batch, seq, d, generator=gen).requires_grad_()
    grad = torch.randn(batch, seq, d, generator=gen)
    cos_sin = attention.rope_cos_sin(torch.arange(seq).expand(batch, seq), attention.HEAD_DIM, 1e4, torch.float32)
    out = {}
    for label, module in {
        f"MoA ours KV experts, d={d} N={n}": attention.MixtureOfAttention(attention.attn_config(d, n), 0),
        f"MoA ours KV sharing, d={d} N={n}": attention.MixtureOfAttention(attention.attn_config(d, n, True), 0),
        f"MoA naive, d={d} N={n}": attention.NaiveMixtureOfAttention(d, n),
    }.items():
        attention.init_normal(module, gen)
        out[label] = attention.fwd_bwd(module, h, cos_sin, grad)
    return out


def train_workloads():
    s = train_step.shape(Options(size="full"))
    ids = torch.randint(0, s["vocab"], (s["batch"], s["seq"]), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    first: dict = {}
    return {
        "train step ours BTX": train_step.trainer(train_step.BamForCausalLM(train_step.bam_config(s, True)), ids, first, "a"),
        "train step Mixtral": train_step.trainer(train_step.mixtral(s), ids, first, "b"),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profiling", description=__doc__)
    p.add_argument("--only", default="moe_ffn,attention,train_step")
    p.add_argument("--rows", type=int, default=15)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--threads", type=int, default=None, help="torch threads (1 gives stable profiles on a busy machine)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    only = set(args.only.split(","))
    workloads = {}
    if "moe_ffn" in only:
        workloads.update(moe_workloads(args.d, args.experts))
    if "attention" in only:
        workloads.update(attention_workloads(args.d, args.experts))
    if "train_step" in only:
        workloads.update(train_workloads())
    for label, fn in workloads.items():
        print(profiled(fn, args.steps, args.rows, label), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
