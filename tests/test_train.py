"""bam init / branch / train / tokenizer train: crash-safe resume, parameter groups, numerical guards."""

from __future__ import annotations

import json
import math
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from _train_assets import VOCAB, bam_cmd, build_assets, read_metrics, run_bam, tensors, train_losses

import bam.train.loop as train_module
from bam.formats.model_dir import load_model, save_model
from bam.cli import main
from bam.modeling.config import BamConfig
from bam.errors import BamError
from bam.modeling.model import BamForCausalLM
from bam.train import optim
from bam.train.config import TrainConfig
from bam.train.loop import train
from bam.train.schedule import lr_at


@pytest.fixture(scope="module")
def assets():
    return build_assets()


def common_args(assets, out: Path, **overrides) -> list[str]:
    settings = {"--max-steps": 8, "--batch-size": 4, "--seq-len": 32, "--lr": 3e-3, "--warmup": 2,
                "--save-every": 2, "--eval-every": 0, "--cache-dir": assets.cache, **overrides}
    args = ["--out", str(out), "--data", *assets.data("code", "prose"), "--no-progress"]
    for key, value in settings.items():
        args += [key, str(value)]
    return args


# ---------------------------------------------------------------------------------------------
# Resume after SIGKILL is bit-identical


def test_sigkill_at_random_step_then_resume_is_bit_identical(assets, tmp_path):
    settings = {"--max-steps": 24, "--save-every": 3, "--eval-every": 8, "--eval-tokens": 1024}
    reference = tmp_path / "reference"
    done = run_bam("train", assets.seed, *common_args(assets, reference, **settings))
    assert done.returncode == 0, done.stderr

    rng = random.Random()
    kill_at = rng.randint(4, 20)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(bam_cmd("train", assets.seed, *common_args(assets, killed, **settings)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None:
        if (killed / "metrics.jsonl").exists() and max(train_losses(killed), default=0) >= kill_at:
            break
        time.sleep(0.005)
    assert proc.poll() is None, f"the run ended before step {kill_at}: nothing was interrupted"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stopped_at = max(train_losses(killed))
    assert not (killed / "model").exists()
    # Whatever the kill interrupted, every visible checkpoint is complete.
    for ckpt in (killed / "checkpoints").glob("step_*"):
        assert (ckpt / "trainer.json").is_file(), f"incomplete checkpoint visible: {ckpt}"

    resumed = run_bam("train", assets.seed, *common_args(assets, killed, **settings), "--resume")
    assert resumed.returncode == 0, resumed.stderr

    expected, actual = tensors(reference / "model"), tensors(killed / "model")
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), f"{name} differs (killed at step {stopped_at})"
    # The metrics log is the uninterrupted one too: no step lost, none duplicated, same losses.
    steps = [r["step"] for r in read_metrics(killed)]
    assert steps == [r["step"] for r in read_metrics(reference)]
    assert train_losses(killed) == train_losses(reference)
    # --keep 2 (default): only the two newest checkpoints remain, the last one at max_steps.
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["step_000021", "step_000024"]


def test_resume_with_a_different_model_or_data_is_refused(assets, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", str(assets.seed), *common_args(assets, out, **{"--max-steps": 4})]) == 0
    other_seed = tmp_path / "other-seed"
    assert main(["init", "--preset", "tiny", "--tokenizer", str(assets.tokenizer), "--out", str(other_seed),
                 "--seed", "1"]) == 0
    capsys.readouterr()
    before = sorted(p.name for p in (out / "checkpoints").iterdir())

    base = common_args(assets, out, **{"--max-steps": 4})
    cases = {
        "model": ["train", str(other_seed), *base, "--resume"],
        # The same domain name, but other text behind it.
        "data.prose": ["train", str(assets.seed), *[a.replace(str(assets.prose), str(assets.code)) for a in base],
                       "--resume"],
        "train.lr": ["train", str(assets.seed), *common_args(assets, out, **{"--max-steps": 4, "--lr": 1e-3}),
                     "--resume"],
    }
    for what, argv in cases.items():
        assert main(argv) == 2, what
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("bam train: error: --resume:"), err
        assert f"belongs to a different run ({what}" in err, err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before


def test_out_exists_without_resume_is_refused(assets, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "something").write_text("x")
    assert main(["train", str(assets.seed), *common_args(assets, out)]) == 2
    assert "already exists; pass --resume" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Learning: the loss goes down, the result is an ordinary model directory


def test_loss_goes_down_and_eval_perplexity_improves(assets, tmp_path, capsys):
    out = tmp_path / "run"
    args = common_args(assets, out, **{"--max-steps": 60, "--batch-size": 8, "--seq-len": 64, "--warmup": 5,
                                       "--save-every": 30, "--eval-every": 30, "--eval-tokens": 2048})
    assert main(["train", str(assets.seed), *args]) == 0
    losses = train_losses(out)
    first, last = [losses[s] for s in range(1, 6)], [losses[s] for s in range(56, 61)]
    assert sum(last) / 5 < sum(first) / 5 - 0.5, (first, last)
    val = [r["val"] for r in read_metrics(out) if "val" in r]
    assert [r["step"] for r in read_metrics(out) if "val" in r] == [0, 30, 60]
    assert val[-1]["code"]["loss"] < val[0]["code"]["loss"] - 0.3

    def ppl(model_dir: Path) -> dict:
        capsys.readouterr()
        assert main(["eval", str(model_dir), "--data", *assets.data("code", "prose"), "--cache-dir",
                     str(assets.cache), "--seq-len", "64", "--json"]) == 0
        return {name: d["ppl"] for name, d in json.loads(capsys.readouterr().out)["domains"].items()}

    before, after = ppl(assets.seed), ppl(out / "model")
    assert before["code"] > 0.9 * VOCAB  # an untrained model is near uniform
    for domain in ("code", "prose"):
        assert after[domain] < 0.7 * before[domain], (before, after)

    # OUT/model is a normal Hugging Face directory: Auto classes load it (after `import bam`).
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    ours = load_model(out / "model")
    ids = torch.tensor([AutoTokenizer.from_pretrained(out / "model").encode("def f(x):\n    return x")])
    assert torch.equal(hf(ids).logits, ours(ids).logits)


def test_lr_schedule_is_linear_warmup_then_cosine_to_the_floor():
    cfg = TrainConfig(model="m", data=["a=b"], out="o", lr=1.0, warmup=4, max_steps=104, min_lr_ratio=0.1)
    assert [lr_at(s, cfg) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(54, cfg) == pytest.approx(0.55)  # halfway through the cosine: midpoint of lr and floor
    assert lr_at(104, cfg) == pytest.approx(0.1)
    values = [lr_at(s, cfg) for s in range(4, 104)]
    assert all(a >= b for a, b in zip(values, values[1:]))


# ---------------------------------------------------------------------------------------------
# Parameter groups


def tiny_moe(tmp_path: Path, assets) -> Path:
    config = BamConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=64, n_ffn_experts=2, n_attn_experts=2,
                       ffn_top_k=1)
    torch.manual_seed(0)
    return save_model(BamForCausalLM(config), tmp_path / "moe", assets.tokenizer)


def test_train_only_routers_changes_only_router_tensors(assets, tmp_path):
    moe = tiny_moe(tmp_path, assets)
    out = tmp_path / "run"
    assert main(["train", str(moe), *common_args(assets, out, **{"--max-steps": 3}), "--train-only", "routers"]) == 0
    before, after = tensors(moe), tensors(out / "model")
    routers = [name for name in before if name.endswith(".router.weight")]
    assert len(routers) == 4  # an FFN and an attention router per layer
    for name in before:
        if name in routers:
            assert not torch.equal(before[name], after[name]), f"{name} did not train"
        else:
            assert torch.equal(before[name], after[name]), f"{name} changed but is frozen"
    # The MoE's auxiliary losses are logged.
    record = read_metrics(out)[-1]
    assert record["lb_loss"] > 0 and record["z_loss"] > 0


def test_train_only_groups_and_decay(assets, tmp_path, capsys):
    model = load_model(tiny_moe(tmp_path, assets))
    trainable = optim.set_trainable(model, "experts,norms")
    assert trainable and all(".ffn.experts." in n or n.endswith("norm.weight") for n in trainable)
    groups = optim.param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {n for n in trainable if ".ffn.experts." in n}

    optim.set_trainable(model, "all")
    no_decay = {names[id(p)] for g in optim.param_groups(model, 0.1) if g["weight_decay"] == 0
                for p in g["params"]}
    assert no_decay == {n for n in names.values() if n.endswith("norm.weight") or n.endswith("router.weight")}

    with pytest.raises(BamError, match="unknown group 'rooters'"):
        optim.parse_train_only("rooters")
    assert main(["train", str(assets.seed), *common_args(assets, tmp_path / "r"), "--train-only", "routers"]) == 2
    assert "matches no parameter" in capsys.readouterr().err
    assert not (tmp_path / "r" / "model").exists()


# ---------------------------------------------------------------------------------------------
# Numerical guards


def poison(monkeypatch, bad_calls: set[int], kind: str) -> None:
    """Make the micro-batch loss (kind='loss') or its gradient (kind='grad') non-finite on some calls."""
    original = train_module.micro_step_loss
    calls = {"n": 0}

    class InfGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad * math.inf

    def patched(run, tokens):
        calls["n"] += 1
        loss, parts = original(run, tokens)
        if calls["n"] in bad_calls:
            if kind == "loss":
                loss, parts = loss * math.nan, [math.nan, *parts[1:]]
            else:
                loss = InfGrad.apply(loss)
        return loss, parts

    monkeypatch.setattr(train_module, "micro_step_loss", patched)


def run_config(assets, out: Path, **overrides) -> TrainConfig:
    fields = dict(model=assets.seed, data=assets.data("code", "prose"), out=out, cache_dir=assets.cache,
                  max_steps=8, batch_size=4, seq_len=32, lr=3e-3, warmup=2, save_every=2, eval_every=0,
                  progress=False)
    return TrainConfig(**{**fields, **overrides})


def adam_steps(checkpoint: Path) -> float:
    from safetensors.torch import load_file

    state = load_file(str(checkpoint / "optimizer.safetensors"))
    return float(state["state/model.embed_tokens.weight/step"])


@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_non_finite_steps_are_skipped_and_logged(assets, tmp_path, monkeypatch, kind):
    poison(monkeypatch, {3, 4}, kind)
    out = tmp_path / "run"
    train(run_config(assets, out))
    records = {r["step"]: r for r in read_metrics(out)}
    reason = "non-finite loss" if kind == "loss" else "non-finite gradient"
    assert [s for s, r in records.items() if r.get("skipped")] == [3, 4]
    assert records[3]["reason"] == reason
    if kind == "loss":
        assert records[3]["loss"] is None  # NaN is written as null: the file stays valid JSON
    assert all(math.isfinite(records[s]["loss"]) for s in (1, 2, 5, 6, 7, 8))
    # Two skipped steps: AdamW stepped 6 times in 8 steps, and every weight is finite.
    assert adam_steps(out / "checkpoints" / "step_000008") == 6
    assert all(torch.isfinite(t).all() for t in tensors(out / "model").values())


def test_too_many_non_finite_steps_stop_naming_the_last_good_checkpoint(assets, tmp_path, monkeypatch):
    poison(monkeypatch, set(range(5, 100)), "loss")
    out = tmp_path / "run"
    with pytest.raises(BamError) as err:
        train(run_config(assets, out, max_bad_steps=2))
    message = str(err.value)
    assert "\n" not in message
    assert "3 consecutive steps" in message and "steps 5-7" in message
    # step_000006 was saved mid-streak; the last checkpoint of a healthy run is step_000004.
    assert message.endswith(f"last good checkpoint: {out / 'checkpoints' / 'step_000004'}"), message
    assert max(r["step"] for r in read_metrics(out)) == 7
    assert not (out / "model").exists()


# ---------------------------------------------------------------------------------------------
# init, branch, tokenizer train


def test_presets_have_the_documented_sizes():
    from bam.modeling.presets import PRESETS, preset_fields

    def non_embedding_params(name: str) -> int:
        with torch.device("meta"):
            model = BamForCausalLM(BamConfig(vocab_size=16000, **preset_fields(name)))
        return sum(p.numel() for n, p in model.named_parameters() if "embed" not in n and "lm_head" not in n)

    assert list(PRESETS) == ["tiny", "small", "base"]
    assert 5e4 < non_embedding_params("tiny") < 3e5
    assert 5e5 < non_embedding_params("small") < 3e6
    assert 7e7 < non_embedding_params("base") < 1e8
    assert all(preset_fields(n)["block"] == "parallel" for n in PRESETS)


def test_init_from_config_file(assets, tmp_path, capsys):
    config_file = tmp_path / "shape.yaml"
    config_file.write_text("hidden_size: 48\nnum_hidden_layers: 1\nnum_attention_heads: 3\n"
                           "intermediate_size: 96\nvocab_size: 576\n")
    out = tmp_path / "model"
    assert main(["init", "--config", str(config_file), "--tokenizer", str(assets.tokenizer), "--out", str(out)]) == 0
    model = load_model(out)
    assert (model.config.hidden_size, model.config.vocab_size, model.config.block) == (48, 576, "parallel")
    assert model.config.eos_token_id is not None
    assert (out / "tokenizer.json").is_file()

    # Same seed, same weights; another seed, other weights.
    again, other = tmp_path / "again", tmp_path / "other"
    assert main(["init", "--config", str(config_file), "--tokenizer", str(assets.tokenizer), "--out", str(again)]) == 0
    assert main(["init", "--config", str(config_file), "--tokenizer", str(assets.tokenizer), "--out", str(other),
                 "--seed", "7"]) == 0
    assert all(torch.equal(tensors(out)[k], tensors(again)[k]) for k in tensors(out))
    assert not torch.equal(tensors(out)["lm_head.weight"], tensors(other)["lm_head.weight"])

    capsys.readouterr()
    config_file.write_text('{"hidden_sise": 48}')
    assert main(["init", "--config", str(config_file), "--tokenizer", str(assets.tokenizer),
                 "--out", str(tmp_path / "bad")]) == 2
    assert "unknown config field 'hidden_sise'" in capsys.readouterr().err
    config_file.write_text('{"vocab_size": 100}')
    assert main(["init", "--config", str(config_file), "--tokenizer", str(assets.tokenizer),
                 "--out", str(tmp_path / "bad")]) == 2
    assert "smaller than the tokenizer's 512 tokens" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_branch_copies_the_seed_with_a_manifest(assets, tmp_path, capsys):
    import hashlib

    out = tmp_path / "experts"
    assert main(["branch", str(assets.seed), "--experts", "code,math,legal", "--out", str(out)]) == 0
    manifest = json.loads((out / "branch.json").read_text())
    digest = hashlib.sha256((assets.seed / "model.safetensors").read_bytes()).hexdigest()
    assert manifest["seed"]["path"] == str(assets.seed.resolve())
    assert manifest["seed"]["sha256"] == {"model.safetensors": digest}
    assert list(manifest["experts"]) == ["code", "math", "legal"]
    seed = tensors(assets.seed)
    for domain in ("code", "math", "legal"):
        expert = load_model(out / domain)  # a full model directory, tokenizer included
        assert (out / domain / "tokenizer.json").is_file()
        assert all(torch.equal(seed[n], p) for n, p in expert.named_parameters())

    capsys.readouterr()
    assert main(["branch", str(assets.seed), "--experts", "code,math", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["branch", str(assets.seed), "--experts", "code,code", "--out", str(tmp_path / "b")]) == 2
    assert main(["branch", str(tmp_path / "nope"), "--experts", "a", "--out", str(tmp_path / "b")]) == 2
    assert not (tmp_path / "b").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporaries left


def test_tokenizer_train_cli(assets, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "--data", *assets.data("code", "prose"), "--vocab-size", "300",
                 "--out", str(out)]) == 0
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert len(tokenizer) == 300
    text = "def décodé(x):\n    return x  # ∑"
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_branch_of_an_imported_hf_seed_writes_our_format(assets, tmp_path):
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    llama = transformers.LlamaForCausalLM(config).eval()
    llama.save_pretrained(tmp_path / "llama")
    assert main(["branch", str(tmp_path / "llama"), "--experts", "a,b", "--out", str(tmp_path / "experts")]) == 0
    manifest = json.loads((tmp_path / "experts" / "branch.json").read_text())
    assert manifest["seed"]["family"] == "llama"
    ids = torch.tensor([[1, 5, 9, 200, 7]])
    for name in ("a", "b"):
        assert json.loads((tmp_path / "experts" / name / "config.json").read_text())["model_type"] == "bam"
        expert = load_model(tmp_path / "experts" / name)
        with torch.no_grad():
            torch.testing.assert_close(expert(ids).logits, llama(ids).logits, rtol=1e-4, atol=1e-5)
