"""Generation: greedy decode tokens/s and KV-cache bytes per token for our dense, BTX, BAM (KV
experts) and BAM (KV sharing) models, with transformers' Llama and Mixtral of the same shapes as
peers for dense and BTX.

All models: sequential block, RMSNorm, d=256, 4 layers, 4 heads, vocab 32000, 4 experts, FFN top-1
(BAM's rule and `bam mix`'s default; Mixtral renormalizes its single gate to 1, which costs the
same). Prompt 16 random tokens; 128 new tokens, greedy, no EOS (every call makes exactly 128);
transformers' `generate` with its default dynamic KV cache for every model. tokens/s = batch x
new tokens / wall time of the whole `generate` call (the 16-token prefill included).

KV-cache bytes per token are measured from the cache the call returns (the bytes of every key and
value tensor, divided by batch x cached positions) and compared with bam.modeling.cost's prediction.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

from bam.modeling import cost
from bam.modeling.config import BamConfig
from bam.modeling.model import CACHE, BamForCausalLM
from bench.common import Options, check, check_result, compare, finish, log, new_result, ratio

NAME = "generation"
PROMPT = 16


def shape(opts: Options) -> dict:
    full = dict(d=256, layers=4, heads=4, vocab=32000, experts=4, d_ff=1024, new_tokens=128, batches=[1, 8])
    tiny = dict(d=32, layers=1, heads=2, vocab=64, experts=2, d_ff=32, new_tokens=2, batches=[2])
    return opts.pick(full, full, tiny)


def bam_config(s: dict, n_attn: int = 1, n_ffn: int = 1, kv_shared: bool = False) -> BamConfig:
    return BamConfig(vocab_size=s["vocab"], hidden_size=s["d"], num_hidden_layers=s["layers"],
                     num_attention_heads=s["heads"], intermediate_size=s["d_ff"],
                     max_position_embeddings=PROMPT + s["new_tokens"] + 16, block="sequential", norm="rmsnorm",
                     n_attn_experts=n_attn, kv_shared=kv_shared, n_ffn_experts=n_ffn, ffn_top_k=1,
                     ffn_renormalize=False, use_cache=True)


def hf_common(s: dict) -> dict:
    return dict(vocab_size=s["vocab"], hidden_size=s["d"], num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                num_key_value_heads=s["heads"], intermediate_size=s["d_ff"], rms_norm_eps=1e-5,
                max_position_embeddings=PROMPT + s["new_tokens"] + 16, tie_word_embeddings=False,
                attn_implementation="sdpa")


def models(s: dict) -> dict[str, tuple[torch.nn.Module, BamConfig]]:
    """name -> (model, the bam config whose cost it has)."""
    n = s["experts"]
    configs = {
        "ours dense": bam_config(s),
        "ours BTX": bam_config(s, n_ffn=n),
        "ours BAM, KV experts": bam_config(s, n_attn=n, n_ffn=n),
        "ours BAM, KV sharing": bam_config(s, n_attn=n, n_ffn=n, kv_shared=True),
    }
    out = {name: (BamForCausalLM(c), c) for name, c in configs.items()}
    out["transformers Llama"] = (LlamaForCausalLM(LlamaConfig(**hf_common(s))), configs["ours dense"])
    mixtral = MixtralConfig(**hf_common(s), num_local_experts=n, num_experts_per_tok=1, sliding_window=None,
                            router_jitter_noise=0.0, experts_implementation="grouped_mm")
    out["transformers Mixtral"] = (MixtralForCausalLM(mixtral), configs["ours BTX"])
    for model, _ in out.values():
        gc = model.generation_config
        gc.eos_token_id = gc.bos_token_id = None
        gc.pad_token_id = 0
        model.eval()
    return out


def kv_bytes_per_token(cache, batch: int) -> tuple[float, int]:
    """(bytes per token, cached positions) from the tensors of a transformers Cache."""
    total = 0
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            total += t.numel() * t.element_size()
    positions = cache.get_seq_length()
    return total / (batch * positions), positions


def run(opts: Options) -> dict:
    device, dtype = opts.device, opts.dtype
    s = shape(opts)
    result = new_result(
        NAME, "Generation: greedy decode tokens/s and KV-cache bytes per token",
        "our dense model (ratios), transformers Llama / Mixtral of the same shape (peers), bam.modeling.cost (KV bytes)",
        opts, {**s, "prompt": PROMPT, "ffn_top_k": 1, "block": "sequential", "cache": "transformers DynamicCache"})
    torch.manual_seed(0)
    built = models(s)
    for model, _ in built.values():
        model.to(device, dtype)
    elem = torch.tensor([], dtype=dtype).element_size()
    gen_kwargs = dict(max_new_tokens=s["new_tokens"], do_sample=False, use_cache=True)

    rows, kv = [], {}
    for batch in s["batches"]:
        ids = torch.randint(0, s["vocab"], (batch, PROMPT), generator=torch.Generator().manual_seed(batch)).to(device)

        def gen(name, model, batch=batch, ids=ids):
            def call():
                with torch.no_grad():
                    out = model.generate(ids, **gen_kwargs, return_dict_in_generate=True)
                if out.sequences.shape[1] != PROMPT + s["new_tokens"]:
                    raise RuntimeError(f"{name} generated {out.sequences.shape[1] - PROMPT} tokens, "
                                       f"not {s['new_tokens']}")
                # KV bytes from the cache of the last call (the same for every call and batch size).
                kv[name] = kv_bytes_per_token(getattr(out, CACHE), batch)[0]
            return call

        log(f"[generation] batch {batch}: timing {len(built)} models")
        timings = compare({name: gen(name, m) for name, (m, _) in built.items()},
                          repeats=opts.n_repeats(5, 3), warmup=opts.n_warmup(1, 1), device=device)
        tps = {name: batch * s["new_tokens"] / t.median for name, t in timings.items()}
        for name, t in timings.items():
            peer = {"ours dense": "transformers Llama", "ours BTX": "transformers Mixtral"}.get(name)
            rows.append({"batch": batch, "model": name, "tokens/s": tps[name],
                         "ms/token": t.median / s["new_tokens"] * 1e3,
                         "x dense": ratio(tps[name], tps["ours dense"]),
                         "x peer": ratio(tps[name], tps[peer]) if peer else None,
                         "KV bytes/token (measured)": kv[name],
                         "KV bytes/token (bam.modeling.cost)": cost.kv_cache_bytes_per_token(built[name][1], elem),
                         "spread": t.spread})
    kv = {name: (kv[name], cost.kv_cache_bytes_per_token(config, elem)) for name, (_, config) in built.items()}
    result["tables"].append({
        "title": f"d={s['d']}, {s['layers']} layers, {s['experts']} experts, {s['new_tokens']} new tokens after a "
                 f"{PROMPT}-token prompt, {result['dtype']} cache",
        "columns": ["batch", "model", "tokens/s", "ms/token", "x dense", "x peer", "KV bytes/token (measured)",
                    "KV bytes/token (bam.modeling.cost)", "spread"], "rows": rows})
    for name, (measured, predicted) in kv.items():
        result["checks"].append(check(f"{name}: measured KV bytes/token / bam.modeling.cost", ratio(measured, predicted), "==", 1.0))
    result["checks"].append(check("KV sharing bytes / dense bytes", ratio(kv["ours BAM, KV sharing"][0],
                                                                        kv["ours dense"][0]), "==", 1.0))
    result["checks"].append(check(f"KV experts bytes / dense bytes (N={s['experts']})",
                                  ratio(kv["ours BAM, KV experts"][0], kv["ours dense"][0]), "==", float(s["experts"])))
    result["notes"].append("no speed target in the issue for generation; ratios are informative")
    finish(result)
    check_result(result)
    return result
