"""A full training step (forward, backward, AdamW step) in tokens/s: our BTX model vs transformers'
MixtralForCausalLM of identical shape and routing, our dense model vs transformers'
LlamaForCausalLM of identical shape; and each as MFU against the matmul peak measured in this run.

Shapes: sequential block, RMSNorm, SwiGLU, RoPE, multi-head attention, d=256, 4 layers, 4 heads,
vocab 32000, untied embeddings, batch 8 x 256. BTX: 4 experts of d_ff 1024, top-2 renormalized
(Mixtral's rule). Dense: d_ff 2048 = top_k * d_ff, the same active FLOPs as the BTX model.
Router auxiliary loss ON in both MoEs with coefficient 0.01 (Mixtral: output_router_logits=True,
its load-balancing loss; ours: load balancing 0.01 plus our z-loss 1e-3, also computed).
Both sides: loss from `labels` (shifted inside the model), SDPA attention, no KV cache, AdamW
lr 1e-4, weight decay 0.1. Our models run the way `bam train` runs them: the LM loss through the
fused, chunked head + cross-entropy (`return_logits=False`, bam/modeling/loss.py) and bam.train.optim's optimizer
(`make_optimizer`: fused AdamW, no decay on norms and routers). The peers run as transformers'
Trainer runs them by default: logits, then the cross-entropy, and the fused AdamW kernel (Trainer's
default optimizer, `adamw_torch_fused`, on torch >= 2.8), so the optimizer is no part of the ratio.

MFU = achieved training FLOPs / fp32 matmul throughput, FLOPs counted as METHOD.md section 5 does
(bam.modeling.cost.flops_per_token with n_ctx = sequence length, training = 3 x inference). The throughput
is the best of a few reference GEMMs timed in the same interleaved rounds as the training steps
(so both see the same machine load); MFU against the matmul benchmark's peak is reported too.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

from bam.modeling import cost
from bam.modeling.config import BamConfig
from bam.modeling.model import BamForCausalLM
from bam.train.optim import make_optimizer
from bench import matmul
from bench.common import Options, check, check_result, compare, finish, log, new_result, ratio

NAME = "train_step"
AUX_COEF = 0.01


def shape(opts: Options) -> dict:
    full = dict(d=256, layers=4, heads=4, vocab=32000, experts=4, top_k=2, d_ff=1024, batch=8, seq=256)
    tiny = dict(d=32, layers=1, heads=2, vocab=64, experts=4, top_k=2, d_ff=32, batch=2, seq=8)
    return opts.pick(full, full, tiny)


def bam_config(s: dict, moe: bool) -> BamConfig:
    return BamConfig(
        vocab_size=s["vocab"], hidden_size=s["d"], num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
        intermediate_size=s["d_ff"] if moe else s["top_k"] * s["d_ff"], max_position_embeddings=max(256, s["seq"]),
        block="sequential", norm="rmsnorm", norm_eps=1e-5, tie_word_embeddings=False,
        n_ffn_experts=s["experts"] if moe else 1, ffn_top_k=s["top_k"] if moe else 1, ffn_renormalize=moe,
        router_aux_loss_coef=AUX_COEF, router_z_loss_coef=1e-3, use_cache=False)


def hf_common(s: dict) -> dict:
    return dict(vocab_size=s["vocab"], hidden_size=s["d"], num_hidden_layers=s["layers"],
                num_attention_heads=s["heads"], num_key_value_heads=s["heads"], max_position_embeddings=max(256, s["seq"]),
                rms_norm_eps=1e-5, tie_word_embeddings=False, use_cache=False, attn_implementation="sdpa")


def mixtral(s: dict) -> MixtralForCausalLM:
    config = MixtralConfig(**hf_common(s), intermediate_size=s["d_ff"], num_local_experts=s["experts"],
                           num_experts_per_tok=s["top_k"], router_jitter_noise=0.0, sliding_window=None,
                           output_router_logits=True, router_aux_loss_coef=AUX_COEF,
                           experts_implementation="grouped_mm")
    return MixtralForCausalLM(config)


def llama(s: dict) -> LlamaForCausalLM:
    return LlamaForCausalLM(LlamaConfig(**hf_common(s), intermediate_size=s["top_k"] * s["d_ff"]))


def trainer(model, ids: torch.Tensor, first_loss: dict, key: str):
    ours = isinstance(model, BamForCausalLM)
    if ours:  # as bam train runs it: fused AdamW, fused LM loss
        optimizer, loss_kwargs = make_optimizer(model, lr=1e-4, weight_decay=0.1), {"return_logits": False}
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)  # as Trainer
        loss_kwargs = {}
    model.train()

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids, use_cache=False, **loss_kwargs).loss
        loss.backward()
        optimizer.step()
        first_loss.setdefault(key, float(loss.detach()))

    return step


def run(opts: Options) -> dict:
    device, dtype = opts.device, opts.dtype
    s = shape(opts)
    peak = matmul.peak_gflops(opts)
    result = new_result(
        NAME, "Training step (forward + backward + AdamW), tokens/s and MFU",
        "transformers MixtralForCausalLM (for our BTX) and LlamaForCausalLM (for our dense), identical shapes; "
        "MFU limit = measured matmul peak", opts,
        {**s, "block": "sequential", "norm": "rmsnorm", "renormalize": True, "router_aux_loss": f"on ({AUX_COEF})",
         "matmul_peak_gflops": peak, "flops_count": "bam.modeling.cost training FLOPs, n_ctx = seq"})
    torch.manual_seed(0)
    models = {
        "ours BTX": BamForCausalLM(bam_config(s, moe=True)),
        "transformers Mixtral": mixtral(s),
        "ours dense": BamForCausalLM(bam_config(s, moe=False)),
        "transformers Llama": llama(s),
    }
    experts_impl = models["transformers Mixtral"].config._experts_implementation
    for model in models.values():
        model.to(device, dtype)
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    ids = torch.randint(0, s["vocab"], (s["batch"], s["seq"]), generator=torch.Generator().manual_seed(1)).to(device)
    first_loss: dict = {}
    fns = {name: trainer(m, ids, first_loss, name) for name, m in models.items()}
    # The MFU denominator is also timed inside the same rounds, so it sees the same machine load as
    # the training steps (on a shared machine a peak measured minutes earlier can be off by 2x).
    gemms = {f"GEMM {m}x{k}x{n}": matmul.gemm_fn(m, k, n, device, dtype, opts.size == "tiny")
             for m, k, n in matmul.REFERENCE_SHAPES}
    repeats, warmup = opts.n_repeats(full=7, quick=3), opts.n_warmup(full=2, quick=1)
    log(f"[train_step] timing {len(fns)} models x {repeats} repeats (matmul peak {peak:.1f} GFLOP/s)")
    timings = compare({**fns, **{k: f for k, (f, _) in gemms.items()}}, repeats=repeats, warmup=warmup, device=device)
    ref_gflops = {k: flops / timings.pop(k).median / 1e9 for k, (_, flops) in gemms.items()}
    ref_peak = max(ref_gflops.values())
    result["config"]["interleaved_gemm_gflops"] = ref_gflops

    tokens = s["batch"] * s["seq"]
    flops = {"moe": cost.flops_per_token(bam_config(s, True), s["seq"], training=True),
             "dense": cost.flops_per_token(bam_config(s, False), s["seq"], training=True)}
    peers = {"ours BTX": "transformers Mixtral", "transformers Mixtral": "ours BTX",
             "ours dense": "transformers Llama", "transformers Llama": "ours dense"}
    rows, tps, mfu = [], {}, {}
    for name, t in timings.items():
        kind = "moe" if name in ("ours BTX", "transformers Mixtral") else "dense"
        tps[name] = tokens / t.median
        mfu[name] = tps[name] * flops[kind] / (ref_peak * 1e9) if ref_peak else None
        rows.append({"model": name, "ms/step": t.median * 1e3, "tokens/s": tps[name],
                     "x peer": None, "MFU": mfu[name],
                     "MFU vs matmul bench": tps[name] * flops[kind] / (peak * 1e9) if peak else None,
                     "training GFLOP/token": flops[kind] / 1e9,
                     "params": params[name], "first loss": first_loss.get(name), "spread": t.spread})
    for row in rows:
        row["x peer"] = ratio(tps[row["model"]], tps[peers[row["model"]]])
    result["tables"].append({
        "title": f"d={s['d']}, {s['layers']} layers, vocab {s['vocab']}, batch {s['batch']}x{s['seq']}; "
                 f"MoE {s['experts']} experts top-{s['top_k']} (Mixtral experts_implementation={experts_impl})",
        "columns": ["model", "ms/step", "tokens/s", "x peer", "MFU", "MFU vs matmul bench", "training GFLOP/token",
                    "params", "first loss", "spread"], "rows": rows})
    result["checks"] += [
        check("ours BTX / Mixtral tokens/s", ratio(tps["ours BTX"], tps["transformers Mixtral"]), ">=", 1.0),
        check("ours dense / Llama tokens/s", ratio(tps["ours dense"], tps["transformers Llama"]), ">=", 1.0),
        check("MFU ours BTX", mfu["ours BTX"], ">=", 0.75),
        check("MFU ours dense", mfu["ours dense"], ">=", 0.75),
    ]
    result["notes"].append(f"ours BTX / ours dense tokens/s = {ratio(tps['ours BTX'], tps['ours dense']):.3f} "
                           f"(same active FLOPs); Mixtral / Llama = "
                           f"{ratio(tps['transformers Mixtral'], tps['transformers Llama']):.3f}")
    result["notes"].append(f"MFU = achieved FLOP/s / {ref_peak:.1f} GFLOP/s, the best of the reference GEMMs "
                           f"({', '.join(f'{k}: {v:.1f}' for k, v in ref_gflops.items())}) timed in the same rounds "
                           f"as the steps; 'MFU vs matmul bench' divides by the matmul benchmark's peak "
                           f"({peak:.1f} GFLOP/s) instead")
    result["notes"].append("ours run as `bam train` runs them: fused chunked LM head + cross-entropy (no logits "
                           "tensor, bam/modeling/loss.py) and fused AdamW (bam.train.optim.make_optimizer); the transformers "
                           "models as transformers' Trainer runs them: logits + cross-entropy from `labels`, fused AdamW "
                           "(Trainer's default `adamw_torch_fused`)")
    result["notes"].append("METHOD.md's count omits norms, softmax, RoPE, the loss and the optimizer and counts "
                           "attention scores once (2*n_ctx*d), so MFU is conservative for attention-heavy shapes")
    finish(result)
    check_result(result)
    return result
