"""`bam generate`: what it prints is what transformers' `generate` produces for the same settings."""

import sysconfig
from pathlib import Path

import pytest
import torch

from bam.formats.model_dir import load_model, save_model
from bam.cli import main
from bam.modeling.config import BamConfig
from bam.modeling.model import BamForCausalLM
from bam.data.tokenizer import load_tokenizer

PROMPT = "def dedent(text):\n    "


@pytest.fixture(scope="module")
def models(tmp_path_factory, stdlib_tokenizer):
    """A dense model and a BAM mixture of three, all with a tokenizer trained on stdlib source."""
    root = tmp_path_factory.mktemp("generate")
    stdlib_tokenizer(root / "tokenizer", 400, ("textwrap.py", "string.py", "shlex.py"))
    vocab = len(load_tokenizer(root / "tokenizer"))
    experts = []
    for seed in range(3):
        config = BamConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2)
        generator = torch.Generator().manual_seed(seed)
        model = BamForCausalLM(config).eval()
        with torch.no_grad():  # large random weights: sharp, varied next-token distributions
            for name, param in model.named_parameters():
                if "norm" not in name:
                    param.copy_(0.3 * torch.randn(param.shape, generator=generator))
        experts.append(save_model(model, root / f"dense{seed}", tokenizer_dir=root / "tokenizer"))
    assert main(["mix", *map(str, experts), "--method", "bam", "--out", str(root / "bam")]) == 0
    return {"dense": experts[0], "bam": root / "bam"}


def transformers_continuation(path: Path, seed: int | None = None, **kwargs) -> str:
    """The continuation of PROMPT by transformers' own generate() on our loaded model."""
    tokenizer = load_tokenizer(path)
    model = load_model(path)
    input_ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    if seed is not None:
        torch.manual_seed(seed)
    output = model.generate(input_ids, pad_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                            **kwargs)
    return tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize("kind", ["dense", "bam"])
@pytest.mark.parametrize("stream", [True, False])
def test_greedy_output_is_transformers_greedy(models, kind, stream, capsys):
    expected = transformers_continuation(models[kind], max_new_tokens=24, do_sample=False)
    assert len(expected) > 10
    args = ["generate", str(models[kind]), "--prompt", PROMPT, "--max-new-tokens", "24"]
    assert main(args + ([] if stream else ["--no-stream"])) == 0
    assert capsys.readouterr().out == expected + "\n"


def test_sampling_follows_the_flags_and_the_seed(models, capsys):
    path = models["dense"]
    flags = ["--temperature", "1.5", "--top-k", "50", "--top-p", "0.95", "--seed", "7"]
    assert main(["generate", str(path), "--prompt", PROMPT, "--max-new-tokens", "24", *flags]) == 0
    sampled = capsys.readouterr().out
    expected = transformers_continuation(path, seed=7, max_new_tokens=24, do_sample=True, temperature=1.5,
                                         top_k=50, top_p=0.95)
    assert sampled == expected + "\n"
    assert sampled != transformers_continuation(path, max_new_tokens=24, do_sample=False) + "\n"


def test_missing_tokenizer_is_a_one_line_error(tmp_path, capsys):
    model = BamForCausalLM(BamConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2))
    save_model(model, tmp_path / "m")
    assert main(["generate", str(tmp_path / "m"), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no tokenizer" in err


@pytest.mark.parametrize("flag, value", [("--temperature", "-1"), ("--top-p", "0"), ("--top-k", "-2"),
                                         ("--max-new-tokens", "0")])
def test_bad_decoding_options_are_refused(models, flag, value, capsys):
    assert main(["generate", str(models["dense"]), "--prompt", PROMPT, flag, value]) == 2
    assert flag in capsys.readouterr().err


@pytest.mark.parametrize("split", ["even", "gate"])
def test_kv_budget_is_snapkv_in_transformers_generate(models, split, capsys):
    """`--kv-budget` is bam.modeling.kv_compression.SnapKVCache passed to transformers' generate()."""
    from bam.modeling.kv_compression import SnapKVCache  # noqa: PLC0415

    prompt = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text(encoding="utf-8")[:1200]
    path = models["bam"]
    tokenizer, model = load_tokenizer(path), load_model(path)
    encoded = tokenizer(prompt, return_tensors="pt")
    assert encoded.input_ids.shape[1] > 2 * 64
    cache = SnapKVCache(model, 64, split=split)
    output = model.generate(**encoded, cache=cache, max_new_tokens=16, do_sample=False,
                            pad_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    assert all(layer.kept is not None for layer in cache.layers)  # compressed
    expected = tokenizer.decode(output[0, encoded.input_ids.shape[1]:], skip_special_tokens=True)
    assert main(["generate", str(path), "--prompt", prompt, "--max-new-tokens", "16", "--kv-budget", "64",
                 "--kv-split", split, "--no-stream"]) == 0
    assert capsys.readouterr().out == expected + "\n"
    uncompressed = model.generate(**encoded, max_new_tokens=16, do_sample=False,
                                  pad_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    assert not torch.equal(output, uncompressed)  # so the command did compress
