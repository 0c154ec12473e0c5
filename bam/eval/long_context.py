"""Long-context evaluation with and without SnapKV prompt compression (issue 18; METHOD.md 8).

Two measurements, both run through the cache `bam generate --kv-budget` uses
(bam.modeling.kv_compression.SnapKVCache; no budget = transformers' own DynamicCache):

- **Retrieval** (a passkey task, as in the long-context literature): a line "The pass key is
  NNNNN. Remember it. NNNNN is the pass key." is put at a given depth (a fraction of the filler,
  0.1 = near the start) of `length` tokens of real text, followed by the question; the model
  answers greedily. The prompt is built token by token (template, filler[:i], needle, filler[i:],
  question, template), so the needle starts exactly at filler token i = round(depth * length).
  An instruct model's chat template wraps it (the user turn; the assistant turn opens with
  "The pass key is", so the answer is the first word generated); a tokenizer without a chat
  template gets plain "Question: ... Answer: The pass key is". Score: exact match of the first
  word generated (surrounding punctuation stripped) with the passkey.
- **Continuation perplexity**: a `length`-token prompt of held-out text is prefilled (and
  compressed), then the next `n_continuation` tokens are scored through the compressed cache.

The filler is the Python documentation topics shipped with Python (`pydoc_data`, the prose of the
built-in corpus's `general` domain; bam.data.corpus): real text on every machine, nothing
downloaded. Cases are deterministic: case k of a (seed, length, depth) draws its passkey and the
filler's starting offset from random.Random of those values.
"""

from __future__ import annotations

import math
import random
import string
from dataclasses import dataclass
from functools import cache, lru_cache

import torch
import torch.nn.functional as F

from bam.errors import BamError
from bam.modeling.kv_compression import SnapKV, SnapKVCache
from bam.modeling.transformers_compat import cache_name

NEEDLE = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "What is the pass key? Answer with the number only."
ANSWER_PREFIX = "The pass key is"
KEY_DIGITS = 5


@cache
def filler_text() -> str:
    """The Python documentation topics (pydoc_data), in sorted-name order, as one text."""
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    return "\n\n".join(topics[name].strip() for name in sorted(topics))


@dataclass(frozen=True)
class RetrievalCase:
    """One passkey prompt: `prompt_ids` (template included), the needle's first token at
    `needle_start` of the prompt, i.e. filler token `needle_at` of `length` (= round(depth * length))."""

    length: int
    depth: float
    index: int
    key: str
    needle_at: int
    needle_start: int
    prompt_ids: tuple[int, ...]


def _template(tokenizer) -> tuple[list[int], list[int]]:
    """Token ids before and after the user's text: the chat template's user turn and the opened
    assistant turn when the tokenizer has one, else a plain question/answer layout."""
    marker = "\x00HAYSTACK\x00"
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False,
                                             add_generation_prompt=True)
        before, after = text.split(marker)
        opening = partial_encode(tokenizer)(before)  # the template writes any start token itself
        after = after + ANSWER_PREFIX
    else:
        opening = tokenizer("").input_ids  # the start token the tokenizer adds, if any
        after = f"\n\nAnswer: {ANSWER_PREFIX}"
    encode = partial_encode(tokenizer)
    return opening, encode(f"\n\n{QUESTION}") + encode(after)


def partial_encode(tokenizer):
    return lambda text: tokenizer(text, add_special_tokens=False).input_ids if text else []


@lru_cache(maxsize=4)  # tokenizing the ~700 KB text takes seconds; keyed by the tokenizer object
def _filler_ids(tokenizer) -> list[int]:
    return partial_encode(tokenizer)(filler_text())


def check_grid(lengths, depths, n_cases: int) -> None:
    for length in lengths:
        if not isinstance(length, int) or length < 1:
            raise BamError(f"--lengths {length!r}: expected positive numbers of filler tokens")
    for depth in depths:
        if not 0 <= depth <= 1:
            raise BamError(f"--depths {depth!r}: expected fractions of the filler in [0, 1]")
    if n_cases < 1:
        raise BamError(f"--cases {n_cases}: expected a positive number of cases per length and depth")


def retrieval_cases(tokenizer, lengths, depths, n_cases: int = 5, seed: int = 0) -> list[RetrievalCase]:
    """`n_cases` passkey prompts for each (length, depth); deterministic in (seed, length, depth, k)."""
    check_grid(lengths, depths, n_cases)
    filler = _filler_ids(tokenizer)
    before, after = _template(tokenizer)
    encode = partial_encode(tokenizer)
    cases = []
    for length in lengths:
        if length > len(filler):
            raise BamError(f"--lengths {length}: the filler text has {len(filler)} tokens with this tokenizer")
        for depth in depths:
            for k in range(n_cases):
                rng = random.Random(f"{seed}/{length}/{depth}/{k}")
                key = str(rng.randrange(10 ** (KEY_DIGITS - 1), 10**KEY_DIGITS))
                start = rng.randrange(len(filler) - length + 1)
                haystack = filler[start:start + length]
                at = round(depth * length)
                ids = before + haystack[:at] + encode(NEEDLE.format(key=key)) + haystack[at:] + after
                cases.append(RetrievalCase(length, depth, k, key, at, len(before) + at, tuple(ids)))
    return cases


def first_word(text: str) -> str:
    """The answer in a generation: its first whitespace-separated word, surrounding punctuation stripped."""
    words = text.split()
    return words[0].strip(string.punctuation) if words else ""


def exact_match(generated: str, key: str) -> bool:
    return first_word(generated) == key


def make_cache(model, press: SnapKV | None):
    """The cache a forward or generate() gets: SnapKVCache for a budget (the code `bam generate
    --kv-budget` runs), else None (transformers' own DynamicCache)."""
    if press is None:
        return None
    return SnapKVCache(model, press.budget, press.window, press.kernel, press.pooling, press.split)


def check_press(press: SnapKV | None, n_prompt: int) -> None:
    """Refuse, before any forward, a budget that cannot compress an n_prompt-token prompt."""
    if press is not None:
        press.kept(n_prompt)


@torch.no_grad()
def answer(model, tokenizer, case: RetrievalCase, press: SnapKV | None, max_new_tokens: int = 8) -> str:
    """The model's greedy continuation of the case's prompt (the prompt compressed by `press`)."""
    check_press(press, len(case.prompt_ids))
    ids = torch.tensor([case.prompt_ids], device=model.device)
    eos = model.generation_config.eos_token_id
    eos = tokenizer.eos_token_id if eos is None else eos
    kwargs = {} if press is None else {cache_name(): make_cache(model, press)}
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         temperature=None, top_p=None, top_k=None, eos_token_id=eos,
                         pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos, **kwargs)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def evaluate_retrieval(model, tokenizer, cases: list[RetrievalCase], press: SnapKV | None,
                       progress=None) -> dict:
    """Accuracy (exact match) overall and per (length, depth), and every case's answer."""
    for case in cases:  # every prompt checked against the budget before the first generation
        check_press(press, len(case.prompt_ids))
    rows = []
    for case in cases:
        text = answer(model, tokenizer, case, press)
        rows.append({"length": case.length, "depth": case.depth, "index": case.index, "key": case.key,
                     "prompt_tokens": len(case.prompt_ids), "answer": text, "correct": exact_match(text, case.key)})
        if progress:
            progress(rows[-1])
    cells: dict = {}
    for row in rows:
        cells.setdefault((row["length"], row["depth"]), []).append(row["correct"])
    return {"accuracy": sum(r["correct"] for r in rows) / len(rows),
            "cells": [{"length": length, "depth": depth, "accuracy": sum(c) / len(c), "cases": len(c)}
                      for (length, depth), c in cells.items()],
            "cases": rows}


# ---------------------------------------------------------------------------------------------
# Continuation perplexity


def continuation_windows(tokenizer, length: int, n_continuation: int, n_windows: int, seed: int = 0):
    """`n_windows` (prompt ids, continuation ids) pairs of consecutive filler tokens, deterministic in seed."""
    if length < 1 or n_continuation < 1 or n_windows < 1:
        raise BamError(f"continuation: length={length}, continuation={n_continuation}, windows={n_windows}: "
                       f"expected positive integers")
    filler = _filler_ids(tokenizer)
    span = length + n_continuation
    if span > len(filler):
        raise BamError(f"continuation: {span} tokens asked, the filler text has {len(filler)} with this tokenizer")
    rng = random.Random(f"continuation/{seed}/{length}/{n_continuation}")
    starts = [rng.randrange(len(filler) - span + 1) for _ in range(n_windows)]
    return [(filler[s:s + length], filler[s + length:s + span]) for s in starts]


@torch.no_grad()
def continuation_nll(model, prompt_ids: list[int], continuation_ids: list[int], press: SnapKV | None) -> float:
    """Summed NLL (nats) of the continuation given the prompt, the prompt's cache compressed by `press`:
    the prompt's forward fills (and compresses) the cache, then the continuation is scored over it."""
    check_press(press, len(prompt_ids))
    device = model.device
    prompt = torch.tensor([prompt_ids], device=device)
    continuation = torch.tensor([continuation_ids], device=device)
    cache = make_cache(model, press)
    out = model(input_ids=prompt, use_cache=True, logits_to_keep=1, **{cache_name(): cache})
    logits_first = out.logits[:, -1:]
    cache = getattr(out, cache_name())
    rest = model(input_ids=continuation[:, :-1], use_cache=True, **{cache_name(): cache}).logits \
        if continuation.shape[1] > 1 else logits_first[:, :0]
    logits_BTV = torch.cat([logits_first, rest], dim=1)
    logits_BTV = logits_BTV.to(torch.promote_types(logits_BTV.dtype, torch.float32))
    return float(F.cross_entropy(logits_BTV.flatten(0, 1), continuation.flatten(), reduction="sum"))


def evaluate_continuation(model, windows, press: SnapKV | None) -> dict:
    """Perplexity of the continuations after (compressed) prompts, pooled over the windows."""
    for prompt_ids, _ in windows:
        check_press(press, len(prompt_ids))
    nll = sum(continuation_nll(model, p, c, press) for p, c in windows)
    tokens = sum(len(c) for _, c in windows)
    return {"ppl": math.exp(min(nll / tokens, 700.0)), "loss": nll / tokens, "tokens": tokens,
            "windows": len(windows)}


def press_of(budget, split: str = "even", window: int = 32) -> SnapKV | None:
    """SnapKV settings for a budget (None: uncompressed); bad budgets refused here, in one line."""
    return None if budget is None else SnapKV(budget, window=window, split=split)


# ---------------------------------------------------------------------------------------------
# `bam eval --long-context`

TASKS = ("retrieval", "continuation")


def parse_list(text: str, kind, flag: str) -> list:
    try:
        return [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise BamError(f"{flag} {text!r}: expected comma-separated {kind.__name__} values") from None


def evaluate_long_context(model_dir, task: str, budgets: list, split: str = "even", lengths=(1024,),
                          depths=(0.1, 0.5, 0.9), n_cases: int = 5, seed: int = 0, n_continuation: int = 128,
                          device: str | None = None) -> dict:
    """`bam eval MODEL --long-context TASK`: one result per budget (None: uncompressed), the same
    cases for every budget. Budgets and the grid are checked before the model is loaded."""
    from bam.eval.generate import load_for_generation  # noqa: PLC0415

    if task not in TASKS:
        raise BamError(f"--long-context {task!r}: expected one of {', '.join(TASKS)}")
    presses = [press_of(b, split) for b in budgets]
    check_grid(lengths, depths, n_cases)
    model, tokenizer = load_for_generation(model_dir, device)
    model.eval()
    runs = []
    if task == "retrieval":
        cases = retrieval_cases(tokenizer, lengths, depths, n_cases, seed)
        for press in presses:  # every budget checked against every prompt before the first generation
            for case in cases:
                check_press(press, len(case.prompt_ids))
        for budget, press in zip(budgets, presses):
            runs.append({"kv_budget": budget, **evaluate_retrieval(model, tokenizer, cases, press)})
    else:
        windows = [w for length in lengths for w in continuation_windows(tokenizer, length, n_continuation, n_cases,
                                                                              seed)]
        for budget, press in zip(budgets, presses):
            runs.append({"kv_budget": budget, **evaluate_continuation(model, windows, press)})
    return {"model": str(model_dir), "task": task, "kv_split": split, "lengths": list(lengths),
            "depths": list(depths) if task == "retrieval" else None, "cases": n_cases, "seed": seed, "runs": runs}


def format_long_context(result: dict) -> str:
    """One line per budget (retrieval: accuracy overall and per depth; continuation: perplexity)."""
    lines = [f"{result['model']}: {result['task']}, lengths {result['lengths']}, split {result['kv_split']}"]
    for run in result["runs"]:
        budget = "none" if run["kv_budget"] is None else run["kv_budget"]
        if result["task"] == "retrieval":
            cells = "  ".join(f"{c['length']}@{c['depth']:g}: {c['accuracy']:.2f}" for c in run["cells"])
            lines.append(f"kv-budget {budget}: accuracy {run['accuracy']:.3f} ({len(run['cases'])} cases)  {cells}")
        else:
            lines.append(f"kv-budget {budget}: continuation ppl {run['ppl']:.3f} ({run['tokens']} tokens)")
    return "\n".join(lines)
