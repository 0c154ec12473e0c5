"""Adapter experts (issue 17 item 2): `bam mix --base SEED ADAPTER...` of LoRA and (IA)³ adapters.

Checked against independent references: PEFT's merge_and_unload of the seed and an adapter (an MoE of
one adapter repeated is that merged model), the adapter MoE's own materialized full-expert twin, the
tensors of the adapters themselves, and the parameter count of the module bam builds."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import peft
import pytest
import torch
import transformers
from _adapter_assets import ALL_LINEAR, SHAPE, input_ids, make_peft_adapter, make_seed, rel_diff
from safetensors.torch import load_file, save_file

from bam.cli import main
from bam.errors import BamError
from bam.formats.model_dir import load_model, open_model
from bam.formats.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, BASE_FILE
from bam.mix.adapter_mix import mix_adapters
from bam.modeling import cost

METHODS = ("btx", "bam", "bam-shared")
MIXINGS = ("outputs", "parameters")
KINDS = ("lora", "ia3")  # PEFT_CONFIGS: LoRA on every linear layer, (IA)³ on k, v and down_proj


def merged_logits(seed: Path, adapter: Path, ids: torch.Tensor) -> torch.Tensor:
    """PEFT's own merge of the adapter into the transformers seed: the reference function."""
    base = transformers.LlamaForCausalLM.from_pretrained(seed, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, adapter).merge_and_unload().eval()
    with torch.no_grad():
        return model(ids).logits


def logits(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return load_model(model_dir).eval()(ids).logits


@pytest.fixture(scope="module")
def seed_and_adapters(tmp_path_factory):
    """A seed, and per kind two PEFT-made adapters with different random tensors."""
    root = tmp_path_factory.mktemp("adapter_mix")
    make_seed(root / "seed")
    for kind in KINDS:
        for i in range(2):
            torch.manual_seed(10 + i)
            make_peft_adapter(root / "seed", root / f"{kind}{i}", kind, weights_seed=10 + i)
    return root


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", METHODS)
def test_moe_of_one_adapter_repeated_is_the_merged_seed(kind, method, seed_and_adapters, tmp_path):
    """METHOD.md 7: identical deltas give the seed with that delta merged, whatever the method and
    the attention mixing (renormalized top-2, so the FFN gates sum to 1)."""
    root = seed_and_adapters
    ids = input_ids(SHAPE["vocab_size"])
    reference = merged_logits(root / "seed", root / f"{kind}0", ids)
    seed_logits = logits(root / "seed", ids)
    assert rel_diff(seed_logits, reference) > 1e-2  # the adapter changes the function
    for mixing in MIXINGS:
        out = tmp_path / mixing
        mix_adapters(open_model(root / "seed"), [root / f"{kind}0"] * 3, method, out, base_expert=False,
                     attn_mixing=mixing, top_k=2, renormalize=True, router_init_std=0.5, progress=False)
        config = json.loads((out / "config.json").read_text())
        assert config["adapter_experts"] and config["n_ffn_experts"] == 3
        assert rel_diff(logits(out, ids), reference) < 1e-4, (method, mixing)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method, mixing", [("btx", "outputs"), ("bam", "outputs"), ("bam", "parameters"),
                                            ("bam-shared", "outputs"), ("bam-shared", "parameters")])
def test_materialize_equals_the_adapter_moe(kind, method, mixing, seed_and_adapters, tmp_path):
    """Two different adapters and the seed as the general expert: the full-expert MoE that
    --materialize writes computes what the low-rank one does, and holds N full copies."""
    root = seed_and_adapters
    adapters = [root / f"{kind}0", root / f"{kind}1"]
    ids = input_ids(SHAPE["vocab_size"])
    options = dict(attn_mixing=mixing, top_k=2, router_init_std=0.5, progress=False)
    mix_adapters(open_model(root / "seed"), adapters, method, tmp_path / "low", **options)
    mix_adapters(open_model(root / "seed"), adapters, method, tmp_path / "full", materialize=True, **options)
    low, full = open_model(tmp_path / "low").config, open_model(tmp_path / "full").config
    assert full.adapter is None and not full.adapter_experts and full.n_ffn_experts == low.n_ffn_experts == 3
    assert (full.n_attn_experts, full.kv_shared, full.attn_mixing) == (low.n_attn_experts, low.kv_shared, mixing)
    low_logits = logits(tmp_path / "low", ids)
    assert rel_diff(low_logits, logits(tmp_path / "full", ids)) < 1e-4
    assert rel_diff(low_logits, logits(root / "seed", ids)) > 1e-2  # the adapters matter
    assert cost.params_total(full) > cost.params_total(low)


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "olmo2", "gemma2", "mistral-sliding"])
def test_moe_of_one_adapter_repeated_is_the_merged_seed_in_other_families(family, tmp_path):
    """q/k/v biases (Qwen2: (IA)³ scales them too), q/k norms per head and over all heads (Qwen3,
    OLMo 2: the seed's, shared by adapter experts, under either mixing), Gemma 2's sandwich norms and
    soft-capping, a sliding window."""
    from test_hf_import import FAMILIES, make_hf_model

    model_cls = FAMILIES[family][1]
    make_hf_model(family, tmp_path / "seed")
    ids = input_ids(SHAPE["vocab_size"])
    for kind in ("lora", "ia3-qv"):
        adapter = tmp_path / kind
        make_peft_adapter(tmp_path / "seed", adapter, kind, model_cls)
        base = model_cls.from_pretrained(tmp_path / "seed", dtype=torch.float32)
        with torch.no_grad():
            reference = peft.PeftModel.from_pretrained(base, adapter).merge_and_unload().eval()(ids).logits
        for mixing in MIXINGS:
            out = tmp_path / f"{kind}-{mixing}"
            mix_adapters(open_model(tmp_path / "seed"), [adapter] * 2, "bam", out, base_expert=False,
                         attn_mixing=mixing, top_k=2, renormalize=True, router_init_std=0.5, progress=False)
            assert rel_diff(logits(out, ids), reference) < 1e-4, (kind, mixing)


@pytest.mark.parametrize("mixing", MIXINGS)
def test_greedy_generation_with_cache_equals_recomputing(mixing, seed_and_adapters, tmp_path):
    """The KV cache of adapter experts: one K/V set per expert (outputs) or one (parameters)."""
    root = seed_and_adapters
    mix_adapters(open_model(root / "seed"), [root / "lora0", root / "lora1"], "bam", tmp_path / "moe",
                 attn_mixing=mixing, router_init_std=0.5, progress=False)
    model = load_model(tmp_path / "moe").eval()
    prompt = input_ids(SHAPE["vocab_size"])[:1, :5]
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True)
        tokens = prompt
        for _ in range(8):  # no cache: the whole sequence each step
            tokens = torch.cat([tokens, model(tokens).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(cached, tokens)


def test_the_seed_expert_is_a_zero_adapter_and_each_expert_holds_its_adapter(seed_and_adapters, tmp_path):
    root = seed_and_adapters
    mix_adapters(open_model(root / "seed"), [root / "lora0", root / "lora1"], "bam", tmp_path / "moe", progress=False)
    tensors = load_file(str(tmp_path / "moe" / "model.safetensors"))
    seed = load_file(str(root / "seed" / "model.safetensors"))
    b = tensors["model.layers.0.attn.adapter.q_proj_lora_B"]
    assert b.shape[0] == 3 and not b[0].any() and b[1].any()  # the seed first, with B = 0
    peft_b = load_file(str(root / "lora1" / ADAPTER_WEIGHTS))
    assert torch.equal(b[2], peft_b["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"])
    assert torch.equal(tensors["model.layers.0.attn.q_proj.weight"], seed["model.layers.0.self_attn.q_proj.weight"])
    # ... held once: the stacked FFN holds one copy of the seed's weights
    assert tensors["model.layers.0.ffn.experts.down_proj"].shape[0] == 1


@pytest.mark.parametrize("method, targets, expected", [
    ("btx", None, dict(n_attn_experts=1, adapter_targets=["gate_proj", "up_proj", "down_proj"])),
    ("bam", None, dict(n_attn_experts=3, kv_shared=False, adapter_targets=None)),
    ("bam-shared", None, dict(n_attn_experts=3, kv_shared=True,
                              adapter_targets=["q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])),
])
def test_each_method_keeps_per_expert_what_its_full_mix_stacks(method, targets, expected, seed_and_adapters,
                                                              tmp_path):
    root = seed_and_adapters
    mix_adapters(open_model(root / "seed"), [root / "lora0", root / "lora1"], method, tmp_path / "moe", progress=False)
    config = open_model(tmp_path / "moe").config
    expected = {k: v for k, v in expected.items() if v is not None}
    assert {k: getattr(config, k) for k in expected} == expected


def test_parameter_counts_match_the_model_and_bam_inspect(seed_and_adapters, tmp_path, capsys):
    root = seed_and_adapters
    mix_adapters(open_model(root / "seed"), [root / "lora0", root / "lora1"], "bam", tmp_path / "moe", progress=False)
    model = load_model(tmp_path / "moe")
    assert main(["inspect", str(tmp_path / "moe"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["params_total"] == sum(p.numel() for p in model.parameters())
    seed_total = sum(p.numel() for p in load_model(root / "seed").parameters())
    adapters = sum(t.numel() for i in range(2) for t in load_file(str(root / f"lora{i}" / ADAPTER_WEIGHTS)).values())
    # the seed once, both adapters, the seed expert's zero adapter (one more of the same size) and the routers
    routers = sum(p.numel() for n, p in model.named_parameters() if ".router." in n)
    assert summary["params_total"] == seed_total + adapters * 3 // 2 + routers


def test_cli_mixes_adapters(seed_and_adapters, tmp_path, capsys):
    root = seed_and_adapters
    assert main(["mix", "--method", "bam", "--base", str(root / "seed"), str(root / "ia30"), str(root / "ia31"),
                 "--attn-mixing", "parameters", "--out", str(tmp_path / "moe")]) == 0
    assert "ia3 adapter experts" in capsys.readouterr().out
    assert open_model(tmp_path / "moe").config.attn_mixing == "parameters"


# ---------------------------------------------------------------------------------------------
# Refusals: one line naming the adapter and the field


def refusal(root: Path, adapters: list[Path], tmp_path: Path, method: str = "bam", base: Path | None = None,
            **options) -> str:
    with pytest.raises(BamError) as err:
        mix_adapters(open_model(base or root / "seed"), adapters, method, tmp_path / "out", progress=False, **options)
    assert not (tmp_path / "out").exists()
    message = str(err.value)
    assert "\n" not in message
    return message


def test_adapters_of_another_base_or_rank_or_kind_are_refused(seed_and_adapters, tmp_path):
    root = seed_and_adapters
    message = refusal(root, [root / "lora0", root / "ia30"], tmp_path)
    assert str(root / "ia30") in message and "adapter field adapter='ia3'" in message
    # another rank
    rank8 = tmp_path / "rank8"
    base = transformers.LlamaForCausalLM.from_pretrained(root / "seed", dtype=torch.float32)
    peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, target_modules=ALL_LINEAR)).save_pretrained(rank8)
    assert "lora_rank=8" in refusal(root, [root / "lora0", rank8], tmp_path)
    # another base with the same shapes: caught by the fingerprint bam records in bam_base.json
    make_seed(tmp_path / "other", seed=5)
    recorded = tmp_path / "recorded"
    recorded.mkdir()
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        (recorded / name).write_bytes((root / "lora0" / name).read_bytes())
    (recorded / BASE_FILE).write_text(json.dumps({"base": {"path": str(tmp_path / "other"), "family": "llama",
                                                           "fingerprint": "0" * 64}}))
    message = refusal(root, [recorded, root / "lora1"], tmp_path)
    assert str(recorded) in message and "base.fingerprint" in message
    # ... and the family
    (recorded / BASE_FILE).write_text(json.dumps({"base": {"family": "qwen2", "fingerprint": "0" * 64}}))
    assert "base.family='qwen2'" in refusal(root, [recorded], tmp_path)
    # a base of other shapes: the adapter's tensors do not fit
    make_seed(tmp_path / "wider", intermediate_size=128)
    assert "another base" in refusal(root, [root / "lora0"], tmp_path, base=tmp_path / "wider")


def test_bad_requests_are_refused(seed_and_adapters, tmp_path):
    root = seed_and_adapters
    assert "at least two" in refusal(root, [root / "lora0"], tmp_path, base_expert=False)
    assert "--method upcycle with --base" in refusal(root, [root / "lora0"], tmp_path, method="upcycle")
    qv = tmp_path / "qv"
    base = transformers.LlamaForCausalLM.from_pretrained(root / "seed", dtype=torch.float32)
    peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(qv)
    assert "btx needs adapters on the FFN" in refusal(root, [qv], tmp_path, method="btx")
    assert "not an adapter directory" in refusal(root, [root / "seed"], tmp_path)
    assert "expected a dense model without an adapter" in refusal(root, [root / "lora1"], tmp_path,
                                                                     base=root / "lora0")


def test_mixed_alpha_is_folded_into_b(seed_and_adapters, tmp_path):
    """Adapters with different lora_alpha share one scaling: each B is rescaled, updates unchanged."""
    root = seed_and_adapters
    halved = tmp_path / "halved"
    halved.mkdir()
    config = json.loads((root / "lora1" / ADAPTER_CONFIG).read_text())
    (halved / ADAPTER_CONFIG).write_text(json.dumps({**config, "lora_alpha": config["lora_alpha"] / 2}))
    tensors = load_file(str(root / "lora1" / ADAPTER_WEIGHTS))
    save_file({k: v * 2 if "lora_B" in k else v for k, v in tensors.items()}, str(halved / ADAPTER_WEIGHTS))
    ids = input_ids(SHAPE["vocab_size"])
    for adapters, out in (([root / "lora0", root / "lora1"], "same"), ([root / "lora0", halved], "folded")):
        mix_adapters(open_model(root / "seed"), adapters, "bam", tmp_path / out, top_k=2, router_init_std=0.5,
                     progress=False)
    assert rel_diff(logits(tmp_path / "folded", ids), logits(tmp_path / "same", ids)) < 1e-4


def test_materialized_btx_exports_to_mixtral_and_the_adapter_moe_says_how(seed_and_adapters, tmp_path, capsys):
    root = seed_and_adapters
    adapters = [root / "lora0", root / "lora1"]
    options = dict(top_k=2, renormalize=True, router_init_std=0.5, progress=False)
    mix_adapters(open_model(root / "seed"), adapters, "btx", tmp_path / "low", **options)
    mix_adapters(open_model(root / "seed"), adapters, "btx", tmp_path / "full", materialize=True, **options)
    assert main(["export", str(tmp_path / "low"), "--format", "mixtral", "--out", str(tmp_path / "x")]) == 2
    assert "`bam mix --materialize` writes them" in capsys.readouterr().err
    # (export checks the written Mixtral's logits against the model's before it keeps the output)
    assert main(["export", str(tmp_path / "full"), "--format", "mixtral", "--out", str(tmp_path / "mixtral")]) == 0
    assert json.loads((tmp_path / "mixtral" / "config.json").read_text())["model_type"] == "mixtral"


# ---------------------------------------------------------------------------------------------
# Training a mixture of adapter experts


def train_moe_args(assets, model: Path, out: Path, *extra: str) -> list[str]:
    return ["train", str(model), "--out", str(out), "--data", *assets.data("code", "prose"), "--no-progress",
            "--max-steps", "4", "--batch-size", "4", "--seq-len", "32", "--lr", "1e-2", "--warmup", "0",
            "--save-every", "2", "--keep", "5", "--eval-every", "0", "--cache-dir", str(assets.cache),
            "--tokenizer", str(assets.tokenizer), *extra]


@pytest.fixture(scope="module")
def adapter_moe(tmp_path_factory):
    """A bam mixture of two PEFT adapters and the seed, on the training assets' vocabulary."""
    from _train_assets import VOCAB, build_assets

    root = tmp_path_factory.mktemp("adapter_moe")
    make_seed(root / "seed", vocab_size=VOCAB)
    for i in range(2):
        make_peft_adapter(root / "seed", root / f"lora{i}", "lora", weights_seed=20 + i)
    mix_adapters(open_model(root / "seed"), [root / "lora0", root / "lora1"], "bam", root / "moe",
                 router_init_std=0.5, progress=False)
    return build_assets(), root / "moe"


def test_training_an_adapter_moe_updates_routers_adapters_and_shared_tensors_and_resumes(adapter_moe, tmp_path):
    assets, moe = adapter_moe
    out = tmp_path / "run"
    assert main(train_moe_args(assets, moe, out)) == 0
    before, after = load_file(str(moe / "model.safetensors")), load_file(str(out / "model" / "model.safetensors"))

    def changed(trained: dict) -> set[str]:
        return {name for name in before if not torch.equal(before[name], trained[name])}

    routed = {name for name in before if ".router." in name or ".adapter." in name}
    shared = {name for name in before if name.endswith(("embed_tokens.weight", "lm_head.weight")) or "norm" in name}
    assert shared and changed(after) == routed | shared  # the seed's projections stay frozen
    shutil.rmtree(out / "checkpoints" / "step_000004")
    shutil.rmtree(out / "model")
    assert main([*train_moe_args(assets, moe, out), "--resume"]) == 0
    resumed = load_file(str(out / "model" / "model.safetensors"))
    assert all(torch.equal(resumed[name], after[name]) for name in after)
    # MoLoRA's recipe, the whole seed frozen, and the seed's projections too, when asked
    assert main(train_moe_args(assets, moe, tmp_path / "molora", "--train-only", "routers,adapter", "--max-steps", "1")) == 0
    assert changed(load_file(str(tmp_path / "molora" / "model" / "model.safetensors"))) == routed
    assert main(train_moe_args(assets, moe, tmp_path / "all", "--train-only", "all", "--max-steps", "1")) == 0
    trained = load_file(str(tmp_path / "all" / "model" / "model.safetensors"))
    assert not torch.equal(trained["model.layers.0.attn.q_proj.weight"], before["model.layers.0.attn.q_proj.weight"])


def test_adapter_moe_training_under_fsdp_equals_ddp(adapter_moe, tmp_path):
    """FSDP2 shards the frozen seed and the trained adapters and routers, and trains what DDP does.
    (Not what one process does: the load-balancing loss is computed per micro-batch, so for any MoE
    two ranks of half a batch train differently from one process with the whole batch.)"""
    from _train_assets import torchrun

    assets, moe = adapter_moe
    for dist in ("ddp", "fsdp"):
        proc = torchrun(2, *train_moe_args(assets, moe, tmp_path / dist, "--max-steps", "3", "--dist", dist))
        assert proc.returncode == 0, proc.stderr[-2000:]
    ids = input_ids(SHAPE["vocab_size"])
    assert rel_diff(logits(tmp_path / "fsdp" / "model", ids), logits(tmp_path / "ddp" / "model", ids)) <= 1e-4
    assert rel_diff(logits(tmp_path / "fsdp" / "model", ids), logits(moe, ids)) > 1e-3  # it trained


def test_ia3_vector_stacks_do_not_decay_and_lora_matrices_do(seed_and_adapters, tmp_path):
    """Decay would pull an (IA)³ vector to 0, not to its identity 1: a stack of them is still vectors."""
    from bam.modeling.layout import parameters

    root = seed_and_adapters
    for kind in KINDS:
        mix_adapters(open_model(root / "seed"), [root / f"{kind}0", root / f"{kind}1"], "bam", tmp_path / kind,
                     progress=False)
        adapters = [p for p in parameters(open_model(tmp_path / kind).config) if p.role == "adapter"]
        assert adapters and all(p.decays == (kind == "lora") for p in adapters)
        assert all(len(p.shape) >= 2 for p in adapters)  # (the stacks are 2-D and more)
