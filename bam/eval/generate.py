"""Text generation for `bam generate`: greedy by default, sampling when a temperature is given.

A thin layer over transformers' `generate`: our model is an ordinary `PreTrainedModel`, so the
decoding strategies, the KV cache and the streamer are transformers' own. What this module adds is
the checks a command line needs (a tokenizer in the model directory, option ranges) and the mapping
from `--temperature/--top-p/--top-k` to generation arguments, where temperature 0 means greedy.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import TextStreamer

from bam.formats.model_dir import load_model, open_model
from bam.errors import BamError
from bam.data.tokenizer import load_tokenizer
from bam.modeling.kv_compression import SnapKV, SnapKVCache, parse_budget
from bam.modeling.transformers_compat import cache_name


def decoding_kwargs(max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0) -> dict:
    """Arguments for `generate`: greedy at temperature 0, else sampling (top_k 0 and top_p 1 = off).

    Every sampling argument is passed explicitly, so the defaults of a checkpoint's
    generation_config.json (transformers' own default is top_k=50) never change what the flags say.
    """
    if max_new_tokens < 1:
        raise BamError(f"--max-new-tokens {max_new_tokens}: expected a positive integer")
    if temperature < 0:
        raise BamError(f"--temperature {temperature}: expected 0 (greedy) or a positive number")
    if not 0 < top_p <= 1:
        raise BamError(f"--top-p {top_p}: expected a number in (0, 1]")
    if top_k < 0:
        raise BamError(f"--top-k {top_k}: expected 0 (off) or a positive integer")
    if temperature == 0:
        return dict(max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None)
    return dict(max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k)


def load_for_generation(model_dir: str | Path, device: str | None = None):
    """(model, tokenizer) for a model directory; BamError when it has no tokenizer."""
    source = open_model(model_dir)
    if source.tokenizer_dir is None:
        raise BamError(f"{model_dir}: no tokenizer in the model directory (tokenizer.json or "
                       f"tokenizer_config.json); copy the tokenizer files of the model it was made from "
                       f"into it, or train one with `bam tokenizer train`")
    tokenizer = load_tokenizer(source.tokenizer_dir)
    model = load_model(model_dir).to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return model, tokenizer


def generate(model_dir: str | Path, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, seed: int | None = None, stream: bool = True,
             device: str | None = None, file=None, kv_budget: str | None = None, kv_split: str = "even") -> str:
    """Continue `prompt`; prints the continuation (token by token when streaming) and returns it.
    `kv_budget` (tokens, or a fraction like "0.25"): compress the prompt's KV cache with SnapKV
    (bam/modeling/kv_compression.py), its budget split across KV experts by `kv_split`."""
    kwargs = decoding_kwargs(max_new_tokens, temperature, top_p, top_k)
    press = None if kv_budget is None else SnapKV(parse_budget(kv_budget), split=kv_split)  # checked before loading
    model, tokenizer = load_for_generation(model_dir, device)
    encoded = tokenizer(prompt, return_tensors="pt").to(model.device)
    if encoded.input_ids.shape[1] == 0:
        raise BamError("--prompt is empty (the tokenizer adds no start token, so there is nothing to continue)")
    eos = model.generation_config.eos_token_id
    eos = tokenizer.eos_token_id if eos is None else eos
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    if seed is not None:
        torch.manual_seed(seed)  # generate() samples from torch's global generator
    streamer = _Streamer(tokenizer, file or sys.stdout) if stream else None
    if press is not None:
        kwargs[cache_name()] = SnapKVCache(model, press.budget, press.window, press.kernel, press.pooling, press.split)
    with torch.no_grad():
        output = model.generate(**encoded, **kwargs, eos_token_id=eos, pad_token_id=pad, streamer=streamer)
    text = tokenizer.decode(output[0, encoded.input_ids.shape[1]:], skip_special_tokens=True)
    if not stream:
        print(text, file=file or sys.stdout, flush=True)
    return text


class _Streamer(TextStreamer):
    """transformers' TextStreamer (whole words as they complete, prompt skipped) to any file."""

    def __init__(self, tokenizer, file):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.file = file

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        print(text, file=self.file, flush=True, end="\n" if stream_end else "")
