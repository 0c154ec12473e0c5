"""Soft mixture of attention (METHOD.md 3.2), forward + backward: ours (one SDPA over N*H heads,
KV experts and KV sharing) vs the naive implementation (N separate dense attention modules and a
softmax router, outputs mixed per position) and vs one dense attention.

The naive module gets the weights of our KV-experts module, so the two compute the same function
(checked before timing). Expected shape of the result: KV experts cost about N x dense; KV sharing
less (one K/V projection, and SDPA's grouped-query path).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bam.modeling.config import BamConfig
from bam.modeling.attention import AttentionMasks, MixtureOfAttention, rope_cos_sin
from bench.common import Options, check, check_result, compare, finish, log, new_result, ratio

NAME = "attention"
HEAD_DIM = 64


def attn_config(d: int, n_experts: int, kv_shared: bool = False) -> BamConfig:
    return BamConfig(vocab_size=16, hidden_size=d, intermediate_size=4 * d, num_hidden_layers=1,
                     num_attention_heads=max(1, d // HEAD_DIM), n_attn_experts=n_experts, kv_shared=kv_shared)


class NaiveMixtureOfAttention(nn.Module):
    """N dense attention modules, each run on the whole sequence, mixed by a soft router."""

    def __init__(self, d: int, n_experts: int):
        super().__init__()
        self.experts = nn.ModuleList(MixtureOfAttention(attn_config(d, 1), 0) for _ in range(n_experts))
        self.router = nn.Linear(d, n_experts, bias=False)

    def forward(self, h_BTD, cos_sin, masks, cache=None):
        gates_BTN = F.linear(h_BTD.float(), self.router.weight.float()).softmax(dim=-1).to(h_BTD.dtype)
        out = None
        for j, expert in enumerate(self.experts):
            y = gates_BTN[..., j:j + 1] * expert(h_BTD, cos_sin, masks, cache)[0]
            out = y if out is None else out + y
        return out, gates_BTN

    @torch.no_grad()
    def copy_from(self, ours: MixtureOfAttention) -> None:
        """Expert j gets rows j of our stacked q/k/v projections and columns j of o_proj."""
        q, kv = ours.n_heads * ours.head_dim, ours.n_kv_heads * ours.head_dim
        for j, expert in enumerate(self.experts):
            expert.q_proj.weight.copy_(ours.q_proj.weight[j * q:(j + 1) * q])
            expert.k_proj.weight.copy_(ours.k_proj.weight[j * kv:(j + 1) * kv])
            expert.v_proj.weight.copy_(ours.v_proj.weight[j * kv:(j + 1) * kv])
            expert.o_proj.weight.copy_(ours.o_proj.weight[:, j * q:(j + 1) * q])
        self.router.weight.copy_(ours.router.weight)


def init_normal(module: nn.Module, generator: torch.Generator, std: float = 0.02) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * std)


def fwd_bwd(module, h, cos_sin, grad):
    params = list(module.parameters())
    masks = causal_masks(h)

    def step():
        for p in params:
            p.grad = None
        h.grad = None
        module(h, cos_sin, masks, None)[0].backward(grad)

    return step


def causal_masks(h_BTD: torch.Tensor) -> AttentionMasks:
    """The masks of a forward over the whole sequence, no padding, no cache: SDPA's causal flag."""
    return AttentionMasks(None, h_BTD.shape[1], 0, h_BTD.device)


def cases(opts: Options) -> list[tuple[int, int]]:
    """(d, N) pairs."""
    return opts.pick(full=[(256, 2), (256, 4), (256, 8), (512, 4)], quick=[(256, 4)], tiny=[(64, 2)])


def run(opts: Options) -> dict:
    device, dtype = opts.device, opts.dtype
    batch, seq = opts.pick((8, 256), (8, 256), (2, 8))
    result = new_result(
        NAME, "Soft mixture of attention, forward + backward",
        "N separate dense attentions + softmax router (naive); one dense attention", opts,
        {"batch": batch, "seq": seq, "head_dim": HEAD_DIM, "cases (d, N)": cases(opts), "mask": "causal (SDPA)"})
    gen = torch.Generator().manual_seed(0)
    for d, n in cases(opts):
        h = torch.randn(batch, seq, d, generator=gen).to(device, dtype).requires_grad_()
        grad = torch.randn(batch, seq, d, generator=gen).to(device, dtype)
        positions = torch.arange(seq, device=device).expand(batch, seq)
        cos_sin = rope_cos_sin(positions, HEAD_DIM, 10000.0, dtype)
        mods = {
            "dense attention": MixtureOfAttention(attn_config(d, 1), 0),
            "ours, KV experts": MixtureOfAttention(attn_config(d, n), 0),
            "ours, KV sharing": MixtureOfAttention(attn_config(d, n, kv_shared=True), 0),
            "naive, N attentions": NaiveMixtureOfAttention(d, n),
        }
        for name, module in mods.items():
            if name != "naive, N attentions":
                init_normal(module, gen)
        mods["naive, N attentions"].copy_from(mods["ours, KV experts"])
        for module in mods.values():
            module.to(device, dtype)
        with torch.no_grad():
            masks = causal_masks(h)
            diff = (mods["naive, N attentions"](h, cos_sin, masks)[0] - mods["ours, KV experts"](h, cos_sin, masks, None)[0])
            diff = diff.abs().max().item()
        log(f"[attention] d={d} N={n}: timing")
        timings = compare({name: fwd_bwd(m, h, cos_sin, grad) for name, m in mods.items()},
                          repeats=opts.n_repeats(11, 5), warmup=opts.n_warmup(2, 1), device=device)
        med = {name: t.median for name, t in timings.items()}
        rows = [{"implementation": name, "ms": med[name] * 1e3, "x dense": ratio(med[name], med["dense attention"]),
                 "x naive": ratio(med[name], med["naive, N attentions"]), "spread": timings[name].spread}
                for name in mods]
        result["tables"].append({
            "title": f"d={d}, {d // HEAD_DIM} heads of {HEAD_DIM}, N={n} experts, batch {batch}x{seq} "
                     f"(ms per forward+backward; max |naive - ours| = {diff:.1e})",
            "columns": ["implementation", "ms", "x dense", "x naive", "spread"], "rows": rows})
        result["checks"].append(check(f"d={d} N={n}: KV experts / naive",
                                      ratio(med["ours, KV experts"], med["naive, N attentions"]), "<=", 1.0))
        result["checks"].append(check(f"d={d} N={n}: KV sharing / KV experts",
                                      ratio(med["ours, KV sharing"], med["ours, KV experts"]), "<", 1.0))
        tolerance = 1e-4 if dtype == torch.float32 else 5e-2
        if diff > tolerance:
            result["notes"].append(f"WARNING d={d} N={n}: naive and ours differ by {diff:.2e}")
    result["notes"].append("every module's backward includes the input gradient; RoPE tables are computed once "
                           "outside the timed call (the model computes them once per forward, not per layer)")
    finish(result)
    check_result(result)
    return result
