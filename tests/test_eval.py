"""Perplexity and bits per byte against hand computations."""

from __future__ import annotations

import json
import math

import pytest
import torch
from _train_assets import VOCAB, build_assets, run_bam

from bam.formats.model_dir import load_model, save_model
from bam.cli import main
from bam.data.shards import prepare_domain
from bam.eval.perplexity import evaluate_domain, evaluate_domains, summary
from bam.data.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def assets():
    return build_assets()


@pytest.fixture(scope="module")
def uniform_model(assets, tmp_path_factory):
    """The seed with a zero LM head: every logit is 0, so every next token has probability 1/V."""
    model = load_model(assets.seed)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    return save_model(model, tmp_path_factory.mktemp("uniform") / "model", assets.tokenizer)


def documents(path) -> list[str]:
    docs = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]
    return [d for d in docs if d.strip()]


def test_uniform_model_perplexity_is_vocab_size_and_bpb_matches_hand_count(assets, uniform_model):
    result = run_bam("eval", uniform_model, "--data", *assets.data("code", "prose"), "--split", "all",
                     "--seq-len", 64, "--cache-dir", assets.cache, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    tokenizer = load_tokenizer(assets.tokenizer)
    for name in ("code", "prose"):
        docs = documents(getattr(assets, name))
        # Every token of every document is predicted once, plus the EOS that ends each document.
        n_tokens = sum(len(tokenizer.encode(d, add_special_tokens=False)) + 1 for d in docs)
        n_bytes = sum(len(d.encode("utf-8")) for d in docs)
        got = report["domains"][name]
        assert got["tokens"] == n_tokens
        assert got["ppl"] == pytest.approx(VOCAB, rel=1e-5)
        assert got["bpb"] == pytest.approx(n_tokens * math.log(VOCAB) / math.log(2) / n_bytes, rel=1e-5)
    assert report["avg_ppl"] == pytest.approx(VOCAB, rel=1e-5)
    assert report["model"] == str(uniform_model) and report["split"] == "all"


def test_eval_nll_equals_the_models_own_loss_on_one_window(assets):
    model = load_model(assets.seed)
    domain = prepare_domain(f"code={assets.code}", assets.tokenizer, assets.cache)
    n = 50
    score = evaluate_domain(model, domain, "validation", seq_len=n, batch_size=4, max_tokens=n)
    assert score.tokens == n
    # Independently: the first n validation tokens after an EOS context, scored by the model's loss.
    ids = torch.tensor([[domain.eos_id, *domain.tokens("validation")[:n].tolist()]])
    with torch.no_grad():
        expected = model(input_ids=ids, labels=ids, use_cache=False).loss.item() * n
    assert score.nll == pytest.approx(expected, rel=1e-5)
    assert score.ppl == pytest.approx(math.exp(expected / n), rel=1e-5)
    # A prefix of the split is charged its proportional share of the split's bytes.
    stats = domain.splits["validation"]
    assert score.bytes == pytest.approx(stats.bytes * n / stats.tokens)


def test_evaluate_domains_scores_each_domain_and_restores_training_mode(assets):
    model = load_model(assets.seed).train()
    domains = [prepare_domain(spec, assets.tokenizer, assets.cache) for spec in assets.data("code", "prose")]
    scores = evaluate_domains(model, domains, seq_len=32, batch_size=3, max_tokens=200)
    assert model.training
    assert list(scores) == ["code", "prose"] and all(s.tokens == 200 for s in scores.values())
    body = summary(scores)
    assert body["avg_ppl"] == pytest.approx((scores["code"].ppl + scores["prose"].ppl) / 2)
    # Batching must not change the result.
    again = evaluate_domains(model, domains, seq_len=32, batch_size=7, max_tokens=200)
    assert again["code"].nll == pytest.approx(scores["code"].nll, rel=1e-6)


def test_eval_table_and_errors(assets, uniform_model, capsys):
    args = ["eval", str(uniform_model), "--data", *assets.data("code"), "--cache-dir", str(assets.cache),
            "--seq-len", "32", "--max-tokens", "100"]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "code" in table and "ppl" in table and "bpb" in table and "512.0" in table

    assert main([*args[:-4], "--seq-len", "100000"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "beyond the model's context" in err
    assert main(["eval", str(uniform_model), "--data", f"code={assets.root / 'missing.txt'}",
                 "--cache-dir", str(assets.cache)]) == 2
    assert "does not exist" in capsys.readouterr().err
