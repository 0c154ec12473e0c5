"""Adapters (issue 17 item 1): LoRA and (IA)³ on a frozen seed, trained by `bam train --adapter` and
written in PEFT's format; PEFT's own adapters read by bam. Parity is against PEFT on the
transformers seed (fp32, relative difference <= 1e-4), and every adapter compared is shown to
change the function, so parity is not vacuous."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from _adapter_assets import (ALL_LINEAR, PEFT_CONFIGS, SHAPE, bam_logits, input_ids, make_peft_adapter,  # noqa: F401
                             make_seed, peft_logits, rel_diff)
from _train_assets import build_assets
from safetensors.torch import load_file, save_file

import bam  # noqa: F401  (registers the Auto classes)
from bam.cli import main
from bam.errors import BamError
from bam.formats.model_dir import load_model, open_model
from bam.formats.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_family, base_identity, open_adapter, save_adapter
from bam.modeling.config import BamConfig
from bam.modeling.layout import parameter_shapes
from bam.modeling.model import BamForCausalLM
from bam.train.fingerprint import model_fingerprint


# ---------------------------------------------------------------------------------------------
# PEFT's adapters read by bam


@pytest.mark.parametrize("kind", sorted(PEFT_CONFIGS))
def test_peft_made_adapter_gives_peft_logits_in_bam(kind, tmp_path):
    reference = make_seed(tmp_path / "seed")
    make_peft_adapter(tmp_path / "seed", tmp_path / "adapter", kind)
    ids = input_ids(SHAPE["vocab_size"])
    expected = peft_logits(tmp_path / "seed", tmp_path / "adapter", ids)
    ours = load_model(tmp_path / "adapter")  # its base: the seed directory PEFT recorded
    assert ours.config.adapter == kind.split("-")[0]
    assert rel_diff(bam_logits(ours, ids), expected) <= 1e-4
    with torch.no_grad():
        seed_logits = reference(ids).logits
    assert rel_diff(seed_logits, expected) > 1e-2  # the adapter changes the function


@pytest.mark.parametrize("kind", ["lora", "ia3"])
def test_a_new_adapter_is_the_seed(kind, tmp_path):
    reference = make_seed(tmp_path / "seed")
    fields = {"adapter": kind, "adapter_targets": ALL_LINEAR if kind == "lora" else ["k_proj", "v_proj", "down_proj"]}
    if kind == "lora":
        fields.update(lora_rank=4, lora_alpha=8)
    ours = load_model(tmp_path / "seed", adapter=fields)
    plain = load_model(tmp_path / "seed")
    ids = input_ids(SHAPE["vocab_size"])
    assert torch.equal(bam_logits(ours, ids), bam_logits(plain, ids))  # B = 0, (IA)³ = 1: exactly the seed
    with torch.no_grad():
        assert rel_diff(bam_logits(plain, ids), reference(ids).logits) <= 1e-4
    if kind == "lora":  # and A is not zero, so training moves B (PEFT's initialisation)
        assert all(p.abs().sum() > 0 for n, p in ours.named_parameters() if n.endswith("_lora_A"))


@pytest.mark.parametrize("kind", ["lora", "ia3"])
def test_layout_table_names_the_adapted_models_parameters(kind):
    fields = {"adapter": kind, "adapter_targets": ["q_proj", "v_proj", "down_proj"]}
    if kind == "lora":
        fields = {"adapter": kind, "adapter_targets": ALL_LINEAR, "lora_rank": 3, "lora_alpha": 6}
    config = BamConfig(**SHAPE, block="sequential", **fields)
    model = BamForCausalLM(config)
    shapes = parameter_shapes(config)
    assert list(shapes.items()) == [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    assert any(".adapter." in name for name in shapes)


# ---------------------------------------------------------------------------------------------
# bam train --adapter


@pytest.fixture(scope="module")
def assets():
    return build_assets()


def train_args(assets, seed: Path, out: Path, kind: str, **overrides) -> list[str]:
    settings = {"--max-steps": 4, "--batch-size": 4, "--seq-len": 32, "--lr": 1e-2, "--warmup": 0,
                "--save-every": 2, "--keep": 5, "--eval-every": 0, "--cache-dir": assets.cache,
                "--tokenizer": assets.tokenizer, **overrides}
    args = ["train", str(seed), "--adapter", kind, "--out", str(out), "--data", *assets.data("code", "prose"),
            "--no-progress"]
    for key, value in settings.items():
        args += [key, str(value)]
    return args


@pytest.mark.parametrize("kind", ["lora", "ia3"])
def test_bam_trained_adapter_loads_in_peft_with_equal_logits_and_resumes(kind, assets, tmp_path, capsys):
    from _train_assets import VOCAB

    seed = tmp_path / "seed"
    reference = make_seed(seed, vocab_size=VOCAB)
    out = tmp_path / "run"
    assert main(train_args(assets, seed, out, kind)) == 0
    adapter = out / "model"
    assert (adapter / ADAPTER_CONFIG).is_file() and (adapter / ADAPTER_WEIGHTS).is_file()
    stored = load_file(str(adapter / ADAPTER_WEIGHTS))
    if kind == "lora":
        assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in stored
        assert "base_model.model.model.layers.1.mlp.gate_proj.lora_B.weight" in stored
        assert all(t.abs().sum() > 0 for k, t in stored.items() if "lora_B" in k)  # trained
    else:
        assert set(stored) == {f"base_model.model.model.layers.{i}.{m}.ia3_l" for i in range(2)
                               for m in ("self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj")}
        assert all((t - 1).abs().sum() > 0 for t in stored.values())
    identity = base_identity(adapter)
    assert identity["fingerprint"] == model_fingerprint(seed) and identity["path"] == str(seed.resolve())

    ids = input_ids(VOCAB)
    expected = peft_logits(seed, adapter, ids)
    assert rel_diff(bam_logits(load_model(adapter), ids), expected) <= 1e-4
    with torch.no_grad():
        assert rel_diff(reference(ids).logits, expected) > 1e-3  # training changed the function

    # `bam eval` takes the adapter directory as a model (the tokenizer: its base's)
    for file in assets.tokenizer.iterdir():
        shutil.copy(file, seed)
    scores = {}
    for model in (seed, adapter):
        capsys.readouterr()
        assert main(["eval", str(model), "--data", *assets.data("code"), "--cache-dir", str(assets.cache),
                     "--seq-len", "32", "--max-tokens", "512", "--json"]) == 0
        scores[model] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scores[adapter]["domains"]["code"]["tokens"] == scores[seed]["domains"]["code"]["tokens"] > 0
    assert scores[adapter]["avg_ppl"] != scores[seed]["avg_ppl"]  # the adapted model was evaluated

    # Resume as any run: drop the last training state and the output, continue, get the same adapter.
    shutil.rmtree(out / "checkpoints" / "step_000004")
    shutil.rmtree(adapter)
    assert main([*train_args(assets, seed, out, kind), "--resume"]) == 0
    resumed = load_file(str(adapter / ADAPTER_WEIGHTS))
    assert set(resumed) == set(stored) and all(torch.equal(resumed[k], stored[k]) for k in stored)


def test_adapter_counts_match_bam_inspect(tmp_path, capsys):
    make_seed(tmp_path / "seed")
    make_peft_adapter(tmp_path / "seed", tmp_path / "adapter", "lora")
    assert main(["inspect", str(tmp_path / "seed"), "--json"]) == 0
    seed_total = json.loads(capsys.readouterr().out)["params_total"]
    assert main(["inspect", str(tmp_path / "adapter"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    adapter_numel = sum(t.numel() for t in load_file(str(tmp_path / "adapter" / ADAPTER_WEIGHTS)).values())
    assert summary["params_adapter"] == adapter_numel
    assert summary["params_total"] == seed_total + adapter_numel
    assert summary["params_total"] == sum(p.numel() for p in load_model(tmp_path / "adapter").parameters())


# ---------------------------------------------------------------------------------------------
# Refusals: one line naming the adapter file and the field or tensor


def one_line_error(path: Path, base: Path | None = None) -> str:
    with pytest.raises(BamError) as err:
        open_adapter(path, open_model(base)) if base else open_model(path)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_adapter_of_another_base_is_refused(tmp_path):
    make_seed(tmp_path / "seed")
    make_peft_adapter(tmp_path / "seed", tmp_path / "adapter", "lora")
    make_seed(tmp_path / "other", intermediate_size=128)
    message = one_line_error(tmp_path / "adapter", tmp_path / "other")
    assert ADAPTER_WEIGHTS in message and "mlp.gate_proj.lora_B.weight" in message and "another base" in message
    make_seed(tmp_path / "deeper", num_hidden_layers=3)  # the adapter has no tensors for layer 2
    assert "missing" in one_line_error(tmp_path / "adapter", tmp_path / "deeper")


@pytest.mark.parametrize("field, value, expected", [
    ("use_dora", True, "field use_dora=True"),
    ("bias", "all", "field bias='all'"),
    ("modules_to_save", ["lm_head"], "field modules_to_save=['lm_head']"),
    ("rank_pattern", {"q_proj": 2}, "field rank_pattern="),
    ("target_modules", ["q_proj", "lm_head"], "field target_modules="),
    ("init_lora_weights", "pissa", "field init_lora_weights='pissa'"),
    ("peft_type", "LOHA", "field peft_type='LOHA'"),
])
def test_unsupported_peft_options_are_refused(field, value, expected, tmp_path):
    make_seed(tmp_path / "seed")
    make_peft_adapter(tmp_path / "seed", tmp_path / "adapter", "lora")
    config_file = tmp_path / "adapter" / ADAPTER_CONFIG
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, field: value}))
    message = one_line_error(tmp_path / "adapter")
    assert str(config_file) in message and expected in message


def test_unknown_adapter_tensor_is_refused(tmp_path):
    make_seed(tmp_path / "seed")
    make_peft_adapter(tmp_path / "seed", tmp_path / "adapter", "lora")
    weights = tmp_path / "adapter" / ADAPTER_WEIGHTS
    stored = load_file(str(weights))
    stored["base_model.model.lm_head.lora_A.weight"] = torch.zeros(4, 64)
    save_file(stored, str(weights))
    message = one_line_error(tmp_path / "adapter")
    assert str(weights) in message and "lm_head.lora_A.weight" in message


def test_adapter_on_a_mixture_or_twice_is_refused(tmp_path):
    with pytest.raises(BamError, match="config field adapter='lora'"):
        BamConfig(**SHAPE, n_ffn_experts=2, adapter="lora", adapter_targets=["q_proj"], lora_rank=2, lora_alpha=2)
    with pytest.raises(BamError, match="gate_proj and up_proj together"):
        BamConfig(**SHAPE, adapter="lora", adapter_targets=["gate_proj"], lora_rank=2, lora_alpha=2)
    make_seed(tmp_path / "seed")
    make_peft_adapter(tmp_path / "seed", tmp_path / "adapter", "ia3")
    with pytest.raises(BamError, match=r"already has an adapter \(ia3\)"):
        load_model(tmp_path / "adapter", adapter={"adapter": "lora", "adapter_targets": ["q_proj"], "lora_rank": 2,
                                                  "lora_alpha": 2})


# ---------------------------------------------------------------------------------------------
# Other families: their module names, both ways (Cohere's interleaved RoPE rows reordered in q/k)

ADAPTED_FAMILIES = ["qwen3", "olmo2", "cohere", "cohere2", "gemma2", "gemma3_text", "mistral-sliding"]


@pytest.mark.parametrize("family", ADAPTED_FAMILIES)
def test_adapters_of_other_families_read_and_written(family, tmp_path):
    from test_hf_import import FAMILIES, make_hf_model

    model_cls = FAMILIES[family][1]
    seed = tmp_path / "seed"
    reference = make_hf_model(family, seed)
    ids = input_ids(SHAPE["vocab_size"])
    with torch.no_grad():
        seed_logits = reference(ids).logits
    for kind in ("lora", "ia3-qv"):
        made = tmp_path / f"peft-{kind}"
        make_peft_adapter(seed, made, kind, model_cls)
        expected = peft_logits(seed, made, ids, model_cls)
        ours = load_model(made)
        assert rel_diff(bam_logits(ours, ids), expected) <= 1e-4
        assert rel_diff(seed_logits, expected) > 1e-2
        written = tmp_path / f"bam-{kind}"  # and back: what bam writes of the same adapter, in PEFT
        save_adapter(ours, written, open_model(seed), model_fingerprint(seed))
        assert rel_diff(peft_logits(seed, written, ids, model_cls), expected) <= 1e-4


def test_fused_families_are_refused(tmp_path):
    from test_hf_import import make_hf_model

    make_hf_model("phi3", tmp_path / "seed")
    with pytest.raises(BamError, match="adapters on phi3 models are not supported") as err:
        adapter_family(open_model(tmp_path / "seed"))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("extra, expected", [
    (["--train-only", "experts"], "train_only='experts': expected 'adapter' (or unset)"),
    (["--targets", "gate_proj,q_proj"], "adapter_targets=['q_proj', 'gate_proj']: expected gate_proj and up_proj "
                                        "together"),
    (["--targets", "q_proj,lm_head"], "adapter_targets=['q_proj', 'lm_head']: expected distinct names among"),
])
def test_bad_adapter_settings_are_refused_before_training(extra, expected, tmp_path, capsys):
    make_seed(tmp_path / "seed")
    capsys.readouterr()  # (transformers' progress bar while saving the seed)
    args = ["train", str(tmp_path / "seed"), "--adapter", "lora", "--out", str(tmp_path / "run"),
            "--data", f"x={tmp_path / 'none.txt'}", *extra]
    assert main(args) == 2
    message = capsys.readouterr().err.strip()
    assert expected in message and "\n" not in message
    assert not (tmp_path / "run").exists()


def test_mixing_a_model_with_an_adapter_is_refused(tmp_path):
    from bam.mix.mixing import check_sources

    make_seed(tmp_path / "seed")
    make_peft_adapter(tmp_path / "seed", tmp_path / "adapter", "lora")
    with pytest.raises(BamError, match=r"has an adapter \(config field adapter='lora'\); mix takes dense models"):
        check_sources([open_model(tmp_path / "adapter")])


@pytest.mark.parametrize("dist", ["ddp", "fsdp"])
def test_adapter_training_under_torchrun(dist, assets, tmp_path):
    """Two processes train the same adapter as one (the base frozen on every rank), up to summation order."""
    from _train_assets import VOCAB, torchrun

    seed = tmp_path / "seed"
    make_seed(seed, vocab_size=VOCAB)
    single, parallel = tmp_path / "single", tmp_path / dist
    assert main(train_args(assets, seed, single, "lora", **{"--max-steps": 3})) == 0
    proc = torchrun(2, *train_args(assets, seed, parallel, "lora", **{"--max-steps": 3, "--dist": dist}))
    assert proc.returncode == 0, proc.stderr[-2000:]
    ids = input_ids(VOCAB)
    expected = peft_logits(seed, parallel / "model", ids)
    assert rel_diff(bam_logits(load_model(parallel / "model"), ids), expected) <= 1e-4
    assert rel_diff(bam_logits(load_model(single / "model"), ids), expected) <= 1e-4
