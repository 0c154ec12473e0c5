"""The study's settings and the add-expert experiment's bookkeeping, on hand-made numbers (fast)."""

import json
import math
import re
from pathlib import Path

import pytest
import yaml

from bam.errors import BamError
from bam.study.claims import new_expert_share, summarize_add_expert
from bam.study.report import write_report
from bam.study.results import ADD_EXPERT_ROLES, ModelKey, ModelRuns
from bam.study.settings import AddExpertSettings, StudySettings, load_pipeline_file

DOMAINS = {"general": "builtin", "code": "builtin", "math": "builtin", "legal": "builtin"}


def settings(**add_expert) -> StudySettings:
    return StudySettings(domains=dict(DOMAINS), seeds=[0, 1],
                         add_expert={"domain": "legal", "finetune": {"steps": 7}, **add_expert})


def test_add_expert_settings_are_parsed_and_validated():
    s = settings()
    assert isinstance(s.add_expert, AddExpertSettings)
    assert s.add_expert.finetune.steps == 7 and s.add_expert.method == "nexus"
    with pytest.raises(BamError, match=r"add_expert.domain='general'.*expert domains \(code, math, legal\)"):
        settings(domain="general")
    with pytest.raises(BamError, match=r"add_expert.method='btx'"):
        settings(method="btx")
    with pytest.raises(BamError, match=r"add_expert.typo: unknown field"):
        settings(typo=1)
    with pytest.raises(BamError, match=r"steps=0: expected a positive integer"):
        settings(finetune={"steps": 0})
    with pytest.raises(BamError, match="at least two expert domains"):
        StudySettings(domains={"general": "builtin", "legal": "builtin"}, add_expert={"domain": "legal"})


def test_pipeline_file_accepts_an_add_expert_section(tmp_path):
    path = tmp_path / "PIPELINE.yaml"
    path.write_text(yaml.safe_dump({"demo": "tiny", "add_expert": {"domain": "code", "method": "nexus-bam"}}))
    s, _ = load_pipeline_file(path)
    assert s.add_expert.domain == "code" and s.add_expert.method == "nexus-bam"
    assert s.add_expert.finetune.steps == 50  # the section replaces the preset's, defaults fill the rest


def test_own_domains_on_a_demo_preset_drop_its_add_expert_experiment(tmp_path):
    path = tmp_path / "PIPELINE.yaml"
    path.write_text(yaml.safe_dump({"demo": "tiny", "domains": {"general": "a.txt", "code": "b.txt"}}))
    assert load_pipeline_file(path)[0].add_expert is None
    path.write_text(yaml.safe_dump({"demo": "tiny"}))
    assert load_pipeline_file(path)[0].add_expert.domain == "legal"


def routing(shares_per_layer: list[float], n_experts: int) -> dict:
    """FFN routing [layer][domain][expert] where only legal's share of the last expert matters."""
    layers = []
    for share in shares_per_layer:
        rest = (1 - share) / (n_experts - 1)
        legal = [rest] * (n_experts - 1) + [share]
        layers.append([[1 / n_experts] * n_experts] * 3 + [legal])
    return {"ffn": layers, "attn": None}


def evaluation(ppl: dict, shares=None, n_experts=3) -> dict:
    return {"perplexity": ppl, "routing": routing(shares, n_experts) if shares else None}


def test_summary_of_the_add_expert_experiment_is_hand_computed():
    s = settings()
    old = {"general": 10.0, "code": 20.0, "math": 30.0}  # mean 20
    runs = {  # role -> per seed (legal ppl, old ppl scale, share per layer of 2 layers)
        "dense": [(5.0, 2.0, None), (5.0, 2.0, None)],
        "before": [(40.0, 1.0, [0.9, 0.9]), (50.0, 1.0, [0.9, 0.9])],
        "added": [(30.0, 1.1, [0.6, 0.8]), (30.0, 1.1, [0.5, 0.7])],
        "added-finetuned": [(16.0, 1.05, [0.8, 1.0]), (24.0, 1.0, [0.2, 0.4])],
        "reset": [(32.0, 1.1, [0.3, 0.3]), (31.0, 1.1, [0.3, 0.3])],
        "reset-finetuned": [(20.0, 1.0, [0.5, 0.5]), (20.0, 1.0, [0.4, 0.4])],
    }
    per_seed = {}
    for role, seeds in runs.items():
        key = ModelKey.expert("legal") if role == "dense" else ModelKey.add_expert(s.add_expert, role)
        per_seed[key] = ModelRuns(dict(zip(s.seeds, [
            evaluation({**{d: v * scale for d, v in old.items()}, "legal": legal}, shares,
                       n_experts=2 if role == "before" else 3)
            for legal, scale, shares in seeds])))
    summary = summarize_add_expert(s, per_seed)
    rows = summary["rows"]
    assert list(rows) == ["dense", *ADD_EXPERT_ROLES]
    assert rows["added-finetuned"]["new_ppl"]["per_seed"] == [16.0, 24.0]
    assert rows["added-finetuned"]["old_avg_ppl"]["per_seed"] == pytest.approx([21.0, 20.0])
    assert rows["added-finetuned"]["new_expert_share"]["per_seed"] == pytest.approx([0.9, 0.3])
    assert rows["before"]["new_expert_share"] is None  # its last expert is an old one
    assert rows["dense"]["new_expert_share"] is None
    assert rows["added-finetuned"]["steps_after_adding"] == 7 and rows["added"]["steps_after_adding"] == 0
    assert summary["checks"] == {"adding lowers legal perplexity": [True, True],
                                 "Nexus router beats linear reset on legal": [True, False],
                                 "most legal tokens go to the new expert": [True, False]}
    # relative improvement over the reset router: mean of (1 - 16/20, 1 - 24/20) = (0.2 - 0.2) / 2 = 0
    assert "a relative improvement of +0.0% for Nexus (better in 1/2 seeds" in summary["lines"][1]
    assert "60.0% (above 50% in 1/2 seeds); linear reset finetuned: 45.0%" in summary["lines"][2]
    assert "+2.5% relative to before adding" in summary["lines"][3]  # mean of +5% and 0%


def test_new_expert_share_averages_layers_of_the_new_domain_row():
    assert new_expert_share(evaluation({}, [0.25, 0.75]), 3) == pytest.approx(0.5)
    assert new_expert_share({"routing": None}, 3) is None


def test_report_has_the_add_expert_section_and_keeps_it_out_of_the_main_table(tmp_path):
    s = settings()
    ppl = {d: {"mean": 10.0, "std": 0.0, "per_seed": [10.0, 10.0]} for d in DOMAINS}
    cost = {"params_total": 1e6, "params_active": 5e5, "flops_per_token": 1e6, "kv_cache_bytes_per_token": 64}

    def model(group, shares=None, n=3):
        return {"group": group, "method": None, "setting": None, "perplexity": ppl,
                "avg_ppl": {"mean": 10.0, "std": 0.0, "per_seed": [10.0, 10.0]}, "cost": cost, "metrics": None,
                "routing": routing(shares, n) if shares else None, "expert_names": None, "bpb": {}}

    models = {ModelKey.seed(): model("dense"), ModelKey.expert("legal"): model("expert")}
    per_seed = {ModelKey.expert("legal"): ModelRuns(dict.fromkeys(s.seeds, evaluation({**{d: 10.0 for d in DOMAINS}})))}
    for role in ADD_EXPERT_ROLES:
        key = ModelKey.add_expert(s.add_expert, role)
        n = 2 if role == "before" else 3
        models[key] = model("add-expert", [0.7, 0.7], n)
        per_seed[key] = ModelRuns(dict.fromkeys(s.seeds, evaluation({d: 10.0 for d in DOMAINS}, [0.7, 0.7], n)))
    results = {"title": "t", "summary": "", "domains": list(DOMAINS), "seeds": [0, 1], "corpus": {},
               "models": models, "ordering": {}, "add_expert": summarize_add_expert(s, per_seed)}
    write_report(results, tmp_path)
    md = (tmp_path / "report.md").read_text()
    main_table = md.split("## Held-out perplexity")[1].split("## ")[0]
    assert "Nexus" not in main_table and "| seed |" in main_table
    section = md.split("## Adding an expert later: legal")[1].split("## Cost")[0]
    assert "| Nexus + legal, finetuned | 7 | 10.00 | 10.00 | +0.0% | 70.0% |" in section
    assert (tmp_path / "add_expert.png").stat().st_size > 0
    assert json.loads((tmp_path / "report.json").read_text())["add_expert"]["domain"] == "legal"
    assert not math.isnan(results["add_expert"]["rows"]["added"]["new_expert_share"]["mean"])


def test_pretrain_steps_0_skips_pretraining_of_a_given_seed_model():
    """The README's PIPELINE.yaml example: `pretrain: {steps: 0}` with `seed_model` uses the seed as is."""
    domains = {"general": "builtin", "code": "builtin"}
    s = StudySettings(domains=domains, seed_model="path/to/seed", pretrain={"steps": 0})
    assert s.pretrain.steps == 0
    with pytest.raises(BamError, match=r"pretrain: steps=0 skips pretraining, which needs seed_model"):
        StudySettings(domains=domains, pretrain={"steps": 0})
    with pytest.raises(BamError, match=r"cpt: max_steps=0: expected a positive integer"):
        StudySettings(domains=domains, seed_model="path/to/seed", cpt={"steps": 0})
    with pytest.raises(BamError, match=r"pretrain: max_steps=-1: expected a positive integer"):
        StudySettings(domains=domains, seed_model="path/to/seed", pretrain={"steps": -1})


def test_the_readmes_pipeline_example_is_valid(tmp_path):
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    example = re.search(r"```yaml\n(.*?)```", readme, re.S).group(1)
    (tmp_path / "PIPELINE.yaml").write_text(example, encoding="utf-8")
    settings, out = load_pipeline_file(tmp_path / "PIPELINE.yaml")
    assert settings.pretrain.steps == 0 and settings.seed_model and settings.add_expert.domain == "medical"
    assert out == Path("runs/my-study")
