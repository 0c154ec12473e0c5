"""Long-context evaluation (bam/eval/long_context.py, `bam eval --long-context`): the passkey cases
against their own construction (the needle's tokens at the stated depth of a contiguous slice of the
filler), exact-match scoring, compressed-with-room equal to uncompressed through the CLI, the
continuation NLL against one full forward, and bad inputs refused in one line."""

import json

import pytest
import torch
import torch.nn.functional as F

from bam.cli import main
from bam.data.tokenizer import load_tokenizer
from bam.errors import BamError
from bam.eval import long_context as lc
from bam.formats.model_dir import load_model, save_model
from bam.modeling.attention import MixtureOfAttention
from bam.modeling.config import BamConfig
from bam.modeling.model import BamForCausalLM

CHAT_TEMPLATE = ("{% for m in messages %}<|user|>{{ m['content'] }}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def models(tmp_path_factory, stdlib_tokenizer):
    """A random dense model and a random BAM (3 KV experts), with a small tokenizer trained on stdlib source."""
    root = tmp_path_factory.mktemp("long_context")
    stdlib_tokenizer(root / "tokenizer", 300)
    vocab = len(load_tokenizer(root / "tokenizer"))
    paths = {}
    for name, fields in {"dense": {}, "bam": dict(n_attn_experts=3)}.items():
        config = BamConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, **fields)
        generator = torch.Generator().manual_seed(0)
        model = BamForCausalLM(config).eval()
        with torch.no_grad():  # large random weights: sharp next-token distributions, uneven gates
            for pname, param in model.named_parameters():
                if "norm" not in pname:
                    param.copy_(0.3 * torch.randn(param.shape, generator=generator))
        for module in model.modules():
            if isinstance(module, MixtureOfAttention) and module.router is not None:
                module.router.weight.data *= 10
        paths[name] = save_model(model, root / name, tokenizer_dir=root / "tokenizer")
    return paths


@pytest.fixture(scope="module")
def tokenizer(models):
    return load_tokenizer(models["dense"])


@pytest.mark.parametrize("chat", [False, True])
def test_cases_are_deterministic_with_the_needle_at_its_depth(chat, tokenizer):
    if chat:
        tokenizer.chat_template = CHAT_TEMPLATE
    try:
        cases = lc.retrieval_cases(tokenizer, [50, 80], [0.0, 0.25, 1.0], n_cases=2, seed=7)
        assert cases == lc.retrieval_cases(tokenizer, [50, 80], [0.0, 0.25, 1.0], n_cases=2, seed=7)
        other = lc.retrieval_cases(tokenizer, [50, 80], [0.0, 0.25, 1.0], n_cases=2, seed=8)
        assert [c.key for c in cases] != [c.key for c in other]
        filler = tokenizer(lc.filler_text(), add_special_tokens=False).input_ids
        opening = tokenizer.decode(cases[0].prompt_ids[:cases[0].needle_start - cases[0].needle_at])
        assert opening == ("<|user|>" if chat else "")
        for case in cases:
            ids = list(case.prompt_ids)
            needle = tokenizer(lc.NEEDLE.format(key=case.key), add_special_tokens=False).input_ids
            assert ids[case.needle_start:case.needle_start + len(needle)] == needle
            assert case.needle_at == round(case.depth * case.length)
            begin = case.needle_start - case.needle_at
            # without the needle, the prompt holds `length` consecutive tokens of the filler
            haystack = ids[begin:case.needle_start] + ids[case.needle_start + len(needle):][:case.length - case.needle_at]
            assert any(filler[s:s + case.length] == haystack for s in range(len(filler) - case.length + 1))
            text = tokenizer.decode(ids)
            assert text.endswith(lc.ANSWER_PREFIX) and lc.QUESTION in text
            assert ("<|assistant|>" in text) == chat and text.count(case.key) == 2
    finally:
        tokenizer.chat_template = None


@pytest.mark.parametrize("generated, correct", [
    (" 12345.", True), ("12345 is the pass key", True), ("\n12345\n", True), ('"12345",', True),
    ("123456", False), ("1234", False), ("the 12345", False), ("", False), ("12345x", False),
])
def test_score_is_exact_match_of_the_first_word(generated, correct):
    assert lc.exact_match(generated, "12345") is correct


def run_json(capsys, *args) -> dict:
    assert main(["eval", *map(str, args), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("name, split", [("dense", "even"), ("bam", "gate")])
def test_budget_of_the_whole_prompt_answers_as_uncompressed(name, split, models, capsys):
    result = run_json(capsys, models[name], "--long-context", "retrieval", "--kv-budget", "none,1.0,4096,0.5",
                      "--kv-split", split, "--lengths", "70", "--depths", "0.2,0.8", "--cases", "2")
    uncompressed, *compressed = result["runs"]
    assert [r["kv_budget"] for r in result["runs"]] == [None, 1.0, 4096, 0.5]
    answers = [[c["answer"] for c in run["cases"]] for run in result["runs"]]
    assert answers[1] == answers[0] and answers[2] == answers[0]
    assert all(a for a in answers[0]) and len(answers[0]) == 4  # the model said something for every case
    for run in result["runs"]:
        assert run["accuracy"] == sum(c["correct"] for c in run["cases"]) / 4
        assert all(c["correct"] == lc.exact_match(c["answer"], c["key"]) for c in run["cases"])


def test_continuation_nll_is_the_full_forward_and_budget_changes_it(models, tokenizer):
    model = load_model(models["bam"]).double().eval()
    (prompt, continuation), = lc.continuation_windows(tokenizer, 60, 9, 1, seed=3)
    ids = torch.tensor([prompt + continuation])
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits[0, len(prompt) - 1:-1]
    expected = float(F.cross_entropy(logits, ids[0, len(prompt):], reduction="sum"))
    assert lc.continuation_nll(model, prompt, continuation, None) == pytest.approx(expected, rel=1e-10)
    whole = lc.continuation_nll(model, prompt, continuation, lc.press_of(1.0, "gate"))
    assert whole == pytest.approx(expected, rel=1e-10)
    assert lc.continuation_nll(model, prompt, continuation, lc.press_of(40, "gate")) != pytest.approx(expected)


def test_cli_continuation_with_whole_prompt_budget_equals_uncompressed(models, capsys):
    result = run_json(capsys, models["dense"], "--long-context", "continuation", "--kv-budget", "none,1.0",
                      "--lengths", "64", "--continuation", "8", "--cases", "2")
    none, whole = result["runs"]
    assert none["tokens"] == whole["tokens"] == 16
    assert whole["ppl"] == pytest.approx(none["ppl"], rel=1e-5)


@pytest.mark.parametrize("args, message", [
    (["--kv-budget", "8"], "kv budget=8: expected at least the observation window"),
    (["--kv-budget", "0.1"], "kv budget=0.1: keeps"),
    (["--kv-budget", "0"], "kv budget=0: expected a positive number"),
    (["--kv-budget", "x"], "--kv-budget 'x': expected a number of tokens"),
    (["--depths", "1.5"], "--depths 1.5: expected fractions"),
    (["--lengths", "0"], "--lengths 0: expected positive numbers"),
    (["--lengths", "a"], "--lengths 'a': expected comma-separated int"),
    (["--cases", "0"], "--cases 0: expected a positive number"),
    (["--data", "x=y.txt"], "--long-context runs alone"),
])
def test_bad_inputs_are_one_line_errors(args, message, models, capsys):
    code = main(["eval", str(models["dense"]), "--long-context", "retrieval", "--lengths", "64", *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err


def test_kv_budget_without_long_context_is_refused(models, capsys):
    code = main(["eval", str(models["dense"]), "--data", "x=y.txt", "--kv-budget", "0.5"])
    err = capsys.readouterr().err
    assert code == 2 and "--kv-budget applies to --long-context" in err and err.count("\n") == 1


def test_filler_too_short_is_refused(tokenizer):
    with pytest.raises(BamError, match="the filler text has"):
        lc.retrieval_cases(tokenizer, [10**8], [0.5])
