"""Mixing: wall time and peak RSS of `bam mix --method btx` vs `mergekit-moe` on the same four Llama
experts (random LlamaForCausalLM checkpoints in safetensors, with a small tokenizer).

Both tools run as subprocesses with the same environment, alternating (bam, mergekit, then
mergekit, bam, ...) after the inputs were read once so both start with them in the page cache;
peak RSS is the child's ru_maxrss from wait4 (no sampling). Sizes: full = hidden 1024, 12 layers,
vocab 32000, d_ff 2224 (~790 MB fp32 each, the issue's setting); quick = a few tens of MB each.

What each tool does differs, and the table says so: `bam mix --method btx` averages attention,
norms and embeddings over the four experts (BTX) and writes our format with a manifest (sha256 of
every file); mergekit-moe copies them from the base model and writes a Mixtral. Both stack the four
FFNs; both are asked for top-2 routing with random routers (mergekit: gate_mode random).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from bench import mergekit_env
from bench.common import CACHE_DIR, Options, check, check_result, finish, log, new_result, ratio, run_measured

NAME = "mixing"
N_EXPERTS = 4
RSS_LIMIT = 1e9  # bytes: "peak RSS <= 1 GB"


def shape(opts: Options) -> dict:
    return opts.pick(
        full=dict(hidden_size=1024, num_hidden_layers=12, vocab_size=32000, intermediate_size=2224,
                  num_attention_heads=16),
        quick=dict(hidden_size=256, num_hidden_layers=4, vocab_size=8000, intermediate_size=704,
                   num_attention_heads=4),
        tiny=dict(hidden_size=32, num_hidden_layers=1, vocab_size=64, intermediate_size=64, num_attention_heads=2),
    )


def write_tokenizer(out: Path) -> None:
    """A small word-level tokenizer (both tools copy the base model's tokenizer into their output)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(specials + [f"w{i}" for i in range(61)])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(out)


def make_experts(opts: Options, root: Path) -> list[Path]:
    """Four random Llama checkpoints (different seeds), cached under bench/.cache by shape."""
    from transformers import LlamaConfig, LlamaForCausalLM

    s = shape(opts)
    tag = "-".join(str(v) for v in s.values())
    base = root / f"llama-experts-{tag}"
    dirs = [base / f"expert{i}" for i in range(N_EXPERTS)]
    if (base / "done").exists():
        return dirs
    shutil.rmtree(base, ignore_errors=True)
    config = LlamaConfig(**s, num_key_value_heads=s["num_attention_heads"], max_position_embeddings=2048,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    config.dtype = torch.float32
    with torch.device("meta"):
        shapes = {name: tuple(p.shape) for name, p in LlamaForCausalLM(config).state_dict().items()}
    for i, d in enumerate(dirs):
        log(f"[mixing] writing random Llama expert {i} to {d}")
        gen = torch.Generator().manual_seed(i)
        tensors = {}
        for name, shp in shapes.items():
            if name.endswith("norm.weight"):
                tensors[name] = 1.0 + 0.02 * torch.randn(shp, generator=gen)
            else:
                tensors[name] = 0.02 * torch.randn(shp, generator=gen)
        d.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
        del tensors
        config.save_pretrained(d)
        write_tokenizer(d)
    (base / "done").write_text("")
    return dirs


def warm(dirs: list[Path]) -> None:
    """Read every input file once, so the first timed tool does not pay for a cold page cache."""
    for d in dirs:
        for f in d.iterdir():
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def mergekit_config(dirs: list[Path], path: Path) -> Path:
    config = {
        "base_model": str(dirs[0]),
        "gate_mode": "random",
        "dtype": "float32",
        "experts_per_token": 2,
        "experts": [{"source_model": str(d), "positive_prompts": [f"w{i}"]} for i, d in enumerate(dirs)],
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def run(opts: Options) -> dict:
    s = shape(opts)
    work = CACHE_DIR if opts.size != "tiny" else Path(opts.context.get("tmp_dir", CACHE_DIR / "tiny"))
    result = new_result(
        NAME, "Mixing four Llama experts into one MoE: wall time and peak RSS",
        "mergekit-moe (its own venv, gate_mode random, Mixtral output)", opts,
        {**s, "experts": N_EXPERTS, "dtype": "float32", "top_k": 2, "bam_method": "btx"})
    dirs = make_experts(opts, work)
    size = sum(dir_bytes(d) for d in dirs) / N_EXPERTS
    result["config"]["expert_bytes"] = size
    warm(dirs)
    out_root = work / "mix-out"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}

    cmds = {"bam mix --method btx": [sys.executable, "-m", "bam.cli", "mix", *map(str, dirs), "--method", "btx",
                                      "--top-k", "2", "--renormalize", "--out", str(out_root / "bam"), "--overwrite"]}
    mk = {"error": "skipped (peers disabled)"}
    if opts.peers:
        mk = mergekit_env.ensure(install=opts.install)
    result["config"]["mergekit"] = {k: v for k, v in mk.items() if k != "exe"}
    if "exe" in mk:
        cfg = mergekit_config(dirs, work / "mergekit-moe.yaml")
        cmds["mergekit-moe"] = [mk["exe"], str(cfg), str(out_root / "mergekit"), "--copy-tokenizer"]
    else:
        result["notes"].append(f"mergekit-moe not measured: {mk['error']}")

    repeats = opts.n_repeats(full=2, quick=2)
    runs: dict[str, list[dict]] = {name: [] for name in cmds}
    for r in range(repeats):
        order = list(cmds) if r % 2 == 0 else list(cmds)[::-1]
        for name in order:
            out = out_root / ("bam" if name.startswith("bam") else "mergekit")
            shutil.rmtree(out, ignore_errors=True)
            log(f"[mixing] run {r + 1}/{repeats}: {name}")
            m = run_measured(cmds[name], log=work / f"{out.name}.log", env=env, timeout=3600)
            m["output_bytes"] = dir_bytes(out) if out.exists() else 0
            runs[name].append(m)
            if m["returncode"] != 0:
                result["notes"].append(f"{name} failed (exit {m['returncode']}): {m['output_tail'][-600:]}")
    for name in cmds:
        shutil.rmtree(out_root / ("bam" if name.startswith("bam") else "mergekit"), ignore_errors=True)

    ok = {name: [m for m in ms if m["returncode"] == 0] for name, ms in runs.items()}
    wall = {name: min(m["wall_s"] for m in ms) if ms else None for name, ms in ok.items()}
    rss = {name: max(m["peak_rss_bytes"] for m in ms) if ms else None for name, ms in ok.items()}
    peer = "mergekit-moe"
    rows = []
    for name, ms in runs.items():
        rows.append({"tool": name, "wall s (best)": wall[name], "wall s (all)": ", ".join("—" if m["wall_s"] is None else f"{m['wall_s']:.1f}" for m in ms),
                     "peak RSS MB": rss[name] / 1e6 if rss[name] else None,
                     "x mergekit wall": ratio(wall[name], wall.get(peer)),
                     "x mergekit RSS": ratio(rss[name], rss.get(peer)),
                     "output MB": ms[-1]["output_bytes"] / 1e6 if ms else None,
                     "ok": all(m["returncode"] == 0 for m in ms)})
    result["tables"].append({
        "title": f"{N_EXPERTS} Llama experts of {size / 1e6:.0f} MB (hidden {s['hidden_size']}, "
                 f"{s['num_hidden_layers']} layers, vocab {s['vocab_size']}, fp32), {repeats} run(s) each",
        "columns": ["tool", "wall s (best)", "wall s (all)", "peak RSS MB", "x mergekit wall", "x mergekit RSS",
                    "output MB", "ok"], "rows": rows})
    ours = "bam mix --method btx"
    result["checks"].append(check("bam mix peak RSS (GB)", rss[ours] / 1e9 if rss[ours] else None, "<=", RSS_LIMIT / 1e9,
                                  note="the 1 GB bar is set for the full size (4 x 790 MB)"))
    result["checks"].append(check("bam mix wall / mergekit-moe wall", ratio(wall[ours], wall.get(peer)), "<=", 1.0))
    result["notes"].append("bam mix averages attention/norms/embeddings of all four experts (BTX) and writes a "
                           "sha256 manifest; mergekit-moe copies them from the base model. Wall = best of the runs, "
                           "RSS = max of the runs.")
    if "versions" in mk:
        result["notes"].append(f"mergekit venv: {json.dumps(mk['versions'])}")
    finish(result)
    check_result(result)
    return result
