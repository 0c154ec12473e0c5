"""Adapter experts (issue 17): what a mixture of LoRA / (IA)³ experts of one seed holds and how fast it
trains, against full experts of the same routing, and the seed itself.

Models (the default demo's shape: `small` preset, vocab 4096, batch 16 x 256; full size: d=384,
6 layers, vocab 16000), N = 4 experts (the seed as the general expert and three domains), FFN top-1
not renormalized (BAM's rule), soft attention routing:
    seed                dense, every parameter trains (a continued-pretraining step)
    btx, bam            full experts (BAM with KV experts), every parameter trains
    lora-btx            FFN adapter experts (LoRA r=8, alpha 16 on gate/up/down), attention averaged
    lora-bam            LoRA experts on q/k/v/o and the FFN, attention experts mixing outputs (BAM)
    lora-bam-params     the same, attention experts mixing parameters (MoLoRA: one attention)
    ia3-bam             (IA)³ experts on k/v and down_proj's input, mixing outputs
Adapter models train what `bam train` trains on them by default (bam.train.optim.ADAPTER_MIXTURE_TRAINS:
routers, adapters and the seed's embeddings, LM head and norms; its projections frozen). Each step is
forward + backward + AdamW (bam.train.optim's), fused LM loss, as `bam train` runs it; tokens/s are
interleaved in one run (bench/common.py compare).

Held memory: parameters (count and ratio to the seed's), and the peak RSS (wait4's ru_maxrss,
bench/common.py run_measured) of a process that builds the model and holds it (one no-grad forward of
one sequence), and of one that trains it 3 steps (optimizer state and activations included), each
minus the peak of a process that only imports torch and bam (the interpreter's floor).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from bam.modeling import cost
from bam.modeling.config import BamConfig
from bam.modeling.model import BamForCausalLM
from bam.train.optim import ADAPTER_MIXTURE_TRAINS, make_optimizer, set_trainable
from bench.common import CACHE_DIR, Options, check, check_result, compare, finish, log, new_result, ratio, run_measured

NAME = "adapter_experts"
N_EXPERTS = 4
LORA = dict(adapter="lora", lora_rank=8, lora_alpha=16.0)
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODELS = ("seed", "btx", "bam", "lora-btx", "lora-bam", "lora-bam-params", "ia3-bam")
HELD_LIMIT = 1.25  # issue 17: lora-bam holds at most 1.25x the seed's memory
RSS_STEPS = 3


def shape(size: str) -> dict:
    full = dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
                vocab_size=16000, batch=16, seq=256)
    demo = dict(hidden_size=160, intermediate_size=432, num_hidden_layers=4, num_attention_heads=5,
                vocab_size=4096, batch=16, seq=256)
    tiny = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                vocab_size=64, batch=2, seq=8)
    return {"full": full, "quick": demo, "tiny": tiny}[size]


def config(name: str, s: dict) -> BamConfig:
    """The model `name` of this benchmark's table, in the shape `s`."""
    fields = dict(hidden_size=s["hidden_size"], intermediate_size=s["intermediate_size"],
                  num_hidden_layers=s["num_hidden_layers"], num_attention_heads=s["num_attention_heads"],
                  vocab_size=s["vocab_size"], max_position_embeddings=max(256, s["seq"]), block="parallel",
                  use_cache=False)
    moe = dict(n_ffn_experts=N_EXPERTS, ffn_top_k=1)
    attention = dict(n_attn_experts=N_EXPERTS)
    models = {
        "seed": {},
        "btx": moe,
        "bam": {**moe, **attention},
        "lora-btx": {**moe, **LORA, "adapter_experts": True, "adapter_targets": ["gate_proj", "up_proj", "down_proj"]},
        "lora-bam": {**moe, **attention, **LORA, "adapter_experts": True, "adapter_targets": ALL_LINEAR},
        "lora-bam-params": {**moe, **attention, **LORA, "adapter_experts": True, "adapter_targets": ALL_LINEAR,
                            "attn_mixing": "parameters"},
        "ia3-bam": {**moe, **attention, "adapter": "ia3", "adapter_experts": True,
                    "adapter_targets": ["k_proj", "v_proj", "down_proj"]},
    }
    return BamConfig(**fields, **models[name])


def build(name: str, s: dict) -> BamForCausalLM:
    torch.manual_seed(0)
    model = BamForCausalLM(config(name, s))
    set_trainable(model, ADAPTER_MIXTURE_TRAINS if model.config.adapter_experts else "all")  # as bam train does
    return model.train()


def trainer(model: BamForCausalLM, ids: torch.Tensor):
    optimizer = make_optimizer(model, lr=1e-4, weight_decay=0.1)

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids, use_cache=False, return_logits=False).loss.backward()
        optimizer.step()

    return step


def child(name: str, size: str, mode: str) -> None:
    """A measured process: build model `name` and hold it (one no-grad forward of one sequence) or
    train it RSS_STEPS steps; 'floor' only imports torch and bam."""
    if name == "floor":
        return
    s = shape(size)
    model = build(name, s)
    ids = torch.randint(0, s["vocab_size"], (s["batch"], s["seq"]), generator=torch.Generator().manual_seed(1))
    if mode == "hold":
        with torch.no_grad():
            model.eval()(input_ids=ids[:1])
        return
    step = trainer(model, ids)
    for _ in range(RSS_STEPS):
        step()


def peak_rss(mode: str, size: str, result: dict) -> dict[str, int | None]:
    """Peak RSS in bytes of one process per model (and of the floor) in `mode`."""
    rss = {}
    for name in ("floor", *MODELS):
        measured = run_measured([sys.executable, "-m", "bench.adapter_experts", name, size, mode],
                                log=CACHE_DIR / NAME / f"{name}-{mode}.log", cwd=Path(__file__).resolve().parents[1],
                                timeout=1800)
        if measured["returncode"] != 0:
            result["notes"].append(f"{name}'s {mode} process failed: {measured['output_tail'][-400:]}")
        rss[name] = measured["peak_rss_bytes"] if measured["returncode"] == 0 else None
    return rss


def above(rss: dict, name: str) -> int | None:
    return rss[name] - rss["floor"] if rss[name] and rss["floor"] else None


def run(opts: Options) -> dict:
    s = shape(opts.size)
    result = new_result(
        NAME, "Adapter experts: memory held and training tokens/s",
        "full experts of the same routing (btx, bam) and the dense seed; limit: lora-bam holds <= 1.25x the seed",
        opts, {**s, "n_experts": N_EXPERTS, "ffn_top_k": 1, "lora": {k: v for k, v in LORA.items() if k != "adapter"},
               "trained": f"adapter models: {ADAPTER_MIXTURE_TRAINS} (the seed's projections frozen); others: every parameter"})
    models = {name: build(name, s).to(opts.device, opts.dtype) for name in MODELS}
    ids = torch.randint(0, s["vocab_size"], (s["batch"], s["seq"]), generator=torch.Generator().manual_seed(1))
    ids = ids.to(opts.device)
    repeats, warmup = opts.n_repeats(full=5, quick=3), opts.n_warmup(full=1, quick=1)
    log(f"[{NAME}] timing {len(models)} training steps x {repeats} repeats")
    timings = compare({name: trainer(m, ids) for name, m in models.items()}, repeats=repeats, warmup=warmup,
                      device=opts.device)

    log(f"[{NAME}] peak RSS of {len(MODELS) + 1} processes holding a model, then as many training it")
    rss = {mode: peak_rss(mode, opts.size, result) for mode in ("hold", "train")}

    tokens = s["batch"] * s["seq"]
    held = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    rows = []
    for name, model in models.items():
        c = model.config
        rows.append({
            "model": name, "params held": held[name], "x seed": held[name] / held["seed"],
            "params trained": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "params active": cost.params_active(c),
            "GFLOP/token": cost.flops_per_token(c, s["seq"]) / 1e9,
            "KV bytes/token": cost.kv_cache_bytes_per_token(c, 2),
            "tokens/s": tokens / timings[name].median, "x bam": ratio(timings["bam"].median, timings[name].median),
            "held RSS MB": above(rss["hold"], name) / 1e6 if above(rss["hold"], name) else None,
            "held x seed": ratio(above(rss["hold"], name), above(rss["hold"], "seed")),
            "training RSS MB": above(rss["train"], name) / 1e6 if above(rss["train"], name) else None,
            "training x seed": ratio(above(rss["train"], name), above(rss["train"], "seed")),
            "spread": timings[name].spread,
        })
    floor = rss["hold"]["floor"]
    result["tables"].append({"title": f"N = {N_EXPERTS} experts, batch {s['batch']} x {s['seq']}; "
                                      f"RSS above the interpreter's floor ({floor / 1e6 if floor else float('nan'):.0f} MB)",
                             "columns": list(rows[0]), "rows": rows})
    by_name = {row["model"]: row for row in rows}
    lora = by_name["lora-bam"]
    result["checks"] += [
        check("lora-bam params held / seed", lora["x seed"], "<=", HELD_LIMIT),
        check("lora-bam held RSS / seed's", lora["held x seed"], "<=", HELD_LIMIT,
              "peak RSS above the floor of a process holding the model (one no-grad forward)"),
        check("lora-bam training tokens/s / full bam", lora["x bam"], ">=", 1.0, f"{ADAPTER_MIXTURE_TRAINS} vs every parameter"),
    ]
    result["notes"].append(f"params held: seed {held['seed']:,}, bam {held['bam']:,} ({held['bam'] / held['seed']:.2f}x), "
                           f"lora-bam {held['lora-bam']:,} ({held['lora-bam'] / held['seed']:.3f}x)")
    check_result(finish(result))
    return result


if __name__ == "__main__":  # the measured processes of `run`: python -m bench.adapter_experts NAME SIZE MODE
    child(*sys.argv[1:4])
