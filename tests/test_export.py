"""Export: standard MoE formats loaded by vanilla transformers, and the self-contained `--format hf`.

The reference for every exported model is a separate Python process that cannot import bam
(`sys.modules["bam"] = None`, isolated mode, cwd outside the repository): whatever it computes, it
computes with transformers' own code (Mixtral, Qwen2-MoE, Llama) or the bundled remote code.
"""

import json
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
import torch
import transformers

import bam  # registers the Auto classes
from bam.formats.export import FAMILY_FORMATS
from bam.formats.model_dir import load_model, open_model, save_model
from bam.cli import main
from bam.modeling.config import BamConfig
from bam.modeling.model import BamForCausalLM
from bam.data.tokenizer import train_tokenizer

SHAPE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
INPUT_IDS = torch.randint(0, SHAPE["vocab_size"], (2, 17), generator=torch.Generator().manual_seed(5))

# Runs in a process where bam cannot be imported; loads each model with transformers alone.
OUTSIDE = textwrap.dedent("""
    import json, sys
    sys.modules["bam"] = None  # `import bam` (or any bam.x) now raises ImportError
    import torch, transformers
    request = json.loads(open(sys.argv[1]).read())
    input_ids = torch.tensor(request["input_ids"])
    results = {}
    for key, path in request["models"].items():
        kwargs = {"trust_remote_code": True} if request.get("remote_code") else {}
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).eval()
        with torch.no_grad():
            logits = model(input_ids).logits
            tokens = model.generate(input_ids[:1], max_new_tokens=12, do_sample=False, pad_token_id=0)
        results[key] = {"class": type(model).__name__, "module": type(model).__module__,
                        "logits": logits.tolist(), "tokens": tokens.tolist()}
    results["bam_modules"] = sorted(m for m, v in sys.modules.items() if m.split(".")[0] == "bam" and v is not None)
    open(sys.argv[2], "w").write(json.dumps(results))
""")


def run_outside(models: dict[str, Path], tmp: Path, remote_code: bool = False) -> dict:
    """Logits and greedy tokens of each model, computed in a Python that has no bam."""
    tmp.mkdir(parents=True, exist_ok=True)
    request, result = tmp / "request.json", tmp / "result.json"
    request.write_text(json.dumps({"models": {k: str(v) for k, v in models.items()},
                                   "input_ids": INPUT_IDS.tolist(), "remote_code": remote_code}))
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp), "HF_HOME": str(tmp / "hf_home"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-I", "-c", OUTSIDE, str(request), str(result)], check=False, cwd=tmp,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(result.read_text())
    assert results.pop("bam_modules") == []
    return results


def ours(path: Path) -> tuple[torch.Tensor, list]:
    model = load_model(path)
    with torch.no_grad():
        return model(INPUT_IDS).logits, model.generate(INPUT_IDS[:1], max_new_tokens=12, do_sample=False,
                                                       pad_token_id=0).tolist()


def hf_expert(family: str, out: Path, seed: int, **overrides) -> Path:
    """A tiny random transformers model, every parameter perturbed so experts differ everywhere."""
    config_cls, model_cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                             "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[family]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**SHAPE, **overrides})).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    model.save_pretrained(out)
    return out


def bam_cli(*args) -> int:
    return main([str(a) for a in args])


# ---------------------------------------------------------------------------------------------
# Standard formats


def bam_random(out: Path, seed: int, tokenizer: Path | None = None, **overrides) -> Path:
    """One of our own models (dense, parallel block unless overridden), every parameter random."""
    config = BamConfig(**{**SHAPE, "block": "parallel", **overrides})
    generator = torch.Generator().manual_seed(seed)
    model = BamForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1 + 0.1 * noise if "norm" in name else (noise if "domain" in name else 0.1 * noise))
    return save_model(model, out, tokenizer_dir=tokenizer)


@pytest.fixture(scope="module")
def standard(tmp_path_factory):
    """BTX / upcycled mixes of Llama and Qwen2 experts, a dense Llama and a Nexus model, exported,
    plus what a bam-free process computes from each export."""
    root = tmp_path_factory.mktemp("standard")
    # A non-default rope_theta, which every export must carry over.
    rope = {"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}
    llama = [hf_expert("llama", root / f"llama{i}", seed=i, **rope) for i in range(3)]
    # Qwen2: q/k/v biases and tied embeddings, both of which the Qwen2-MoE export must carry.
    qwen = [hf_expert("qwen2", root / f"qwen{i}", seed=10 + i, tie_word_embeddings=True) for i in range(3)]
    # name -> (`bam mix` arguments, or an existing model directory; export format)
    models = {
        "btx_top2_renorm": (["mix", *llama, "--method", "btx", "--top-k", "2", "--renormalize"], "mixtral"),
        "upcycle_top2_renorm": (["mix", llama[1], "--method", "upcycle", "--num-experts", "4", "--top-k", "2",
                                 "--renormalize", "--router-init-std", "0.5"], "mixtral"),
        "btx_top1_qwen": (["mix", *qwen, "--method", "btx", "--top-k", "1", "--router-init-std", "0.5"], "qwen2_moe"),
        "btx_top2_llama_qwen2moe": (["mix", *llama, "--method", "btx", "--top-k", "2"], "qwen2_moe"),
        "dense_llama": (llama[0], "llama"),
        # Nexus: top-1 unnormalized with the domain-embedding router and the always-on shared expert.
        "nexus_shared": (bam_random(root / "nexus", seed=3, block="sequential", n_ffn_experts=3, ffn_router="nexus",
                                    nexus_embed_dim=16, nexus_hidden_dim=8, ffn_shared_expert=True), "qwen2_moe"),
    }
    exported = {}
    for name, (made_from, fmt) in models.items():
        source = made_from if isinstance(made_from, Path) else root / name
        if not isinstance(made_from, Path):
            assert bam_cli(*made_from, "--out", source) == 0
        assert bam_cli("export", source, "--format", fmt, "--out", root / f"{name}.{fmt}") == 0
        exported[name] = (source, root / f"{name}.{fmt}")
    outside = run_outside({name: out for name, (_, out) in exported.items()}, root / "outside")
    return exported, outside


@pytest.mark.parametrize("name, model_class", [
    ("btx_top2_renorm", "MixtralForCausalLM"),
    ("upcycle_top2_renorm", "MixtralForCausalLM"),
    ("btx_top1_qwen", "Qwen2MoeForCausalLM"),
    ("btx_top2_llama_qwen2moe", "Qwen2MoeForCausalLM"),
    ("dense_llama", "LlamaForCausalLM"),
    ("nexus_shared", "Qwen2MoeForCausalLM"),
])
def test_exported_model_matches_ours_without_bam(standard, name, model_class):
    exported, outside = standard
    source, out = exported[name]
    result = outside[name]
    assert result["class"] == model_class and result["module"].startswith("transformers.models.")
    expected_logits, expected_tokens = ours(source)
    assert (torch.tensor(result["logits"]) - expected_logits).abs().max().item() < 1e-4
    assert result["tokens"] == expected_tokens
    assert not any(p.suffix == ".py" for p in out.iterdir())  # standard formats carry no code


def test_exported_configs_state_the_routing_rule(standard):
    exported, _ = standard
    mixtral = json.loads((exported["btx_top2_renorm"][1] / "config.json").read_text())
    assert (mixtral["model_type"], mixtral["num_local_experts"], mixtral["num_experts_per_tok"]) == ("mixtral", 3, 2)
    qwen = json.loads((exported["btx_top1_qwen"][1] / "config.json").read_text())
    assert (qwen["model_type"], qwen["norm_topk_prob"], qwen["num_experts_per_tok"]) == ("qwen2_moe", False, 1)
    assert qwen["qkv_bias"] is True and qwen["tie_word_embeddings"] is True
    assert mixtral["rope_parameters"]["rope_theta"] == 500000.0


@pytest.fixture(scope="module")
def refusable(tmp_path_factory):
    root = tmp_path_factory.mktemp("refusable")
    llama = [hf_expert("llama", root / f"llama{i}", seed=i) for i in range(2)]
    parallel = [bam_random(root / f"parallel{i}", seed=i) for i in range(2)]
    bam_random(root / "shared", seed=0, block="sequential", n_ffn_experts=2, ffn_top_k=2, ffn_renormalize=True,
               ffn_shared_expert=True)
    assert bam_cli("mix", *llama, "--method", "bam", "--top-k", "2", "--renormalize", "--out", root / "bam") == 0
    assert bam_cli("mix", *llama, "--method", "btx", "--out", root / "btx_top1") == 0
    assert bam_cli("mix", *parallel, "--method", "btx", "--top-k", "2", "--renormalize",
                   "--out", root / "parallel") == 0
    return root


@pytest.mark.parametrize("model, fmt, reason", [
    ("bam", "mixtral", "2 attention experts"),
    ("bam", "qwen2_moe", "2 attention experts"),
    ("btx_top1", "mixtral", "Mixtral renormalizes"),
    ("btx_top1", "olmoe", "q_norm/k_norm"),
    ("btx_top1", "llama", "llama is dense"),
    ("parallel", "mixtral", "parallel"),
    ("shared", "mixtral", "shared expert"),
])
def test_inexpressible_export_is_refused_and_writes_nothing(refusable, model, fmt, reason, capsys):
    out = refusable / f"out-{model}-{fmt}"
    assert bam_cli("export", refusable / model, "--format", fmt, "--out", out) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and reason in err and "use --format" in err
    assert not out.exists()
    assert not [p for p in refusable.iterdir() if p.name.startswith(f".{out.name}")]  # no temp dirs left


def test_parity_check_refuses_a_wrong_conversion(refusable, monkeypatch, capsys):
    """If the conversion were wrong, the logit check would catch it and nothing would be written."""
    import bam.formats.export

    real_plan = bam.formats.export.tensor_plan

    def plan_with_swapped_experts(config, fmt, dtype):
        plan = real_plan(config, fmt, dtype)
        inputs, _ = plan["model.layers.1.mlp.experts.down_proj"]
        plan["model.layers.1.mlp.experts.down_proj"] = inputs, lambda t: t.flip(0)
        return plan

    monkeypatch.setattr(bam.formats.export, "tensor_plan", plan_with_swapped_experts)
    assert bam_cli("mix", refusable / "llama0", refusable / "llama1", "--method", "btx", "--top-k", "2",
                   "--renormalize", "--out", refusable / "btx_top2") == 0
    out = refusable / "swapped.mixtral"
    assert bam_cli("export", refusable / "btx_top2", "--format", "mixtral", "--out", out) == 2
    assert "logits differ" in capsys.readouterr().err
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# --format hf: our code travels with the weights


def real_text() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [(stdlib / name).read_text(encoding="utf-8") for name in ("textwrap.py", "string.py", "shlex.py")]


@pytest.fixture(scope="module")
def remote(tmp_path_factory):
    """BAM (KV experts) and BAM (KV sharing) mixes of parallel-block experts, exported with --format hf,
    copied elsewhere, and loaded with trust_remote_code=True by a process that has no bam."""
    root = tmp_path_factory.mktemp("remote")
    train_tokenizer(real_text(), 300, root / "tokenizer")
    vocab = {"vocab_size": 300}
    experts = [bam_random(root / f"expert{i}", seed=i, tokenizer=root / "tokenizer", **vocab) for i in range(3)]
    exported = {}
    for method in ("bam", "bam-shared"):
        assert bam_cli("mix", *experts, "--method", method, "--top-k", "2", "--out", root / method) == 0
        assert bam_cli("export", root / method, "--format", "hf", "--out", root / f"{method}.hf") == 0
        elsewhere = root / "elsewhere" / f"{method.replace('-', '_')}_export"
        shutil.copytree(root / f"{method}.hf", elsewhere)
        exported[method] = (root / method, elsewhere)
    outside = run_outside({m: out for m, (_, out) in exported.items()}, root / "outside", remote_code=True)
    return exported, outside


@pytest.mark.parametrize("method", ["bam", "bam-shared"])
def test_hf_format_loads_without_bam_and_generates_the_same_tokens(remote, method):
    exported, outside = remote
    source, out = exported[method]
    result = outside[method]
    assert result["class"] == "BamForCausalLM" and result["module"].startswith("transformers_modules.")
    expected_logits, expected_tokens = ours(source)
    assert result["tokens"] == expected_tokens
    assert (torch.tensor(result["logits"]) - expected_logits).abs().max().item() < 1e-5
    assert (out / "tokenizer.json").exists()


def test_hf_format_code_is_generated_from_the_package(remote):
    exported, _ = remote
    _, out = exported["bam"]
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_bam.BamConfig",
                                  "AutoModelForCausalLM": "modeling_bam.BamForCausalLM"}
    package = Path(bam.__file__).parent
    for generated, original in [("modeling_bam.py", "modeling/model.py"), ("configuration_bam.py", "modeling/config.py"),
                                ("bam_modeling_moe.py", "modeling/moe.py"), ("bam_errors.py", "errors.py")]:
        text = (out / generated).read_text()
        assert not re.search(r"^\s*(from|import) bam\b", text, re.MULTILINE)
        # Apart from the header line and the rewritten imports, the file is our source verbatim.
        body = [line for line in text.splitlines()[1:] if not line.lstrip().startswith("from .")]
        source = [line for line in (package / original).read_text().splitlines()
                  if not line.lstrip().startswith("from bam.")]
        assert body == source


def test_hf_format_loads_after_import_bam_without_remote_code(remote):
    """With bam imported, the registered classes serve the directory: no trust_remote_code needed."""
    exported, _ = remote
    source, out = exported["bam-shared"]
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(model) is BamForCausalLM
    with torch.no_grad():
        assert torch.equal(model(INPUT_IDS).logits, load_model(source)(INPUT_IDS).logits)


# ---------------------------------------------------------------------------------------------
# Back to the family: --format source (the family recorded at import) and --format FAMILY


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """Each family bam writes: a tiny random checkpoint made by transformers, imported and exported
    with --format source and with the family's name, and what a bam-free process computes from each."""
    from test_hf_import import make_hf_model

    root = tmp_path_factory.mktemp("families")
    references, exported = {}, {}
    for family in FAMILY_FORMATS:
        references[family] = make_hf_model(family, root / family, seed=7)
        for how in ("source", family):
            exported[f"{family}/{how}"] = root / f"{family}.{how}"
            assert bam_cli("export", root / family, "--format", how, "--out", exported[f"{family}/{how}"]) == 0
    return root, references, exported, run_outside(exported, root / "outside")


@pytest.mark.parametrize("how", ["source", "name"])
@pytest.mark.parametrize("family", FAMILY_FORMATS)
def test_family_export_gives_the_original_models_logits_in_vanilla_transformers(families, family, how):
    _, references, _, outside = families
    result = outside[f"{family}/{'source' if how == 'source' else family}"]
    reference = references[family]
    assert result["class"] == type(reference).__name__ and result["module"].startswith("transformers.models.")
    with torch.no_grad():
        expected = reference(INPUT_IDS).logits
        tokens = reference.generate(INPUT_IDS[:1], max_new_tokens=12, do_sample=False, pad_token_id=0).tolist()
    difference = (torch.tensor(result["logits"]) - expected).abs().max().item()
    assert difference <= 1e-4 * expected.abs().max().item()
    assert result["tokens"] == tokens


# config.json fields an export may write differently from the original checkpoint, with the same
# function: head_dim where the family's config does not declare it (its attention reads it, and
# it equals hidden_size / num_attention_heads, transformers' default); SmolLM3's
# no_rope_layer_interval, which only fills no_rope_layers when that is absent (we write the list).
SAME_FUNCTION = {"head_dim", "no_rope_layer_interval"}


@pytest.mark.parametrize("family", FAMILY_FORMATS)
def test_family_export_round_trips_the_config(families, family):
    """import -> export -> import gives our config again, and the exported config.json is the
    original's up to fields that do not change the function."""
    root, references, exported, _ = families
    imported = open_model(root / family).config
    assert imported.source_model_type == family
    original = json.loads((root / family / "config.json").read_text())
    for how in ("source", family):
        assert open_model(exported[f"{family}/{how}"]).config.to_dict() == imported.to_dict()
        written = json.loads((exported[f"{family}/{how}"] / "config.json").read_text())
        differ = {key for key in original.keys() | written.keys() if original.get(key) != written.get(key)}
        assert differ <= SAME_FUNCTION, differ
        assert written.get("head_dim", imported.head_dim) == imported.head_dim
        assert written["model_type"] == family and written["architectures"] == original["architectures"]


def test_source_format_of_a_bam_native_model_names_the_formats(tmp_path, capsys):
    """A model bam initialised records no family: --format source says to name one, and naming
    one works for a model the family can express."""
    native = bam_random(tmp_path / "native", seed=0, block="sequential")
    assert bam_cli("export", native, "--format", "source", "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "source_model_type is null" in err and "name a format: llama," in err
    assert not (tmp_path / "out").exists()
    assert bam_cli("export", native, "--format", "mistral", "--out", tmp_path / "mistral") == 0
    assert json.loads((tmp_path / "mistral" / "config.json").read_text())["model_type"] == "mistral"


# A model of the first family exported to the second: every field the second cannot express is
# named, and the format that can is pointed to (the model's own family first).
@pytest.mark.parametrize("family, fmt, named, alternative", [
    ("qwen3", "llama", ["qk_norm=True"], "qwen3"),
    ("qwen2", "llama", ["qkv_bias=True"], "qwen2"),
    ("llama", "qwen2", ["qkv_bias=False"], "llama"),
    ("olmo2", "qwen3", ["qk_norm_scope='all'", "norm_placement='post'"], "olmo2"),
    ("granite", "llama", ["embedding_multiplier=3.0", "residual_multiplier=0.3", "attention_scale=0.05",
                          "logit_scale=0.4"], "granite"),
    ("smollm3", "llama", ["nope_layers=[1]"], "smollm3"),
    ("cohere", "llama", ["block='parallel'", "norm='layernorm'", "logit_scale=0.5"], "cohere"),
    ("llama", "cohere", ["block='sequential'", "norm='rmsnorm'"], "llama"),
])
def test_family_that_cannot_express_the_model_is_refused_naming_each_field(family, fmt, named, alternative,
                                                                           tmp_path, capsys):
    from test_hf_import import make_hf_model

    make_hf_model(family, tmp_path / "m")
    capsys.readouterr()
    assert bam_cli("export", tmp_path / "m", "--format", fmt, "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.strip().endswith(f"(use --format {alternative})")
    for field in named:
        assert f"{field}, which {fmt} cannot express" in err
    assert not (tmp_path / "out").exists()


def test_round_trip_catches_an_export_that_loses_a_field(tmp_path, monkeypatch, capsys):
    """If a family's export forgot a field, translating it back would show it: refused, nothing written."""
    import bam.formats.families
    from test_hf_import import make_hf_model

    make_hf_model("granite", tmp_path / "m")
    forgetful = lambda config: {k: v for k, v in bam.formats.families._granite_fields(config).items()  # noqa: E731
                                if k != "logits_scaling"}
    monkeypatch.setitem(bam.formats.families.FAMILY_EXPORT_FIELDS, "granite", forgetful)
    capsys.readouterr()
    assert bam_cli("export", tmp_path / "m", "--format", "source", "--out", tmp_path / "out") == 2
    assert "logit_scale=0.4, which granite cannot express (its config gives 1.0)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_interleaved_rope_export_inverts_import():
    from bam.formats.hf import half_to_interleaved_rope, interleaved_to_half_rope

    weight = torch.randn(4 * 8, 5)
    half = interleaved_to_half_rope(weight, 8)
    assert not torch.equal(half, weight)
    assert torch.equal(half_to_interleaved_rope(half, 8), weight)


# A BTX (top-2, renormalized) of copies of each family's model: `--format source` is refused (the
# family is dense) pointing to the MoE format that expresses the model, which then exports; where
# neither Mixtral nor Qwen2-MoE does, the reason a Mixtral export is refused.
MOE_FORMAT = {
    "llama": ("mixtral", None),
    "mistral": ("mixtral", None),
    "qwen2": ("qwen2_moe", "Mixtral has no q/k/v biases"),
    "qwen3": ("hf", "normalizes each head's queries and keys (qk_norm)"),
    "olmo2": ("hf", "normalizes all heads' queries and keys (qk_norm)"),
    "granite": ("hf", "attention_scale=0.05"),
    "smollm3": ("hf", "no positional encoding (nope_layers)"),
    "cohere": ("hf", "parallel"),
    "cohere2": ("hf", "parallel"),
    "gemma": ("hf", "(norm_weight_offset)"),
    "gemma2": ("hf", "attn_logit_softcapping=1.0"),
    "gemma3_text": ("hf", "rope_parameters by layer type"),
    "phi3": ("hf", "(partial_rotary_factor)"),
    "gpt_neox": ("hf", "ffn_gated=False"),
}


@pytest.mark.parametrize("family", FAMILY_FORMATS)
def test_family_moe_exports_where_an_moe_format_expresses_it(family, tmp_path, capsys):
    from bam.mix.add_expert import grown_config
    from test_hf_import import make_hf_model

    make_hf_model(family, tmp_path / "hf")
    moe = tmp_path / "moe"
    assert bam_cli("mix", tmp_path / "hf", tmp_path / "hf", "--method", "btx", "--top-k", "2", "--renormalize",
                   "--out", moe) == 0
    config = open_model(moe).config
    assert config.source_model_type == grown_config(config, "extra").source_model_type == family
    capsys.readouterr()
    assert bam_cli("export", moe, "--format", "source", "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    moe_format, mixtral_reason = MOE_FORMAT[family]
    assert err.count("\n") == 1 and f"cannot export to {family}: {family} is dense and this model has 2 FFN" in err
    assert err.strip().endswith(f"(use --format {moe_format})")
    if mixtral_reason is not None:
        assert bam_cli("export", moe, "--format", "mixtral", "--out", tmp_path / "out") == 2
        assert mixtral_reason in capsys.readouterr().err
    if moe_format != "hf":  # the export's own parity check compares the logits
        assert bam_cli("export", moe, "--format", moe_format, "--out", tmp_path / "out") == 0


def test_bam_mixture_of_a_family_is_refused_naming_attention_experts(tmp_path, capsys):
    from test_hf_import import make_hf_model

    make_hf_model("llama", tmp_path / "hf")
    assert bam_cli("mix", tmp_path / "hf", tmp_path / "hf", "--method", "bam", "--out", tmp_path / "moe") == 0
    capsys.readouterr()
    assert bam_cli("export", tmp_path / "moe", "--format", "source", "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "2 attention experts (BAM, KV experts) and llama one attention per layer" in err
    assert err.strip().endswith("(use --format hf)")


def test_model_trained_from_a_family_seed_exports_back_to_the_family(tmp_path):
    """The user's path: a Qwen3 checkpoint trained by `bam train`, then `--format source`: a
    Qwen3ForCausalLM with the trained model's logits (not the seed's)."""
    from _train_assets import VOCAB, build_assets
    from bam.formats.source import TOKENIZER_FILES
    from test_hf_import import make_hf_model

    assets = build_assets()
    seed = make_hf_model("qwen3", tmp_path / "seed", vocab_size=VOCAB)
    for name in TOKENIZER_FILES:
        if (assets.tokenizer / name).exists():
            shutil.copy2(assets.tokenizer / name, tmp_path / "seed" / name)
    assert bam_cli("train", tmp_path / "seed", "--out", tmp_path / "run", "--data", *assets.data("code"),
                   "--no-progress", "--max-steps", 2, "--batch-size", 2, "--seq-len", 32, "--lr", 1e-2,
                   "--warmup", 0, "--eval-every", 0, "--cache-dir", assets.cache) == 0
    trained = tmp_path / "run" / "model"
    assert open_model(trained).config.source_model_type == "qwen3"
    assert bam_cli("export", trained, "--format", "source", "--out", tmp_path / "out") == 0
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert type(exported) is transformers.Qwen3ForCausalLM
    with torch.no_grad():
        logits = exported(INPUT_IDS).logits
        assert (logits - load_model(trained)(INPUT_IDS).logits).abs().max().item() < 1e-4
        assert (logits - seed(INPUT_IDS).logits).abs().max().item() > 1e-3


def test_export_help_lists_every_format(capsys):
    with pytest.raises(SystemExit):
        bam_cli("export", "--help")
    text = " ".join(capsys.readouterr().out.split())
    for fmt in ("mixtral", "qwen2_moe", "source", "hf", *FAMILY_FORMATS):
        assert fmt in text
    assert f"{', '.join(FAMILY_FORMATS)}: a dense model in that family's format" in text
