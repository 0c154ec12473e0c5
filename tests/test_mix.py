"""Mixing against METHOD.md's invariants (section 4), its per-tensor table (section 3) and bad inputs."""

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from bam.formats.model_dir import load_model, open_model, save_model
from bam.cli import main
from bam.mix.mixing import mixed_config
from bam.mix.rules import METHODS, NEXUS_METHODS, new_router, tensor_rule
from bam.modeling.layout import parameter_shapes, parameters
from bam.mix.nexus import DomainEmbeddings

TOKENS = torch.randint(0, 128, (2, 13), generator=torch.Generator().manual_seed(7))


def save_dense(random_model, config, path: Path, seed: int = 0) -> Path:
    save_model(random_model(config, seed), path)
    return path


def run_mix(method: str, out: Path, *dirs: Path, options=()) -> int:
    return main(["mix", "--method", method, "--out", str(out), *options, *map(str, dirs)])


def logits_of(path: Path) -> torch.Tensor:
    with torch.no_grad():
        return load_model(path)(TOKENS, use_cache=False).logits


def tensors_of(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def mix_args(method: str, dense: Path, n: int) -> list[Path]:
    """Directories for n identical experts: the same one repeated, or one for upcycle."""
    return [dense] if method == "upcycle" else [dense] * n


def n_option(method: str, n: int) -> list[str]:
    return ["--num-experts", str(n)] if method == "upcycle" else []


# ---------------------------------------------------------------------------------------------
# METHOD.md 4: function preservation


@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
@pytest.mark.parametrize("block", ["parallel", "sequential"])
@pytest.mark.parametrize("method", ["btx", "bam", "bam-shared", "upcycle"])
def test_identical_experts_preserve_function(method, block, norm, tiny_config, random_model, tmp_path):
    """Top-2 of 3 with renormalized gates: averages, soft attention gates and FFN gates all sum to the dense model."""
    dense = save_dense(random_model, tiny_config(block=block, norm=norm), tmp_path / "dense")
    options = ["--top-k", "2", "--renormalize", "--router-init-std", "0.5", *n_option(method, 3)]
    assert run_mix(method, tmp_path / "moe", *mix_args(method, dense, 3), options=options) == 0

    config = open_model(tmp_path / "moe").config
    assert config.n_ffn_experts == 3 and config.ffn_top_k == 2 and config.ffn_renormalize
    assert config.n_attn_experts == (3 if method.startswith("bam") else 1)
    torch.testing.assert_close(logits_of(tmp_path / "moe"), logits_of(dense), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["btx", "bam", "bam-shared", "upcycle"])
def test_single_expert_reduces_to_dense(method, tiny_config, random_model, tmp_path):
    dense = save_dense(random_model, tiny_config(), tmp_path / "dense")
    assert run_mix(method, tmp_path / "one", dense, options=n_option(method, 1)) == 0
    assert open_model(tmp_path / "one").config.is_dense
    mixed, original = tensors_of(tmp_path / "one"), tensors_of(dense)
    assert mixed.keys() == original.keys()
    for name in original:
        torch.testing.assert_close(mixed[name], original[name], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(logits_of(tmp_path / "one"), logits_of(dense), atol=1e-6, rtol=0)


def test_kv_sharing_equals_kv_experts_for_identical_experts(tiny_config, random_model, tmp_path):
    dense = save_dense(random_model, tiny_config(), tmp_path / "dense")
    other = save_dense(random_model, tiny_config(), tmp_path / "other", seed=1)
    options = ["--router-init-std", "0.5"]  # default top-1 unnormalized: same routers in both, same scaling
    for method in ("bam", "bam-shared"):
        assert run_mix(method, tmp_path / method, dense, dense, options=options) == 0
        assert run_mix(method, tmp_path / f"{method}-mixed", dense, other, options=options) == 0
    torch.testing.assert_close(logits_of(tmp_path / "bam-shared"), logits_of(tmp_path / "bam"), atol=1e-5, rtol=0)
    # With different experts the shared K/V (an average) changes the function: the comparison has teeth.
    difference = logits_of(tmp_path / "bam-shared-mixed") - logits_of(tmp_path / "bam-mixed")
    assert difference.abs().max() > 1e-3


def test_unnormalized_top1_scales_the_expert_ffn_by_its_probability(tiny_config, random_model, tmp_path):
    """BAM's default gate: y = p_i * FFN_i(h) with i = argmax p, FFN_i the i-th dense model's FFN."""
    config = tiny_config()
    experts = [random_model(config, seed) for seed in (0, 1)]
    for j, model in enumerate(experts):
        save_model(model, tmp_path / f"e{j}")
    assert run_mix("btx", tmp_path / "btx", tmp_path / "e0", tmp_path / "e1", options=["--router-init-std", "0.1"]) == 0
    moe = load_model(tmp_path / "btx")

    h_TD = torch.randn(64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        actual_TD = moe.model.layers[1].ffn(h_TD[None]).y_BTD[0]
        router_ED = tensors_of(tmp_path / "btx")["model.layers.1.ffn.router.weight"]
        probs_TE = F.softmax(h_TD @ router_ED.T, dim=-1)
        dense_TED = torch.stack([m.model.layers[1].ffn(h_TD[None]).y_BTD[0] for m in experts], dim=1)
    chosen_T = probs_TE.argmax(dim=-1)
    expected_TD = probs_TE.gather(1, chosen_T[:, None]) * dense_TED[torch.arange(64), chosen_T]
    assert set(chosen_T.tolist()) == {0, 1}  # both experts are exercised
    assert probs_TE.max(dim=-1).values.min() < 0.9  # the gate really scales some tokens' outputs
    torch.testing.assert_close(actual_TD, expected_TD, atol=1e-6, rtol=1e-5)


def test_unnormalized_top1_does_not_preserve_function(tiny_config, random_model, tmp_path):
    """METHOD.md 4: preservation is promised only for renormalized or soft gates, not BAM's default."""
    dense = save_dense(random_model, tiny_config(), tmp_path / "dense")
    assert run_mix("btx", tmp_path / "btx", dense, dense) == 0
    assert (logits_of(tmp_path / "btx") - logits_of(dense)).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# METHOD.md 3: the per-tensor rules, with different experts


@pytest.fixture
def three_experts(tiny_config, random_model, tmp_path):
    config = tiny_config(qkv_bias=True)
    return [save_dense(random_model, config, tmp_path / f"expert{j}", seed=10 + j) for j in range(3)]


def layer_names(i: int, leaf: str) -> str:
    return f"model.layers.{i}.{leaf}"


def mean_of(dense: list[dict], name: str) -> torch.Tensor:
    return sum(d[name] for d in dense) / len(dense)


SHARED_NAMES = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
                "model.layers.0.input_norm.weight", "model.layers.1.input_norm.weight"]


def test_bam_experts_keep_their_own_attention_and_ffn(three_experts, tmp_path):
    assert run_mix("bam", tmp_path / "bam", *three_experts) == 0
    mixed, dense = tensors_of(tmp_path / "bam"), [tensors_of(p) for p in three_experts]
    q, kv = 4 * 16, 2 * 16  # one expert's query and key/value widths
    for i in range(2):
        for j, expert in enumerate(dense):
            for leaf, width in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
                for kind in ("weight", "bias"):
                    name = layer_names(i, f"attn.{leaf}.{kind}")
                    assert torch.equal(mixed[name][j * width:(j + 1) * width], expert[name])
            o = layer_names(i, "attn.o_proj.weight")
            assert torch.equal(mixed[o][:, j * q:(j + 1) * q], expert[o])
            for leaf in ("gate_up_proj", "down_proj"):
                name = layer_names(i, f"ffn.experts.{leaf}")
                assert torch.equal(mixed[name][j], expert[name][0])
        assert mixed[layer_names(i, "attn.router.weight")].shape == (3, 64)
        assert mixed[layer_names(i, "ffn.router.weight")].shape == (3, 64)
    for name in SHARED_NAMES:
        torch.testing.assert_close(mixed[name], mean_of(dense, name), atol=1e-6, rtol=1e-6)


def test_btx_averages_attention(three_experts, tmp_path):
    assert run_mix("btx", tmp_path / "btx", *three_experts, options=["--top-k", "2"]) == 0
    mixed, dense = tensors_of(tmp_path / "btx"), [tensors_of(p) for p in three_experts]
    for i in range(2):
        for leaf in ("q_proj.weight", "q_proj.bias", "k_proj.weight", "v_proj.weight", "o_proj.weight"):
            name = layer_names(i, f"attn.{leaf}")
            torch.testing.assert_close(mixed[name], mean_of(dense, name), atol=1e-6, rtol=1e-6)
        assert layer_names(i, "attn.router.weight") not in mixed
        name = layer_names(i, "ffn.experts.down_proj")
        assert torch.equal(mixed[name], torch.cat([d[name] for d in dense]))
    for name in SHARED_NAMES:
        torch.testing.assert_close(mixed[name], mean_of(dense, name), atol=1e-6, rtol=1e-6)


def test_bam_shared_averages_kv_and_stacks_q_o(three_experts, tmp_path):
    assert run_mix("bam-shared", tmp_path / "shared", *three_experts) == 0
    mixed, dense = tensors_of(tmp_path / "shared"), [tensors_of(p) for p in three_experts]
    assert open_model(tmp_path / "shared").config.kv_shared
    for i in range(2):
        for leaf in ("k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias"):
            name = layer_names(i, f"attn.{leaf}")
            torch.testing.assert_close(mixed[name], mean_of(dense, name), atol=1e-6, rtol=1e-6)
        for leaf, dim in (("q_proj.weight", 0), ("q_proj.bias", 0), ("o_proj.weight", 1)):
            name = layer_names(i, f"attn.{leaf}")
            assert torch.equal(mixed[name], torch.cat([d[name] for d in dense], dim=dim))


def test_weighted_average(three_experts, tmp_path):
    assert run_mix("btx", tmp_path / "w", *three_experts, options=["--weights", "1,0,3"]) == 0
    mixed, dense = tensors_of(tmp_path / "w"), [tensors_of(p) for p in three_experts]
    for name in SHARED_NAMES + [layer_names(0, "attn.q_proj.weight")]:
        torch.testing.assert_close(mixed[name], 0.25 * dense[0][name] + 0.75 * dense[2][name], atol=1e-6, rtol=1e-6)
    assert json.loads((tmp_path / "w" / "mix.json").read_text())["weights"] == [0.25, 0.0, 0.75]


def test_upcycle_copies_everything_and_repeats_the_ffn(tiny_config, random_model, tmp_path):
    dense = save_dense(random_model, tiny_config(), tmp_path / "dense")
    assert run_mix("upcycle", tmp_path / "up", dense, options=["--num-experts", "4", "--top-k", "2"]) == 0
    mixed, original = tensors_of(tmp_path / "up"), tensors_of(dense)
    for name, tensor in original.items():
        if ".ffn.experts." in name:
            assert mixed[name].shape[0] == 4 and all(torch.equal(e, tensor[0]) for e in mixed[name])
        else:
            assert torch.equal(mixed[name], tensor)
    assert sorted(set(mixed) - set(original)) == [layer_names(0, "ffn.router.weight"),
                                                  layer_names(1, "ffn.router.weight")]


# ---------------------------------------------------------------------------------------------
# Routers


def routers_of(path: Path) -> dict[str, torch.Tensor]:
    return {name: t for name, t in tensors_of(path).items() if name.endswith("router.weight")}


def test_routers_are_seeded_small_normals(tiny_config, random_model, tmp_path):
    dense = save_dense(random_model, tiny_config(), tmp_path / "dense")
    experts = [dense] * 4
    for out, seed in (("a", "5"), ("b", "5"), ("c", "6")):
        assert run_mix("bam", tmp_path / out, *experts, options=["--seed", seed, "--router-init-std", "0.05"]) == 0
    a, b, c = (routers_of(tmp_path / out) for out in "abc")
    assert len(a) == 4  # an attention and an FFN router per layer
    values = torch.cat([t.flatten() for t in a.values()])  # 4 routers x [4, 64] = 1024 draws
    assert abs(values.std().item() - 0.05) < 0.005 and abs(values.mean().item()) < 0.005
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert all(not torch.equal(a[name], c[name]) for name in a)
    assert not torch.equal(a[layer_names(0, "ffn.router.weight")], a[layer_names(1, "ffn.router.weight")])
    # A router depends on (seed, name) only: the same draw whatever was computed before it.
    name = layer_names(1, "attn.router.weight")
    new_router(layer_names(0, "ffn.router.weight"), (4, 64), 0.05, seed=5)
    assert torch.equal(new_router(name, (4, 64), 0.05, seed=5), a[name])


# ---------------------------------------------------------------------------------------------
# Output: dtype, tokenizer, provenance, overwrite


def test_dtype_tokenizer_and_provenance(tiny_config, random_model, tmp_path):
    dense = tmp_path / "dense"
    save_model(random_model(tiny_config()).to(torch.bfloat16), dense)
    (dense / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": {"a": 0}}}))
    assert run_mix("bam-shared", tmp_path / "moe", dense, dense, options=["--seed", "3"]) == 0
    assert {t.dtype for t in tensors_of(tmp_path / "moe").values()} == {torch.bfloat16}
    assert (tmp_path / "moe" / "tokenizer.json").read_text() == (dense / "tokenizer.json").read_text()
    provenance = json.loads((tmp_path / "moe" / "mix.json").read_text())
    assert provenance["method"] == "bam-shared" and provenance["seed"] == 3 and provenance["top_k"] == 1
    assert provenance["renormalize"] is False and provenance["dtype"] == "bfloat16"
    assert [s["path"] for s in provenance["sources"]] == [str(dense.resolve())] * 2


def test_different_tokenizers_are_refused(tiny_config, random_model, tmp_path, capsys):
    a = save_dense(random_model, tiny_config(), tmp_path / "a")
    b = save_dense(random_model, tiny_config(), tmp_path / "b", seed=1)
    (a / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": {"a": 0}}}))
    (b / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": {"b": 0}}}))
    assert run_mix("btx", tmp_path / "out", a, b) == 2
    assert "tokenizer" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_existing_output_needs_overwrite(tiny_config, random_model, tmp_path, capsys):
    dense = save_dense(random_model, tiny_config(), tmp_path / "dense")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert run_mix("btx", out, dense, dense) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "keep.txt").exists()
    assert run_mix("btx", out, dense, dense, options=["--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and open_model(out).config.n_ffn_experts == 2
    assert run_mix("btx", dense, dense, dense, options=["--overwrite"]) == 2  # never replace an input
    assert "input model" in capsys.readouterr().err and open_model(dense).config.is_dense


# ---------------------------------------------------------------------------------------------
# Bad inputs: one line on stderr, exit 2, nothing left behind


def assert_refused(capsys, parent: Path, out: Path, *needles: str) -> None:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bam mix: error: "), err
    for needle in needles:
        assert needle in err, (needle, err)
    assert not out.exists()
    assert not [p.name for p in parent.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.mark.parametrize("field, a, b", [
    ("hidden_size", 64, 32),
    ("vocab_size", 128, 96),
    ("block", "parallel", "sequential"),
])
def test_incompatible_experts_are_refused(field, a, b, tiny_config, random_model, tmp_path, capsys):
    first = save_dense(random_model, tiny_config(**{field: a}), tmp_path / "a")
    second = save_dense(random_model, tiny_config(**{field: b}), tmp_path / "b")
    assert run_mix("bam", tmp_path / "out", first, second) == 2
    assert_refused(capsys, tmp_path, tmp_path / "out", field, repr(a), repr(b))


def test_tensor_shape_mismatch_names_tensor_and_shapes(tiny_config, random_model, tmp_path, capsys):
    """A checkpoint whose tensor disagrees with its own config.json (hand-edited, or from a bad tool)."""
    good = save_dense(random_model, tiny_config(), tmp_path / "good")
    bad = save_dense(random_model, tiny_config(), tmp_path / "bad")
    tensors = tensors_of(bad)
    tensors["model.layers.1.attn.k_proj.weight"] = torch.zeros(48, 64)
    save_file(tensors, str(bad / "model.safetensors"))
    assert run_mix("bam", tmp_path / "out", good, bad) == 2
    assert_refused(capsys, tmp_path, tmp_path / "out", "model.layers.1.attn.k_proj.weight", "(48, 64)", "(32, 64)")


def test_mixture_sources_and_bad_options_are_refused(tiny_config, random_model, tmp_path, capsys):
    dense = save_dense(random_model, tiny_config(), tmp_path / "dense")
    assert run_mix("btx", tmp_path / "moe", dense, dense) == 0
    out = tmp_path / "out"
    cases = [
        (["btx", out, dense, tmp_path / "moe"], ["already a mixture", "n_ffn_experts=2"]),
        (["upcycle", out, dense, dense, ["--num-experts", "2"]], ["exactly one"]),
        (["upcycle", out, dense], ["--num-experts"]),
        (["bam", out, dense, dense, ["--top-k", "3"]], ["--top-k 3"]),
        (["btx", out, dense, dense, ["--weights", "1,2,3"]], ["--weights", "3 values", "2 models"]),
        (["btx", out, dense, tmp_path / "missing"], ["missing", "no such file"]),
    ]
    for args, needles in cases:
        options = args.pop() if isinstance(args[-1], list) else []
        assert run_mix(*args, options=options) == 2
        assert_refused(capsys, tmp_path, out, *needles)


def test_cli_subprocess_mix_and_refusal(tiny_config, random_model, tmp_path):
    dense = save_dense(random_model, tiny_config(), tmp_path / "dense")
    small = save_dense(random_model, tiny_config(hidden_size=32), tmp_path / "small")
    bam = [shutil.which("bam") or sys.executable, *([] if shutil.which("bam") else ["-m", "bam.cli"])]

    done = subprocess.run([*bam, "mix", "--method", "bam", "--out", str(tmp_path / "ok"), "--top-k", "2",
                           "--renormalize", str(dense), str(dense)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    torch.testing.assert_close(logits_of(tmp_path / "ok"), logits_of(dense), atol=1e-5, rtol=0)

    done = subprocess.run([*bam, "mix", "--method", "bam", "--out", str(tmp_path / "bad"), str(dense),
                           str(small)], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "hidden_size" in done.stderr and "64" in done.stderr
    assert not (tmp_path / "bad").exists()


# ---------------------------------------------------------------------------------------------
# parameter_shapes: computed from the config, it must name and shape exactly the model's parameters


def _domains(n: int) -> DomainEmbeddings:
    return DomainEmbeddings({f"d{j}": torch.ones(8) for j in range(n)}, {"kind": "test"})


OLMO2 = dict(block="sequential", norm_placement="post", qk_norm=True, qk_norm_scope="all")
GRANITE_SMOLLM3 = dict(block="sequential", embedding_multiplier=2.0, residual_multiplier=0.5, attention_scale=0.1,
                       logit_scale=0.25, nope_layers=[0])
GPT_NEOX = dict(block="parallel", parallel_ffn_norm=True, norm="layernorm", norm_bias=True, hidden_act="gelu",
                ffn_gated=False, ffn_bias=True, qkv_bias=True, attn_output_bias=True)
GEMMA3 = dict(block="sequential", norm_placement="sandwich", norm_weight_offset=1.0, qk_norm=True,
              hidden_act="gelu_pytorch_tanh", attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
              sliding_window=4, layer_types=["sliding_attention", "full_attention"],
              rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                               "full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0}})
CONFIG_VARIANTS = {
    "dense": lambda make: make(),
    "sequential, layernorm, qkv bias, tied": lambda make: make(block="sequential", norm="layernorm", qkv_bias=True,
                                                                tie_word_embeddings=True),
    "head_dim != d / heads": lambda make: make(head_dim=24),
    "btx": lambda make: mixed_config(make(), "btx", 3, top_k=2),
    "bam, qkv bias": lambda make: mixed_config(make(qkv_bias=True), "bam", 3),
    "bam-shared, tied": lambda make: mixed_config(make(tie_word_embeddings=True), "bam-shared", 4),
    "nexus": lambda make: mixed_config(make(), "nexus", 3, domain_embeddings=_domains(3), nexus_hidden_dim=40),
    "nexus-bam": lambda make: mixed_config(make(), "nexus-bam", 2, domain_embeddings=_domains(2)),
    "nexus-bam-shared, one expert": lambda make: mixed_config(make(), "nexus-bam-shared", 1,
                                                              domain_embeddings=_domains(1)),
    "shared expert, linear router": lambda make: make(n_ffn_experts=3, ffn_top_k=2, ffn_shared_expert=True),
    "shared expert, one expert": lambda make: make(ffn_shared_expert=True),
    "kv_shared with one attention": lambda make: make(kv_shared=True),
    "qk_norm": lambda make: make(qk_norm=True),
    "bam, qk_norm": lambda make: mixed_config(make(qk_norm=True), "bam", 3),
    "bam-shared, qk_norm": lambda make: mixed_config(make(qk_norm=True), "bam-shared", 3),
    "olmo2: post norms, qk_norm over all heads": lambda make: make(**OLMO2),
    "bam, olmo2": lambda make: mixed_config(make(**OLMO2), "bam", 3),
    "bam-shared, olmo2": lambda make: mixed_config(make(**OLMO2), "bam-shared", 3),
    "granite multipliers, smollm3 nope layers": lambda make: mixed_config(make(**GRANITE_SMOLLM3), "bam", 2),
    "gpt_neox: two norms with biases, non-gated FFN, biases": lambda make: make(**GPT_NEOX),
    "bam, gpt_neox": lambda make: mixed_config(make(**GPT_NEOX), "bam", 3),
    "gemma 3: sandwich norms, offset, qk_norm, rope by layer type": lambda make: make(**GEMMA3),
    "bam-shared, gemma 3": lambda make: mixed_config(make(**GEMMA3), "bam-shared", 3),
    "nexus-bam, gemma 3": lambda make: mixed_config(make(**GEMMA3), "nexus-bam", 2, domain_embeddings=_domains(2)),
    "nexus-bam-shared, sequential gpt_neox": lambda make: mixed_config(
        make(**{**GPT_NEOX, "block": "sequential", "parallel_ffn_norm": False}), "nexus-bam-shared", 2,
        domain_embeddings=_domains(2)),
}


@pytest.mark.parametrize("variant", CONFIG_VARIANTS)
def test_parameter_shapes_match_the_model(variant, tiny_config):
    from bam.modeling.model import BamForCausalLM

    config = CONFIG_VARIANTS[variant](tiny_config)
    with torch.device("meta"):
        model = BamForCausalLM(config)
    stored = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:  # one tensor, stored once: under the embedding's name
        assert stored.pop("lm_head.weight") == stored["model.embed_tokens.weight"]
    shapes = parameter_shapes(config)
    assert shapes == stored
    assert list(shapes) == [name for name, _ in model.named_parameters()]  # the order mix writes them in


@pytest.mark.parametrize("method", METHODS)
def test_each_rule_gives_the_shape_the_layout_table_declares(method, tiny_config):
    """The rules pick by role, the shapes come from the table: a stack over n sources has n times
    the source's size along the tensor's expert dim, everything taken from the sources keeps its
    shape, and a new tensor (router, Nexus embeddings) is one the dense sources lack."""
    dense = tiny_config(qkv_bias=True)
    n = 3
    domains = _domains(n) if method in NEXUS_METHODS else None
    config = mixed_config(dense, method, n, top_k=2, domain_embeddings=domains)
    source_shapes = parameter_shapes(dense)
    for param in parameters(config):
        rule = tensor_rule(param, method)
        if rule.kind in ("stack", "repeat"):
            # Nexus stacks the domain experts' FFNs, and the attention of all of them, seed included
            expected = list(source_shapes[param.name])
            expected[rule.dim] *= n + 1 if method in NEXUS_METHODS and not rule.routed_only else n
            assert param.shape == tuple(expected), param.name
        elif rule.kind in ("average", "copy"):
            assert param.shape == source_shapes[param.name], param.name
        elif rule.kind == "shared_expert":  # the seed's one expert, without the expert dim
            assert (1, *param.shape) == source_shapes[param.name.replace("shared_expert", "experts")]
        else:
            assert rule.kind in ("router", "domain_embeddings") and param.name not in source_shapes, param.name


def test_mixing_does_not_import_the_model(tiny_config, random_model, tmp_path):
    """`bam mix` reads and writes tensors only: transformers' modeling code (seconds) stays unloaded.

    Only what bam loads counts: before transformers 5.21, importing its Auto classes (which
    `import bam` must, to register ours) already loads the generation code."""
    dense = save_dense(random_model, tiny_config(), tmp_path / "dense")
    script = textwrap.dedent("""
        import sys
        from transformers import AutoModelForCausalLM
        upstream = set(sys.modules)
        from bam.cli import main
        assert main(sys.argv[1:]) == 0
        heavy = [m for m in ("bam.modeling.model", "transformers.modeling_utils", "transformers.generation.utils")
                 if m in sys.modules and m not in upstream]
        print(",".join(heavy) or "none")
    """)
    done = subprocess.run([sys.executable, "-c", script, "mix", "--method", "bam", "--top-k", "2", "--out",
                           str(tmp_path / "moe"), str(dense), str(dense)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "none"


def test_auto_classes_build_bam_models_after_import_bam(tiny_config, random_model, tmp_path):
    """`import bam` registers the model although it imports bam.modeling.model only on first use."""
    dense = save_dense(random_model, tiny_config(), tmp_path / "dense")
    script = textwrap.dedent("""
        import sys
        import bam
        import transformers
        assert "bam.modeling.model" not in sys.modules
        model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1])
        assert type(model) is bam.BamForCausalLM, type(model)
        config = transformers.AutoConfig.from_pretrained(sys.argv[1])
        assert type(transformers.AutoModelForCausalLM.from_config(config)) is bam.BamForCausalLM
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script, str(dense)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "ok"


# ---------------------------------------------------------------------------------------------
# Hugging Face sources


def test_mix_of_hf_llama_experts_preserves_function(tmp_path):
    import transformers
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    reference = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for param in reference.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    reference.save_pretrained(tmp_path / "llama")
    hf = tmp_path / "llama"
    assert run_mix("bam", tmp_path / "bam", hf, hf, options=["--top-k", "2", "--renormalize"]) == 0
    assert open_model(tmp_path / "bam").config.block == "sequential"
    with torch.no_grad():
        expected = reference(TOKENS).logits
    torch.testing.assert_close(logits_of(tmp_path / "bam"), expected, atol=1e-4, rtol=0)


def test_hf_expert_with_a_wrong_ffn_piece_is_refused(tmp_path, capsys):
    """The imported gate/up pieces are written without a concatenation, and still shape-checked."""
    import transformers
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "good")
    shutil.copytree(tmp_path / "good", tmp_path / "bad")
    # Read from `good`: the tensors load_file returns may be views of the file's memory map, and
    # rewriting the very file they map (as save_file below does to `bad`) is a SIGBUS on older safetensors.
    tensors = load_file(str(tmp_path / "good" / "model.safetensors"))
    name = "model.layers.1.mlp.up_proj.weight"
    for bad, needle in ((torch.zeros(80, 64), "has 11264 values"), (torch.zeros(96, 32), "(96, 32)")):
        save_file({**tensors, name: bad}, str(tmp_path / "bad" / "model.safetensors"), metadata={"format": "pt"})
        capsys.readouterr()  # transformers' progress bar from save_pretrained
        assert run_mix("btx", tmp_path / "out", tmp_path / "good", tmp_path / "bad") == 2
        assert_refused(capsys, tmp_path, tmp_path / "out", "model.layers.1.ffn.experts.gate_up_proj", needle)


# ---------------------------------------------------------------------------------------------
# Streaming: memory stays near one tensor, not one model

STREAMING_SCRIPT = textwrap.dedent("""
    import json, sys, threading, time
    from bam.formats.model_dir import open_model
    from bam.mix.mixing import mix

    def anon_kb():
        # Anonymous (heap) memory only: tensors read through safetensors' mmap also show up as
        # file-backed pages, which the kernel can drop at will and which ru_maxrss would count.
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1])

    sources = [open_model(p) for p in sys.argv[2:]]
    baseline, peak, done = anon_kb(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], anon_kb())
            time.sleep(0.0005)

    thread = threading.Thread(target=sample)
    thread.start()
    mix(sources, "bam", sys.argv[1], progress=False)
    done.set()
    thread.join()
    print(json.dumps({"growth_kb": peak[0] - baseline}))
""")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_mixing_streams_tensors(tiny_config, random_model, tmp_path):
    # ~12.9M parameters = ~52 MB per expert, spread over many tensors of at most ~1.5 MB each.
    config = tiny_config(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=18,
                         num_attention_heads=4, num_key_value_heads=4)
    first = save_dense(random_model, config, tmp_path / "e0")
    experts = [first]
    for j in (1, 2, 3):
        experts.append(Path(shutil.copytree(first, tmp_path / f"e{j}")))
    input_bytes = sum((p / "model.safetensors").stat().st_size for p in experts)
    assert input_bytes > 190e6

    done = subprocess.run([sys.executable, "-c", STREAMING_SCRIPT, str(tmp_path / "moe"), *map(str, experts)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    growth_bytes = json.loads(done.stdout.strip().splitlines()[-1])["growth_kb"] * 1024
    output_bytes = (tmp_path / "moe" / "model.safetensors").stat().st_size
    assert output_bytes > 0.9 * input_bytes  # bam stacks attention and FFN: almost all of the inputs
    print(f"heap growth {growth_bytes / 1e6:.1f} MB while mixing {input_bytes / 1e6:.0f} MB of experts")
    assert growth_bytes < 0.15 * input_bytes, (growth_bytes, input_bytes)


# ---------------------------------------------------------------------------------------------
# The paper's ablations (METHOD.md 6): BTX with copies of the seed's FFN, top-k attention routing


def test_btx_with_weight_0_seed_copies_averages_the_real_models_only(three_experts, tmp_path):
    """The parameter-matched BTX: the seed (expert 0) repeated twice more, weight 0 in every average.
    Its averaged tensors are BTX's over the three real models, bit for bit; its FFN experts are the
    three models' and two more copies of the seed's."""
    seed = three_experts[0]
    copies = [*three_experts, seed, seed]
    assert run_mix("btx", tmp_path / "copies", *copies, options=["--weights", "1,1,1,0,0"]) == 0
    assert run_mix("btx", tmp_path / "btx", *three_experts) == 0
    mixed, btx = tensors_of(tmp_path / "copies"), tensors_of(tmp_path / "btx")
    dense = [tensors_of(p) for p in three_experts]
    averaged = [p.name for p in parameters(open_model(tmp_path / "copies").config)
                if tensor_rule(p, "btx").kind == "average"]
    assert layer_names(0, "attn.q_proj.weight") in averaged and "lm_head.weight" in averaged
    for name in averaged:
        assert torch.equal(mixed[name], btx[name]), name
        torch.testing.assert_close(mixed[name], mean_of(dense, name), atol=1e-6, rtol=1e-6)
    for i in range(2):
        for leaf in ("gate_up_proj", "down_proj"):
            name = layer_names(i, f"ffn.experts.{leaf}")
            assert torch.equal(mixed[name], torch.cat([dense[j][name] for j in (0, 1, 2, 0, 0)]))
        assert mixed[layer_names(i, "ffn.router.weight")].shape == (5, 64)
    # Uniform weights would let the copies pull every average towards the seed: the weights matter.
    assert run_mix("btx", tmp_path / "uniform", *copies) == 0
    name = layer_names(0, "attn.q_proj.weight")
    assert not torch.allclose(tensors_of(tmp_path / "uniform")[name], btx[name], atol=1e-3)


def test_btx_with_seed_copies_of_identical_models_equals_the_dense_model(tiny_config, random_model, tmp_path):
    """METHOD.md 4: renormalized top-k over identical FFN experts is the dense FFN, copies or not."""
    dense = save_dense(random_model, tiny_config(), tmp_path / "dense")
    options = ["--top-k", "3", "--renormalize", "--router-init-std", "0.5", "--weights", "1,1,1,0,0"]
    assert run_mix("btx", tmp_path / "moe", *[dense] * 5, options=options) == 0
    config = open_model(tmp_path / "moe").config
    assert (config.n_ffn_experts, config.ffn_top_k, config.n_attn_experts) == (5, 3, 1)
    torch.testing.assert_close(logits_of(tmp_path / "moe"), logits_of(dense), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["bam", "bam-shared"])
def test_topk_attention_routing_mix(method, three_experts, tiny_config, random_model, tmp_path):
    """`--attn-routing topk --attn-top-k K`: the soft mix's tensors, a config routing each token to K
    attention experts; with identical experts it is the dense model (renormalized gates of identical
    experts sum to one), with different ones it is not the soft mixture."""
    options = ["--router-init-std", "0.5"]
    topk = ["--attn-routing", "topk", "--attn-top-k", "2"]
    assert run_mix(method, tmp_path / "soft", *three_experts, options=options) == 0
    assert run_mix(method, tmp_path / "topk", *three_experts, options=[*options, *topk]) == 0
    config = open_model(tmp_path / "topk").config
    assert (config.attn_routing, config.attn_top_k, config.n_attn_experts) == ("topk", 2, 3)
    assert config.kv_shared == (method == "bam-shared")
    assert open_model(tmp_path / "soft").config.attn_routing == "soft"
    soft, mixed = tensors_of(tmp_path / "soft"), tensors_of(tmp_path / "topk")
    assert soft.keys() == mixed.keys() and all(torch.equal(soft[n], mixed[n]) for n in soft)
    assert (logits_of(tmp_path / "topk") - logits_of(tmp_path / "soft")).abs().max() > 1e-3

    dense = save_dense(random_model, tiny_config(), tmp_path / "dense")
    for k in ("1", "2"):
        same = ["--top-k", "2", "--renormalize", *options, "--attn-routing", "topk", "--attn-top-k", k]
        assert run_mix(method, tmp_path / f"same{k}", dense, dense, dense, options=same) == 0
        torch.testing.assert_close(logits_of(tmp_path / f"same{k}"), logits_of(dense), atol=1e-5, rtol=0)


def test_topk_attention_routing_options_are_checked(tiny_config, random_model, tmp_path, capsys):
    dense = save_dense(random_model, tiny_config(), tmp_path / "dense")
    out = tmp_path / "out"
    cases = [
        (["btx", ["--attn-routing", "topk"]], ["--attn-routing topk applies to methods with attention experts", "btx"]),
        (["bam", ["--attn-routing", "topk", "--attn-top-k", "3"]], ["--attn-top-k 3", "(2, one per model directory)"]),
        (["bam", ["--attn-top-k", "2"]], ["--attn-top-k 2 applies to --attn-routing topk"]),
    ]
    for (method, options), needles in cases:
        assert run_mix(method, out, dense, dense, options=options) == 2
        assert_refused(capsys, tmp_path, out, *needles)
    with pytest.raises(SystemExit):  # argparse: not a routing
        run_mix("bam", out, dense, dense, options=["--attn-routing", "top2"])
