"""Nexus (METHOD.md 3.3) against hand computations: the router, the shared expert, mixing, adding an
expert, the domain embeddings, and what training may and may not change."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _train_assets import build_assets
from safetensors.torch import load_file
from torch.utils.flop_counter import FlopCounterMode

from bam.modeling import cost
from bam.formats.model_dir import load_model, open_model, save_model
from bam.cli import main
from bam.errors import BamError
from bam.mix.add_expert import add_expert
from bam.mix.mixing import mix
from bam.mix.rules import new_router
from bam.modeling.moe import MoEFFN
from bam.mix.nexus import (
    DomainEmbeddings,
    domain_embedding,
    rms_normalize,
    sentence_model_embedding,
)

TOKENS = torch.randint(0, 128, (2, 13), generator=torch.Generator().manual_seed(7))
NEXUS = dict(ffn_router="nexus", ffn_shared_expert=True, nexus_embed_dim=8, nexus_hidden_dim=16)


def swiglu(h, gate_up, down):
    gate, up = (h @ gate_up.T).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ down.T


def randomize(module, seed: int = 0, std: float = 0.3):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * std)
    return module


def tensors_of(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


# ---------------------------------------------------------------------------------------------
# The router and the FFN


def test_router_scores_are_a_softmax_over_projected_domain_embeddings(tiny_config):
    ffn = randomize(MoEFFN(tiny_config(n_ffn_experts=3, **NEXUS)))
    router = ffn.router
    h_TD = torch.randn(10, 64, generator=torch.Generator().manual_seed(1))
    routing = router(h_TD)
    assert routing.logits_TE.shape == routing.probs_TE.shape == (10, 3)
    assert routing.expert_index_TK.shape == routing.gate_TK.shape == (10, 1)
    assert routing.probs_TE.dtype == torch.float32
    torch.testing.assert_close(routing.probs_TE.sum(-1), torch.ones(10))
    # By hand, one expert at a time: e_i = W2 SwiGLU(W1 d_i), logit = h . e_i.
    for i in range(3):
        e_D = swiglu(router.domain_embeddings[i], router.gate_up_proj, router.down_proj)
        torch.testing.assert_close(routing.logits_TE[:, i], h_TD @ e_D, atol=1e-5, rtol=1e-5)
    assert len(set(routing.expert_index_TK.flatten().tolist())) > 1  # the scores really discriminate


@pytest.mark.parametrize("dispatch", ["loop", "grouped"])
def test_one_routed_expert_is_shared_plus_that_expert(dispatch, tiny_config):
    """softmax over one score is exactly 1: y = FFN_shared(h) + FFN_1(h)."""
    ffn = randomize(MoEFFN(tiny_config(n_ffn_experts=1, expert_dispatch=dispatch, **NEXUS)))
    h = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(2))
    out = ffn(h)
    expected = (swiglu(h, ffn.experts.gate_up_proj[0], ffn.experts.down_proj[0])
                + swiglu(h, ffn.shared_expert.gate_up_proj, ffn.shared_expert.down_proj))
    assert torch.equal(out.routing.gate_TK, torch.ones(10, 1))
    if dispatch == "loop":
        assert torch.equal(out.y_BTD, expected)
    torch.testing.assert_close(out.y_BTD, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("top_k, renormalize", [(1, False), (2, True)])
def test_nexus_ffn_equals_hand_computation(top_k, renormalize, tiny_config):
    """y_t = FFN_shared(h_t) + sum over the top-k experts of gate * FFN_i(h_t); gate = p_i (or renormalized)."""
    ffn = randomize(MoEFFN(tiny_config(n_ffn_experts=3, ffn_top_k=top_k, ffn_renormalize=renormalize, **NEXUS)))
    r, experts, shared = ffn.router, ffn.experts, ffn.shared_expert
    h = torch.randn(7, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        actual = ffn(h[None]).y_BTD[0]
        e_ED = torch.stack([swiglu(d, r.gate_up_proj, r.down_proj) for d in r.domain_embeddings])
        probs = (h @ e_ED.T).softmax(-1)
        expected = torch.zeros_like(h)
        for t in range(7):
            top = probs[t].topk(top_k)
            gates = top.values / top.values.sum() if renormalize else top.values
            expected[t] = swiglu(h[t], shared.gate_up_proj, shared.down_proj)
            for gate, i in zip(gates, top.indices):
                expected[t] += gate * swiglu(h[t], experts.gate_up_proj[i], experts.down_proj[i])
    assert probs.max(-1).values.min() < 0.95  # gates visibly below 1: the scaling is tested
    # fp32 sums in a different order; outputs here are O(10), so 1e-4 is float error, not a formula error.
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


def test_shared_expert_with_a_linear_router_adds_to_the_routed_output(tiny_config):
    with_shared = randomize(MoEFFN(tiny_config(n_ffn_experts=3, ffn_top_k=2, ffn_shared_expert=True)))
    without = MoEFFN(tiny_config(n_ffn_experts=3, ffn_top_k=2))
    without.load_state_dict({k: v for k, v in with_shared.state_dict().items() if "shared_expert" not in k})
    h = torch.randn(1, 6, 64, generator=torch.Generator().manual_seed(4))
    shared = swiglu(h, with_shared.shared_expert.gate_up_proj, with_shared.shared_expert.down_proj)
    torch.testing.assert_close(with_shared(h).y_BTD, without(h).y_BTD + shared, atol=1e-6, rtol=1e-6)
    assert with_shared.shared_expert.gate_up_proj.shape == (256, 64)  # [2*d_ff, d]
    assert with_shared.shared_expert.down_proj.shape == (64, 128)


def test_gradient_reaches_the_projection_but_never_the_domain_embeddings(tiny_config, random_model):
    """What `bam train` does: unfreeze everything (--train-only all), AdamW with weight decay."""
    from bam.train.optim import param_groups, set_trainable

    model = random_model(tiny_config(n_ffn_experts=3, **NEXUS)).train()
    router = model.model.layers[0].ffn.router
    assert not router.domain_embeddings.requires_grad  # created frozen
    set_trainable(model, "all")  # ... which makes it require grad again
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-2)
    model(TOKENS, labels=TOKENS).loss.backward()
    assert router.domain_embeddings.grad is None
    assert router.gate_up_proj.grad.abs().sum() > 0 and router.down_proj.grad.abs().sum() > 0
    optimizer.step()
    for name, param in model.named_parameters():
        changed = not torch.equal(param, before[name])
        assert changed == (not name.endswith("domain_embeddings")), name


def test_model_with_nexus_and_attention_experts_generates_with_cache_equal_without(tiny_config, random_model):
    model = random_model(tiny_config(n_ffn_experts=3, n_attn_experts=4, kv_shared=True, **NEXUS))
    prompt = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(0))
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert model.generate(prompt, use_cache=True, **kwargs).tolist() == model.generate(prompt, use_cache=False,
                                                                                        **kwargs).tolist()


@pytest.mark.parametrize("fields, field", [
    (dict(ffn_router="nexus"), "nexus_embed_dim"),
    (dict(ffn_router="nexus", nexus_embed_dim=8), "nexus_hidden_dim"),
    (dict(ffn_router="nexus", nexus_embed_dim=8, nexus_hidden_dim=0), "nexus_hidden_dim"),
    (dict(ffn_router="nexus", nexus_embed_dim=True, nexus_hidden_dim=4), "nexus_embed_dim"),
    (dict(nexus_embed_dim=8), "nexus_embed_dim"),  # only meaningful with the nexus router
    (dict(ffn_router="softmax"), "ffn_router"),
    (dict(ffn_shared_expert="yes"), "ffn_shared_expert"),
    (dict(n_ffn_experts=2, ffn_expert_domains=["code"]), "ffn_expert_domains"),
    (dict(n_ffn_experts=2, ffn_expert_domains=["code", "code"]), "ffn_expert_domains"),
    (dict(nexus_embedding_source="hidden-mean"), "nexus_embedding_source"),
])
def test_config_validation_names_the_field(fields, field, tiny_config):
    with pytest.raises(BamError, match=f"config field {field}="):
        tiny_config(**fields)


@pytest.mark.parametrize("fields", [dict(n_ffn_experts=3, **NEXUS), dict(n_ffn_experts=1, **NEXUS),
                                    dict(n_ffn_experts=2, ffn_shared_expert=True),
                                    dict(n_attn_experts=3, n_ffn_experts=2, ffn_top_k=2, **NEXUS)])
def test_cost_counts_match_the_model(fields, tiny_config, random_model):
    config = tiny_config(**fields, expert_dispatch="loop")
    model = random_model(config)
    assert cost.params_total(config) == sum(p.numel() for p in model.parameters())
    routed_off = (config.n_ffn_experts - config.ffn_top_k) * 3 * 64 * 128 * config.num_hidden_layers
    assert cost.params_active(config) == cost.params_total(config) - routed_off
    tokens = 11
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randint(0, 128, (1, tokens)), use_cache=False)
    counts = counter.get_flop_counts()["Global"]
    matmul_flops = sum(counts.get(op, 0) for op in (torch.ops.aten.mm, torch.ops.aten.addmm))
    # Per token, plus the Nexus projection once per forward pass and layer.
    expected = tokens * cost.flops_per_token(config, n_ctx=0) + 2 * cost.nexus_projection_flops(config)
    assert matmul_flops == expected


# ---------------------------------------------------------------------------------------------
# bam mix --method nexus


def embeddings_for(names, dim=64, seed=0) -> DomainEmbeddings:
    generator = torch.Generator().manual_seed(seed)
    return DomainEmbeddings({n: torch.randn(dim, generator=generator) for n in names},
                            {"method": "hidden-mean", "model": "/nowhere"})


@pytest.fixture
def models(tiny_config, random_model, tmp_path):
    """A seed and three different dense experts (with q/k/v biases, so every tensor kind appears)."""
    config = tiny_config(qkv_bias=True)
    paths = {}
    for seed, name in enumerate(["seed", "code", "math", "law"]):
        paths[name] = tmp_path / name
        save_model(random_model(config, seed), paths[name])
    return paths


def mean_of(dense: list[dict], name: str) -> torch.Tensor:
    return sum(d[name] for d in dense) / len(dense)


def test_nexus_mix_shared_expert_is_the_seed_and_the_rest_is_averaged(models, tmp_path):
    embeddings = embeddings_for(["math", "code", "law"])
    embeddings.save(tmp_path / "emb.safetensors")
    assert main(["mix", "--method", "nexus", "--out", str(tmp_path / "nx"), "--domain-embeddings",
                 str(tmp_path / "emb.safetensors"), "--domains", "code,math", "--nexus-hidden-dim", "24",
                 "--router-init-std", "0.05", str(models["seed"]), str(models["code"]), str(models["math"])]) == 0
    mixed = tensors_of(tmp_path / "nx")
    dense = [tensors_of(models[n]) for n in ("seed", "code", "math")]
    config = open_model(tmp_path / "nx").config
    assert (config.ffn_router, config.ffn_shared_expert, config.n_ffn_experts, config.n_attn_experts) == \
           ("nexus", True, 2, 1)
    assert config.ffn_expert_domains == ["code", "math"] and config.nexus_hidden_dim == 24
    assert config.router_aux_loss_coef == 0.05  # the Nexus paper's load-balancing coefficient
    assert config.nexus_embedding_source == {"method": "hidden-mean", "model": "/nowhere"}
    projections = []
    for i in range(2):
        layer = f"model.layers.{i}.ffn."
        for leaf in ("gate_up_proj", "down_proj"):
            assert torch.equal(mixed[layer + f"shared_expert.{leaf}"], dense[0][layer + f"experts.{leaf}"][0])
            assert torch.equal(mixed[layer + f"experts.{leaf}"],
                               torch.cat([dense[1][layer + f"experts.{leaf}"], dense[2][layer + f"experts.{leaf}"]]))
        assert torch.equal(mixed[layer + "router.domain_embeddings"],
                           torch.stack([embeddings.vectors["code"], embeddings.vectors["math"]]))
        assert mixed[layer + "router.gate_up_proj"].shape == (48, 64)
        assert mixed[layer + "router.down_proj"].shape == (64, 24)
        projections += [mixed[layer + "router.gate_up_proj"].flatten(), mixed[layer + "router.down_proj"].flatten()]
    values = torch.cat(projections)
    assert abs(values.std().item() - 0.05) < 0.005
    averaged = [n for n in dense[0] if ".ffn." not in n]
    assert any(".attn.q_proj.bias" in n for n in averaged) and "lm_head.weight" in averaged
    for name in averaged:
        torch.testing.assert_close(mixed[name], mean_of(dense, name), atol=1e-6, rtol=1e-6)
    provenance = json.loads((tmp_path / "nx" / "mix.json").read_text())
    assert provenance["domains"] == ["code", "math"] and provenance["shared_expert_from"].endswith("seed")


def test_nexus_mix_of_identical_models_keeps_the_seed_ffn_shared(models, tmp_path):
    seed = models["seed"]
    mix([open_model(seed)] * 3, "nexus", tmp_path / "nx", domain_embeddings=embeddings_for(["a", "b"]))
    mixed, dense = tensors_of(tmp_path / "nx"), tensors_of(seed)
    for name, tensor in dense.items():
        if ".ffn.experts." in name:
            assert torch.equal(mixed[name.replace("experts", "shared_expert")], tensor[0])
            assert torch.equal(mixed[name], tensor.repeat(2, 1, 1))
        else:
            torch.testing.assert_close(mixed[name], tensor, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("method", ["nexus-bam", "nexus-bam-shared"])
def test_nexus_with_attention_experts_has_one_per_model(method, models, tmp_path):
    dirs = [models[n] for n in ("seed", "code", "math")]
    mix([open_model(d) for d in dirs], method, tmp_path / "nx", domain_embeddings=embeddings_for(["code", "math"]))
    config = open_model(tmp_path / "nx").config
    assert config.n_attn_experts == 3 and config.n_ffn_experts == 2 and config.kv_shared == method.endswith("shared")
    mixed, dense = tensors_of(tmp_path / "nx"), [tensors_of(d) for d in dirs]
    q = "model.layers.1.attn.q_proj.weight"
    k = "model.layers.1.attn.k_proj.weight"
    assert torch.equal(mixed[q], torch.cat([d[q] for d in dense]))
    if config.kv_shared:
        torch.testing.assert_close(mixed[k], mean_of(dense, k), atol=1e-6, rtol=1e-6)
    else:
        assert torch.equal(mixed[k], torch.cat([d[k] for d in dense]))
    assert mixed["model.layers.1.attn.router.weight"].shape == (3, 64)
    assert cost.layout(config) == method


def test_nexus_mix_bad_inputs_are_one_line_errors(models, tmp_path, capsys):
    embeddings_for(["code", "math"]).save(tmp_path / "emb.json")
    seed, code = str(models["seed"]), str(models["code"])
    out = str(tmp_path / "out")
    cases = [
        (["--method", "nexus", seed, code], "--domain-embeddings"),
        (["--method", "nexus", "--domain-embeddings", str(tmp_path / "emb.json"), seed, code], "2 domains"),
        (["--method", "nexus", "--domain-embeddings", str(tmp_path / "emb.json"), seed], "seed model directory first"),
        (["--method", "nexus", "--domain-embeddings", str(tmp_path / "emb.json"), "--domains", "law", seed, code],
         "no vector for 'law'"),
        (["--method", "nexus", "--domain-embeddings", str(tmp_path / "emb.json"), "--domains", "code",
          "--router-init-std", "0", seed, code], "positive std"),
        (["--method", "btx", "--domain-embeddings", str(tmp_path / "emb.json"), seed, code], "nexus methods"),
    ]
    for args, needle in cases:
        assert main(["mix", "--out", out, *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err, (needle, err)
        assert not Path(out).exists()


# ---------------------------------------------------------------------------------------------
# Adding an expert


def expected_addition(old: dict, attention_experts: bool, kv_shared: bool) -> dict[str, str]:
    """Per old tensor name: 'kept', 'appended' (old slice kept, new model's slice appended) or 'merged'."""
    kinds = {}
    for name in old:
        shared_kv = kv_shared and (".k_proj." in name or ".v_proj." in name)
        per_expert_attention = attention_experts and ".attn." in name and not shared_kv
        if name.endswith(("router.gate_up_proj", "router.down_proj")) or ".shared_expert." in name:
            kinds[name] = "kept"
        elif (".ffn.experts." in name or name.endswith(("router.domain_embeddings", "router.weight"))
              or per_expert_attention):
            kinds[name] = "appended"
        else:
            kinds[name] = "merged"
    return kinds


@pytest.mark.parametrize("method", ["nexus", "nexus-bam", "nexus-bam-shared", "bam", "btx"])
def test_adding_an_expert_keeps_appends_and_merges_exactly(method, models, tmp_path):
    nexus = method.startswith("nexus")
    dirs = [models[n] for n in (("seed", "code", "math") if nexus else ("code", "math"))]
    mix([open_model(d) for d in dirs], method, tmp_path / "moe",
        domain_embeddings=embeddings_for(["code", "math"]) if nexus else None)
    embedding = torch.randn(64, generator=torch.Generator().manual_seed(9)) if nexus else None
    add_expert(tmp_path / "moe", models["law"], "law", embedding, tmp_path / "added", seed=3)

    old_config, config = open_model(tmp_path / "moe").config, open_model(tmp_path / "added").config
    assert config.n_ffn_experts == old_config.n_ffn_experts + 1 == 3
    assert config.n_attn_experts == (old_config.n_attn_experts + 1 if old_config.n_attn_experts > 1 else 1)
    if nexus:
        assert config.ffn_expert_domains == ["code", "math", "law"]
    old, added, new = tensors_of(tmp_path / "moe"), tensors_of(tmp_path / "added"), tensors_of(models["law"])
    assert added.keys() == old.keys()
    lam = 1 / 3  # 1/(n+1), n = 2 routed experts before adding
    kinds = expected_addition(old, old_config.n_attn_experts > 1, old_config.kv_shared)
    for name, kind in kinds.items():
        if kind == "kept":
            assert torch.equal(added[name], old[name]), name
        elif kind == "merged":
            torch.testing.assert_close(added[name], (1 - lam) * old[name] + lam * new[name], atol=1e-6, rtol=1e-6)
            assert not torch.equal(added[name], old[name]), name
        else:
            dim = 1 if name.endswith("o_proj.weight") else 0
            width = old[name].shape[dim]
            assert torch.equal(added[name].narrow(dim, 0, width), old[name]), name
            appended = added[name].narrow(dim, width, added[name].shape[dim] - width)
            if name.endswith("router.domain_embeddings"):
                assert torch.equal(appended[0], embedding)
            elif name.endswith("router.weight"):
                assert appended.shape == (1, 64) and appended.abs().max() < 0.2  # small random row
                assert torch.equal(appended, new_router(f"{name}/added/law", (1, 64), 0.02, 3))
            else:
                assert torch.equal(appended, new[name]), name  # the new model's FFN / attention, as it is
    assert sum(kind == "merged" for kind in kinds.values()) >= 5  # embeddings, norms, LM head at least


@pytest.mark.parametrize("method", ["btx", "nexus"])
def test_reset_router_puts_a_new_linear_router_in_its_place(method, models, tmp_path):
    """The baseline: the same addition, but the FFN router (linear or Nexus) redrawn as a linear one."""
    nexus = method == "nexus"
    dirs = [models[n] for n in (("seed", "code", "math") if nexus else ("code", "math"))]
    mix([open_model(d) for d in dirs], method, tmp_path / "moe",
        domain_embeddings=embeddings_for(["code", "math"]) if nexus else None)
    add_expert(tmp_path / "moe", models["law"], "law", None, tmp_path / "reset", reset_router=True, seed=5,
               router_init_std=0.1)
    config = open_model(tmp_path / "reset").config
    assert config.ffn_router == "linear" and config.n_ffn_experts == 3 and config.ffn_shared_expert == nexus
    assert config.nexus_embed_dim is None and config.nexus_embedding_source is None
    reset = tensors_of(tmp_path / "reset")
    assert not [n for n in reset if ".ffn.router." in n and not n.endswith("router.weight")]
    for i in range(2):
        name = f"model.layers.{i}.ffn.router.weight"
        assert torch.equal(reset[name], new_router(name, (3, 64), 0.1, 5))
    # Everything else is the ordinary addition.
    add_expert(tmp_path / "moe", models["law"], "law", torch.randn(64) if nexus else None, tmp_path / "kept")
    kept = tensors_of(tmp_path / "kept")
    for name, tensor in reset.items():
        if ".ffn.router." not in name:
            assert torch.equal(tensor, kept[name]), name
    if nexus:  # a reset router takes no embedding
        with pytest.raises(BamError, match="no domain embeddings"):
            add_expert(tmp_path / "moe", models["law"], "law", torch.randn(64), tmp_path / "x", reset_router=True)


def test_added_model_saves_loads_and_generates(models, tmp_path):
    from transformers import AutoModelForCausalLM

    import bam  # noqa: F401  (registers the Auto classes)

    mix([open_model(models[n]) for n in ("seed", "code", "math")], "nexus-bam-shared", tmp_path / "moe",
        domain_embeddings=embeddings_for(["code", "math"]))
    add_expert(tmp_path / "moe", models["law"], "law", torch.randn(64), tmp_path / "added")
    ours = load_model(tmp_path / "added")
    auto = AutoModelForCausalLM.from_pretrained(tmp_path / "added").eval()
    assert type(auto).__name__ == "BamForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(auto(TOKENS).logits, ours(TOKENS).logits, atol=0, rtol=0)
        routing = ours(TOKENS, output_routing=True).routing
    assert routing[0].ffn_probs.shape == (26, 3)
    save_model(ours, tmp_path / "resaved")
    assert all(torch.equal(a, b) for a, b in zip(tensors_of(tmp_path / "resaved").values(),
                                                 tensors_of(tmp_path / "added").values()))
    prompt = TOKENS[:, :4]
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert auto.generate(prompt, use_cache=True, **kwargs).tolist() == auto.generate(prompt, use_cache=False,
                                                                                      **kwargs).tolist()


def inspect_json(path, capsys) -> dict:
    capsys.readouterr()
    assert main(["inspect", str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_add_expert_cli_grows_inspect_expert_count_by_one(models, tmp_path, capsys):
    embeddings_for(["code", "math", "law"]).save(tmp_path / "emb.json")
    assert main(["mix", "--method", "nexus", "--out", str(tmp_path / "moe"), "--domain-embeddings",
                 str(tmp_path / "emb.json"), "--domains", "code,math", str(models["seed"]), str(models["code"]),
                 str(models["math"])]) == 0
    before = inspect_json(tmp_path / "moe", capsys)
    assert main(["add-expert", str(tmp_path / "moe"), str(models["law"]), "--domain", "law",
                 "--embedding", str(tmp_path / "emb.json"), "--out", str(tmp_path / "added")]) == 0
    after = inspect_json(tmp_path / "added", capsys)
    assert after["config"]["n_ffn_experts"] == before["config"]["n_ffn_experts"] + 1 == 3
    assert after["config"]["ffn_expert_domains"] == ["code", "math", "law"]
    assert after["params_total"] - before["params_total"] == 2 * (3 * 64 * 128 + 64)  # FFN + embedding row
    assert after["params_active"] == before["params_active"] + 2 * 64  # top-1 either way
    row = tensors_of(tmp_path / "added")["model.layers.1.ffn.router.domain_embeddings"][2]
    assert torch.equal(row, DomainEmbeddings.load(tmp_path / "emb.json").vectors["law"])


def test_add_expert_bad_inputs_are_one_line_errors(models, tmp_path, capsys):
    embeddings_for(["code", "math", "law"], dim=32).save(tmp_path / "short.json")
    embeddings_for(["code", "math", "law"]).save(tmp_path / "emb.json")
    assert main(["mix", "--method", "nexus", "--out", str(tmp_path / "moe"), "--domain-embeddings",
                 str(tmp_path / "emb.json"), "--domains", "code,math", str(models["seed"]), str(models["code"]),
                 str(models["math"])]) == 0
    moe, law, out = str(tmp_path / "moe"), str(models["law"]), str(tmp_path / "out")
    emb = ["--embedding", str(tmp_path / "emb.json")]
    cases = [
        ([moe, law, "--domain", "code", *emb], "already has an expert"),
        ([moe, law, "--domain", "law", "--embedding", str(tmp_path / "short.json")], "(32,)"),
        ([moe, moe, "--domain", "law", *emb], "must be a dense model"),
        ([law, law, "--domain", "law", *emb], "a dense model; add-expert"),
        ([moe, law, "--domain", "law", "--merge-weight", "1.5", *emb], "--merge-weight"),
        ([moe, law, "--domain", "law", "--finetune-steps", "2", "--data", "law=/x"], "at least one old domain"),
    ]
    for args, needle in cases:
        assert main(["add-expert", *args, "--out", out]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err, (needle, err)
        assert not Path(out).exists()


# ---------------------------------------------------------------------------------------------
# Domain embeddings on real text (the standard library: code and prose), and the finetune


@pytest.fixture(scope="module")
def assets():
    return build_assets()


def test_hidden_mean_embedding_equals_a_hand_built_forward(assets):
    from bam.data.shards import prepare_domain

    model = load_model(assets.seed)
    domain = prepare_domain(f"code={assets.code}", assets.tokenizer, assets.cache)
    n = 40  # one window: the inputs are EOS then the first n - 1 train tokens
    ids = torch.tensor([[domain.eos_id, *domain.tokens("train")[: n - 1].tolist()]])
    with torch.no_grad():
        expected = model(ids, use_cache=False).last_hidden_state[0].mean(0)
    actual = domain_embedding(model, domain, max_tokens=n, seq_len=64)
    torch.testing.assert_close(actual, rms_normalize(expected), atol=1e-5, rtol=1e-5)
    assert actual.square().mean().item() == pytest.approx(1.0, abs=1e-5)


def test_sentence_model_embedding_is_the_mean_of_mean_pooled_documents(assets, tmp_path):
    from transformers import BertConfig, BertModel

    encoder = tmp_path / "encoder"
    config = BertConfig(vocab_size=600, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(encoder)
    for path in Path(assets.tokenizer).iterdir():
        shutil.copy2(path, encoder / path.name)
    docs = ["def f(x):\n    return x + 1\n", "The licence grants permission.", "a b"]
    actual = sentence_model_embedding(encoder, docs, max_tokens=10_000, seq_len=64, batch_size=2)

    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(encoder)
    model = BertModel.from_pretrained(encoder).eval()
    with torch.no_grad():  # one document at a time: no padding to get wrong
        per_doc = [model(**tokenizer(d, return_tensors="pt")).last_hidden_state[0].mean(0) for d in docs]
    torch.testing.assert_close(actual, rms_normalize(torch.stack(per_doc).mean(0)), atol=1e-5, rtol=1e-5)


def test_embed_mix_add_and_finetune_end_to_end(assets, tmp_path, capsys):
    """embed-domains -> nexus mix -> add-expert embeds the new domain like the others -> finetune."""
    data = ["--data", *assets.data("code", "prose"), "--cache-dir", str(assets.cache)]
    emb = tmp_path / "emb.json"
    assert main(["embed-domains", str(assets.seed), *data, "--out", str(emb), "--max-tokens", "3000"]) == 0
    assert "2 domains (code, prose)" in capsys.readouterr().out
    expert = tmp_path / "code-expert"
    shutil.copytree(assets.seed, expert)  # a stand-in expert: any dense model of the same shape
    assert main(["mix", "--method", "nexus", "--out", str(tmp_path / "moe"), "--domain-embeddings", str(emb),
                 "--domains", "code", str(assets.seed), str(expert)]) == 0

    out = tmp_path / "added"
    assert main(["add-expert", str(tmp_path / "moe"), str(assets.seed), "--domain", "prose", *data,
                 "--out", str(out), "--finetune-steps", "2", "--batch-size", "4", "--seq-len", "32",
                 "--lr", "1e-2", "--no-progress"]) == 0
    file_vectors = DomainEmbeddings.load(emb).vectors
    before = tensors_of(tmp_path / "added.finetune" / "added")  # the model before finetuning
    after = tensors_of(out)
    for i in range(2):
        name = f"model.layers.{i}.ffn.router.domain_embeddings"
        # Recomputed by add-expert with the recorded method: equal to embed-domains' vector.
        torch.testing.assert_close(before[name][1], file_vectors["prose"], atol=1e-5, rtol=1e-5)
        assert torch.equal(after[name], before[name])  # bam train never changes them
        assert not torch.equal(after[f"model.layers.{i}.ffn.router.gate_up_proj"],
                               before[f"model.layers.{i}.ffn.router.gate_up_proj"])  # the projection trains
    provenance = json.loads((out / "mix.json").read_text())
    assert provenance["added_experts"][-1]["finetune"]["weights"] == {"prose": 0.5, "code": 0.5}
    assert open_model(out).config.n_ffn_experts == 2
