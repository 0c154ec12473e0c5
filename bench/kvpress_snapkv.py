"""Runs INSIDE bench/.venv-kvpress (kvpress and its own transformers; bam is not importable there):
kvpress's SnapKVPress on the dense model, over retrieval cases written by bench/kv_compression.py.

    python kvpress_snapkv.py CASES.json OUT.json

CASES.json: {"gguf": path, "window": w, "kernel": k, "max_new_tokens": n,
             "budgets": [{"label": ..., "kept": [n_kept per case, or null = uncompressed]}],
             "cases": [{"prompt_ids": [...], ...}]}
OUT.json:   {"budgets": [{"label": ..., "answers": [text per case], "seconds": ...}]}

The model and tokenizer are transformers' own GGUF loading of the same file bam reads. Each case's
prompt is compressed at prefill (kvpress's context manager hooks every attention module) to
exactly the positions bam keeps: compression_ratio = 1 - (kept + 0.5) / n, so kvpress's
int(n * (1 - ratio)) is `kept`. Answers are scored by bam (bench/kv_compression.py), not here.
"""

import json
import sys
import time
from pathlib import Path

import torch
from kvpress import SnapKVPress
from transformers import AutoModelForCausalLM, AutoTokenizer


def main(cases_path: str, out_path: str) -> None:
    torch.set_num_threads(1)
    spec = json.loads(Path(cases_path).read_text())
    gguf = Path(spec["gguf"])
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    eos = model.generation_config.eos_token_id
    eos = tokenizer.eos_token_id if eos is None else eos
    results = []
    for budget in spec["budgets"]:
        answers, start = [], time.perf_counter()
        for case, kept in zip(spec["cases"], budget["kept"]):
            ids = torch.tensor([case["prompt_ids"]])
            kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=spec["max_new_tokens"], do_sample=False,
                          temperature=None, top_p=None, top_k=None, eos_token_id=eos,
                          pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos)
            with torch.no_grad():
                if kept is None or kept >= ids.shape[1]:
                    out = model.generate(ids, **kwargs)
                else:
                    press = SnapKVPress(compression_ratio=1 - (kept + 0.5) / ids.shape[1],
                                        window_size=spec["window"], kernel_size=spec["kernel"])
                    with press(model):
                        out = model.generate(ids, **kwargs)
            answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
            print(budget["label"], repr(answers[-1]), file=sys.stderr, flush=True)
        results.append({"label": budget["label"], "answers": answers, "seconds": time.perf_counter() - start})
    Path(out_path).write_text(json.dumps({"budgets": results}))


if __name__ == "__main__":
    main(*sys.argv[1:])
