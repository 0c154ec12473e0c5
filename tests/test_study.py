"""The study's settings and the add-expert experiment's bookkeeping, on hand-made numbers (fast); the
paper's ablations as study methods, and one tiny study of every method end to end (a few steps each)."""

import json
import math
import re
import sysconfig
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from _train_assets import paragraphs, prose_documents, write_jsonl
from bam.errors import BamError
from bam.formats.model_dir import open_model
from bam.mix.rules import tensor_rule
from bam.modeling.cost import summarize
from bam.modeling.layout import parameters
from bam.study.claims import (check_ablations, check_adapter_experts, new_expert_share, relative_to_btx,
                              summarize_add_expert)
from bam.study.methods import ADAPTER_EXPERT_METHODS, FULL_EXPERT_METHODS, recipe
from bam.study.report import METHOD_LABELS, write_report
from bam.study.results import ADD_EXPERT_ROLES, ModelKey, ModelRuns
from bam.study.settings import AddExpertSettings, StudySettings, demo_settings, load_pipeline_file
from bam.study.study import run_study

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
    # the section's fields override the preset's; the rest, its finetune section included, stay the preset's
    assert s.add_expert.finetune.values == demo_settings("tiny").add_expert.finetune.values


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


def test_relative_to_btx_is_hand_computed_beside_the_papers_table_1(tmp_path):
    """Each mixture's change in mean perplexity against BTX (DM), per domain and on the average; the
    paper's from its Table 1 (METHOD.md 6) for the domains it has."""
    def model(general, legal, other=10.0):
        ppl = {"general": general, "legal": legal, "other": other}
        return {"perplexity": {d: {"mean": v, "std": 0.0, "per_seed": [v]} for d, v in ppl.items()},
                "avg_ppl": {"mean": sum(ppl.values()) / 3, "std": 0.0, "per_seed": [sum(ppl.values()) / 3]}}

    models = {ModelKey.mixture("btx", "DM"): model(20.0, 10.0), ModelKey.mixture("bam", "DM"): model(18.0, 11.0),
              ModelKey.mixture("bam-shared", "CM"): model(20.0, 10.0, 13.0)}
    relative = relative_to_btx(models, ["general", "legal", "other"])
    rows = {row["model"]: row for row in relative["rows"]}
    assert list(rows) == [ModelKey.mixture("bam", "DM"), ModelKey.mixture("bam-shared", "CM")]  # Table 1's order
    bam = rows[ModelKey.mixture("bam", "DM")]
    assert bam["ours"] == pytest.approx({"general": -0.1, "legal": 0.1, "other": 0.0, "avg": 39 / 40 - 1})
    # Table 1: BAM KV experts DM 24.02 vs BTX 26.72 on general, 6.04 vs 6.63 on law; avg 9.705 vs 10.725
    assert bam["paper"] == pytest.approx({"general": 24.02 / 26.72 - 1, "legal": 6.04 / 6.63 - 1,
                                          "avg": 9.705 / 10.725 - 1})
    assert rows[ModelKey.mixture("bam-shared", "CM")]["ours"]["avg"] == pytest.approx(43 / 40 - 1)
    assert relative_to_btx({ModelKey.mixture("bam", "DM"): model(1.0, 1.0)}, ["general"]) is None
    results = {"title": "t", "summary": "", "domains": ["general", "legal", "other"], "seeds": [0], "corpus": {},
               "models": {}, "ordering": {}, "relative_to_btx": relative}
    write_report(results, tmp_path)
    md = (tmp_path / "report.md").read_text().split("## Relative to BTX (the paper's Table 1)")[1]
    assert "| BAM KV experts (DM) | -10.0% (-10.1%) | +10.0% (-8.9%) | +0.0% | -2.5% (-9.5%) |" in md


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


def test_a_pipeline_file_overrides_a_presets_training_sections_field_by_field(tmp_path):
    (tmp_path / "PIPELINE.yaml").write_text("demo: tiny\ncpt: {steps: 7}\nadapters: {lr_scale: 3}\n", encoding="utf-8")
    settings, _ = load_pipeline_file(tmp_path / "PIPELINE.yaml")
    tiny = demo_settings("tiny")
    assert settings.cpt.values == {**tiny.cpt.values, "steps": 7}
    assert settings.mixture.values == tiny.mixture.values and settings.adapters.lr_scale == 3
    assert settings.adapters.lora_rank == tiny.adapters.lora_rank


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


# ---------------------------------------------------------------------------------------------
# The paper's ablations as study methods (bam/study/methods.py)


def test_ablation_recipes_match_bams_parameters_by_hand(tiny_config):
    """Per layer of the conftest shape (d 64, 4 query / 2 KV heads of 16, d_ff 128): one attention is
    q 64*64 + k, v 32*64 + o 64*64 = 12288; one FFN expert 3*64*128 = 24576 plus its router row 64.
    BAM over BTX adds N-1 attentions and an attention router of N*64. Embeddings are the same in both."""
    dense = tiny_config()
    # N = 4: BAM adds 3*12288 + 256 = 37120 (total and active). Copies: 1 -> 24640 (12480 short),
    # 2 -> 49280 (12160 over): 2 copies, the paper's 6 experts. Active with 6 experts, top-k adds
    # (k-1)*24576 + 2*64: k=2 -> 24704 (12416 short), k=3 -> 49280 (12160 over): top-3 of 6, the paper's.
    assert (recipe("btx-param-matched", dense, 4).n_experts, recipe("btx-param-matched", dense, 4).top_k) == (6, 1)
    assert (recipe("btx-param-active-matched", dense, 4).n_experts,
            recipe("btx-param-active-matched", dense, 4).top_k) == (6, 3)
    assert recipe("btx-2n-experts", dense, 4).n_experts == 8
    # N = 3: BAM adds 2*12288 + 192 = 24768; one copy adds 24640 (128 short): 1 copy; top-2 of 4 adds
    # 24576 + 64 = 24640 active: top-2.
    assert recipe("btx-param-matched", dense, 3).seed_copies == 1
    assert recipe("btx-param-active-matched", dense, 3).top_k == 2
    # A wide FFN (d_ff 1024: one expert 196608) against BAM's 24768: still at least one copy.
    assert recipe("btx-param-matched", tiny_config(intermediate_size=1024), 3).seed_copies == 1
    plan = recipe("btx-param-matched", dense, 4)
    assert plan.weights() == [1.0] * 4 + [0.0] * 2
    assert plan.expert_names(["general", "code", "math", "legal"])[4:] == ["general copy 1", "general copy 2"]
    top2 = recipe("bam-shared-attn-top2", dense, 4).config(dense)
    assert (top2.attn_routing, top2.attn_top_k, top2.kv_shared, top2.n_attn_experts) == ("topk", 2, True, 4)
    assert recipe("bam", dense, 4).config(dense).attn_routing == "soft"


def test_ablation_methods_are_settings_of_any_study(tmp_path):
    path = tmp_path / "PIPELINE.yaml"
    path.write_text(yaml.safe_dump({"demo": "tiny", "methods": ["btx", "btx-param-matched", "bam-attn-top2"]}))
    assert load_pipeline_file(path)[0].methods == ["btx", "btx-param-matched", "bam-attn-top2"]
    assert demo_settings("tiny").methods == ["btx", "bam", "bam-shared"]
    assert demo_settings("tiny", ablations=True).methods == [
        "btx", "bam", "bam-shared", "btx-param-matched", "btx-2n-experts", "btx-param-active-matched",
        "bam-shared-attn-top1", "bam-shared-attn-top2"]
    with pytest.raises(BamError, match=r"methods: unknown method 'btx-6x1' \(expected btx, bam, bam-shared, "):
        StudySettings(methods=["btx-6x1"])
    with pytest.raises(BamError, match=r"methods: bam-attn-top2 needs more than 2 domains .*got 2"):
        StudySettings(domains={"general": "builtin", "code": "builtin"}, methods=["bam-attn-top2"])


def test_ablation_claims_on_hand_made_numbers():
    """Three seeds of average perplexities, each claim's verdict by hand."""
    s = StudySettings(methods=["btx", "bam", "bam-shared", "btx-param-matched", "bam-shared-attn-top1"])
    avg = {("btx", "DM"): [10, 10, 10], ("bam", "DM"): [9, 11, 9], ("btx-param-matched", "DM"): [12, 12, 8],
           ("btx", "CM"): [10, 10, 10], ("bam-shared", "CM"): [9, 9, 9], ("bam-shared-attn-top1", "CM"): [10, 11, 9.5]}
    models = {ModelKey.mixture(*key): {"avg_ppl": {"mean": sum(v) / 3, "per_seed": v}} for key, v in avg.items()}
    claims = check_ablations(models, s, {})["claims"]
    assert [(c["claim"], c["per_seed"], c["verdict"]) for c in claims] == [
        # bam 9, 11, 9 vs param-matched 12, 12, 8
        ("BTX with copies of the seed's FFN at BAM's total parameters does not catch up with BAM",
         [True, True, False], "seen in 2/3 seeds"),
        ("soft attention routing beats BTX", [True, True, True], "seen (3/3 seeds)"),
        # BTX 10 at most top-1's 10, 11, 9.5: a tie counts as "does not beat"
        ("top-1 attention routing does not beat BTX", [True, True, False], "seen in 2/3 seeds"),
        ("soft attention routing beats top-1", [True, True, True], "seen (3/3 seeds)"),
    ]
    assert check_ablations(models, StudySettings(), {}) is None  # no ablation ran


TINY_TRAIN = {"steps": 4, "batch_size": 4, "lr": 0.003, "warmup": 1, "save_every": 4}


def three_domains(root: Path) -> dict[str, str]:
    """Three domains of this machine's text: prose, the json package's code, the email package's."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])

    def package(name: str) -> list[str]:
        return [doc for f in sorted((stdlib / name).glob("*.py")) for doc in paragraphs(f.read_text(encoding="utf-8"))]

    return {"general": str(write_jsonl(root / "prose.jsonl", prose_documents())),
            "json": str(write_jsonl(root / "json.jsonl", package("json"))),
            "email": str(write_jsonl(root / "email.jsonl", package("email")))}


@pytest.fixture(scope="module")
def ablation_study(tmp_path_factory):
    """A tiny study of every mixture of full experts, the ablations included: three domains of this machine's text
    (prose, the json package's code, the email package's), a few steps per stage, two seeds."""
    root = tmp_path_factory.mktemp("ablations")
    domains, train = three_domains(root), TINY_TRAIN
    settings = StudySettings(domains=domains, preset="tiny", vocab_size=300, seq_len=32, pretrain=train,
                             cpt=train, mixture={**train, "steps": 6}, methods=list(FULL_EXPERT_METHODS),
                             eval_max_tokens=256, eval_batch_size=4, routing_max_tokens=128, seeds=[0, 1])
    out = root / "run"
    run_study(settings, out)
    return out, json.loads((out / "report" / "report.json").read_text())


def test_ablation_study_reports_each_claims_verdict(ablation_study):
    out, report = ablation_study
    models, claims = report["models"], report["ablations"]["claims"]
    # Every method ran data- and compute-matched, evaluated on every domain.
    assert {(m["method"], m["setting"]) for m in models.values() if m["group"] == "moe"} == {
        (method, setting) for method in FULL_EXPERT_METHODS for setting in ("DM", "CM")}
    assert all(set(m["perplexity"]) == {"general", "json", "email"} for m in models.values())
    # One claim per comparison the paper makes about what ran: 4 about parameter-matched BTX; for
    # each of bam and bam-shared, soft beats BTX, and per top-k, it does not beat BTX and soft beats it.
    assert len(claims) == 4 + 2 * (1 + 2 * 2)
    md = (out / "report" / "report.md").read_text()
    for claim in claims:
        # The verdict, recomputed from the two models' per-seed average perplexities.
        a, b = (models[claim[side]]["avg_ppl"]["per_seed"] for side in ("a", "b"))
        holds = [x < y if claim["relation"] == "<" else x <= y for x, y in zip(a, b)]
        assert claim["per_seed"] == holds and len(holds) == 2
        expected = {2: "seen (2/2 seeds)", 0: "not seen (0/2 seeds)", 1: "seen in 1/2 seeds"}[sum(holds)]
        assert claim["verdict"] == expected
        assert f"| {claim['claim']} | {claim['a']} " in md and f" | {expected} |" in md
        # The paper's parameter-matched table is data-matched, its routing table compute-matched.
        setting = "(CM)" if "attention routing" in claim["claim"] else "(DM)"
        assert claim["a"].endswith(setting) and claim["b"].endswith(setting)
    assert " ± " in md.split("## The paper's ablations")[1].split("## ")[0]  # the spread over the two seeds


def test_study_report_says_where_each_model_is(ablation_study):
    """report.json names each seed's copy of each model by its directory, and that directory holds the
    model whose costs the report lists."""
    out, report = ablation_study
    for name, model in report["models"].items():
        assert set(model["model_dirs"]) == {"0", "1"}, name
        first, second = (out / model["model_dirs"][seed] for seed in ("0", "1"))
        assert first != second, name
        for directory in (first, second):
            config = open_model(directory).config
            assert summarize(config, 32)["params_total"] == model["cost"]["params_total"], (name, directory)


def test_ablation_study_mixes_what_the_recipes_say(ablation_study):
    """The extra-copy BTX: its averaged tensors are BTX's (the real models' average, bit for bit), its
    FFN experts the domain experts' and the seed's copies; total parameters closest to BAM's."""
    out, report = ablation_study
    recipes = report["ablations"]["recipes"]
    cost = {name: m["cost"] for name, m in report["models"].items()}
    expert = (cost["BTX 2N experts (DM)"]["params_total"] - cost["BTX (DM)"]["params_total"]) / 3  # one FFN expert
    matched, bam = cost["BTX param-matched (DM)"]["params_total"], cost["BAM KV experts (DM)"]["params_total"]
    copies = recipes["btx-param-matched"]["seed_copies"]
    assert copies >= 1 and abs(matched - bam) <= abs(matched + expert - bam)
    assert copies == 1 or abs(matched - bam) <= abs(matched - expert - bam)
    stages = sorted(out.glob("stages/mix-btx-param-matched-*"))
    assert len(stages) == 2  # one per seed
    for stage in stages:
        mix_json = json.loads((stage / "model" / "mix.json").read_text())
        assert mix_json["weights"] == [1 / 3] * 3 + [0.0] * copies
        assert mix_json["sources"][3:] == [mix_json["sources"][0]] * copies  # the seed, the general expert
        btx = next(p for p in out.glob("stages/mix-btx-*") if re.fullmatch(r"mix-btx-[0-9a-f]{12}", p.name)
                   and json.loads((p / "model" / "mix.json").read_text())["seed"] == mix_json["seed"])
        mixed, plain = (load_file(str(d / "model" / "model.safetensors")) for d in (stage, btx))
        config = open_model(stage / "model").config
        assert config.n_ffn_experts == 3 + copies and config.ffn_top_k == 1
        averaged = [p.name for p in parameters(config) if tensor_rule(p, "btx").kind == "average"]
        assert "model.layers.0.attn.q_proj.weight" in averaged
        for name in averaged:
            assert torch.equal(mixed[name], plain[name]), name
        down = "model.layers.0.ffn.experts.down_proj"
        assert torch.equal(mixed[down][:3], plain[down])
        assert torch.equal(mixed[down][3:], plain[down][:1].expand(copies, *plain[down].shape[1:]))
    for method, k in (("bam-shared-attn-top1", 1), ("bam-attn-top2", 2)):
        config = json.loads(next(out.glob(f"stages/mix-{method}-*/model/config.json")).read_text())
        assert (config["attn_routing"], config["attn_top_k"], config["n_attn_experts"]) == ("topk", k, 3)


# ---------------------------------------------------------------------------------------------
# Adapter experts as study methods (issue 17; bam/study/methods.py ADAPTER_EXPERT_METHODS)


def test_adapter_methods_and_settings_are_parsed_and_refused_by_name(tmp_path):
    s = StudySettings(methods=["bam", "lora-bam-param-mixing", "ia3-bam", "lora-btx"])
    assert s.adapter_kinds == ["lora", "ia3"] and StudySettings().adapter_kinds == []
    assert s.adapters.config_fields("lora") == {
        "adapter": "lora", "adapter_targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                               "down_proj"], "lora_rank": 8, "lora_alpha": 16.0}
    assert s.adapters.config_fields("ia3") == {"adapter": "ia3", "adapter_targets": ["k_proj", "v_proj", "down_proj"]}
    path = tmp_path / "PIPELINE.yaml"
    path.write_text(yaml.safe_dump({"demo": "tiny", "methods": ["lora-bam"],
                                    "adapters": {"lora_rank": 4, "lora_targets": ["down_proj", "q_proj"]}}))
    loaded = load_pipeline_file(path)[0]
    assert loaded.adapters.lora_rank == 4 and loaded.adapters.lora_alpha == 16.0
    assert loaded.adapters.config_fields("lora")["adapter_targets"] == ["q_proj", "down_proj"]  # the config's order
    assert loaded.record()["adapters"]["lora_rank"] == 4
    with pytest.raises(BamError, match=r"methods: unknown method 'lora-nexus'"):
        StudySettings(methods=["lora-nexus"])
    with pytest.raises(BamError, match=r"adapters.lora_rank=0: expected a positive integer"):
        StudySettings(adapters={"lora_rank": 0})
    with pytest.raises(BamError, match=r"adapters.ia3_targets=\['q_proj', 'o_proj'\]: expected a non-empty list"):
        StudySettings(adapters={"ia3_targets": ["q_proj", "o_proj"]})
    with pytest.raises(BamError, match=r"adapters.rank: unknown field"):
        StudySettings(adapters={"rank": 8})
    with pytest.raises(BamError, match=r"adapters.lr_scale=0: expected a positive number"):
        StudySettings(adapters={"lr_scale": 0})
    with pytest.raises(BamError, match=r"adapters.mixture_train_only: train_only='routers,seed': unknown group 'seed'"):
        StudySettings(adapters={"mixture_train_only": "routers,seed"})
    scaled = StudySettings(cpt={"lr": 2e-3}, adapters={"lr_scale": 5})
    assert scaled.adapters.cpt_training(scaled.cpt).values == {**scaled.cpt.values, "lr": pytest.approx(1e-2)}
    assert scaled.adapters.mixture_training(scaled.mixture).values == {
        **scaled.mixture.values, "lr": pytest.approx(5e-3), "train_only": "routers,adapter,embeddings,norms"}
    frozen = StudySettings(adapters={"mixture_train_only": "routers,adapter"})
    assert frozen.adapters.mixture_training(frozen.mixture).values["train_only"] == "routers,adapter"
    unscaled = StudySettings(adapters={"lr_scale": 1})
    assert unscaled.adapters.cpt_training(unscaled.cpt) is unscaled.cpt  # lr_scale 1: the full methods' own section
    assert demo_settings("tiny").methods == ["btx", "bam", "bam-shared"]  # the default demo is unchanged
    assert demo_settings("tiny", adapters=True).methods == [
        "btx", "bam", "bam-shared", "lora-btx", "lora-bam", "lora-bam-param-mixing", "ia3-bam"]


def test_adapter_recipes_configure_the_mixture_by_method(tiny_config):
    dense, fields = tiny_config(), StudySettings().adapters
    adapters = {kind: fields.config_fields(kind) for kind in ("lora", "ia3")}

    def config(method):
        return recipe(method, dense, 4, adapters=adapters).config(dense)

    bam, mixing_params, btx = config("lora-bam"), config("lora-bam-param-mixing"), config("lora-btx")
    assert bam.adapter_experts
    assert (bam.adapter, bam.lora_rank, bam.n_attn_experts, bam.n_ffn_experts) == ("lora", 8, 4, 4)
    assert (bam.attn_mixing, mixing_params.attn_mixing, bam.kv_shared) == ("outputs", "parameters", False)
    assert btx.n_attn_experts == 1 and btx.adapter_targets == ["gate_proj", "up_proj", "down_proj"]
    assert config("lora-bam-shared").kv_shared
    assert config("ia3-bam").adapter_targets == ["k_proj", "v_proj", "down_proj"]


def test_adapter_claims_on_hand_made_numbers():
    """Two seeds: seed avg 20, 20; full BAM 10, 12; lora-bam 13, 15 closes 7/10 and 5/8 of BAM's gain."""
    s = StudySettings(methods=["bam", "lora-bam", "lora-bam-param-mixing"], seeds=[0, 1])

    def model(avg, total, twin=None, rate=None):
        cost = {"params_total": total, "params_active": total, "flops_per_token": 1000, "kv_cache_bytes_per_token": 64,
                "full_experts": twin and {"params_total": twin, "params_active": twin, "flops_per_token": 2000,
                                          "kv_cache_bytes_per_token": 64}, "train_tokens_per_s": rate}
        return {"avg_ppl": {"mean": sum(avg) / 2, "per_seed": avg}, "cost": cost}

    models = {ModelKey.seed(): model([20, 20], 100), ModelKey.mixture("bam", "DM"): model([10, 12], 300, rate=50),
              ModelKey.mixture("lora-bam", "DM"): model([13, 15], 125, twin=300, rate=40),
              ModelKey.mixture("lora-bam-param-mixing", "DM"): model([12, 16], 125, twin=300, rate=80)}
    section = check_adapter_experts(models, s, {})
    row = section["rows"]["lora-bam"]
    assert row["gain_closed"]["per_seed"] == pytest.approx([0.7, 0.625])
    assert row["params_vs_seed"] == 1.25 and row["full_experts_vs_seed"] == 3.0
    assert [(c["per_seed"], c["verdict"]) for c in section["claims"]] == [
        ([True, True], "seen (2/2 seeds)"),  # 1.25x: at most 1.25x
        ([True, False], "seen in 1/2 seeds"),  # 70% >= 70%, 62.5% < 70%
        ([False, True], "seen in 1/2 seeds"),  # outputs 13 vs 12, 15 vs 16
    ]
    assert "train tokens/s 40 vs 80" in section["claims"][2]["ours"]
    assert check_adapter_experts(models, StudySettings(methods=["bam"]), {}) is None
    no_bam = check_adapter_experts({k: v for k, v in models.items() if k != ModelKey.mixture("bam", "DM")}, s, {})
    assert no_bam["rows"]["lora-bam"]["gain_closed"] is None
    assert no_bam["claims"][1]["verdict"] == "cannot say (full BAM (DM) did not run)"


@pytest.fixture(scope="module")
def adapter_study(tmp_path_factory):
    """A tiny study of every method of adapter experts beside full BTX and BAM: three domains of this
    machine's text, a few steps per stage, one seed."""
    root = tmp_path_factory.mktemp("adapters")
    domains, train = three_domains(root), TINY_TRAIN
    settings = StudySettings(domains=domains, preset="tiny", vocab_size=300, seq_len=32, pretrain=train,
                             cpt={**train, "steps": 5}, mixture={**train, "steps": 6},
                             methods=["btx", "bam", *ADAPTER_EXPERT_METHODS], adapters={"lora_rank": 4, "lr_scale": 2},
                             eval_max_tokens=256, eval_batch_size=4, routing_max_tokens=128, seeds=[0])
    out = root / "run"
    run_study(settings, out)
    return out, json.loads((out / "report" / "report.json").read_text())


def metrics_steps(run: Path) -> int:
    return max(json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines())


def test_adapter_experts_are_peft_adapters_trained_like_the_full_experts(adapter_study):
    out, report = adapter_study
    for domain in ("json", "email"):
        full = next(out.glob(f"stages/expert-{domain}-*"))
        for kind, targets in (("lora", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
                              ("ia3", ["k_proj", "v_proj", "down_proj"])):
            stages = list(out.glob(f"stages/adapter-{kind}-{domain}-*"))
            assert len(stages) == 1  # one per kind and domain, shared by every method of that kind
            adapter = json.loads((stages[0] / "run" / "model" / "adapter_config.json").read_text())
            assert adapter["peft_type"] == kind.upper() and sorted(adapter["target_modules"]) == sorted(targets)
            assert kind == "ia3" or adapter["r"] == 4
            assert (stages[0] / "run" / "model" / "adapter_model.safetensors").exists()
            # data-matched: the same steps and the same data weights as the full expert of the domain
            assert metrics_steps(stages[0] / "run") == metrics_steps(full / "run") == 5
            run, full_run = (json.loads((d / "run" / "run.json").read_text())["fingerprint"] for d in (stages[0], full))
            assert run["data"] == full_run["data"]
            assert run["train"] == {**full_run["train"], "lr": run["train"]["lr"], "adapter": run["train"]["adapter"]}
            assert run["train"]["lr"] == pytest.approx(2 * full_run["train"]["lr"])  # adapters.lr_scale
            assert f"{'LoRA' if kind == 'lora' else '(IA)³'} expert {domain}" in report["models"]


def test_adapter_mixtures_are_configured_by_method_and_trained_data_matched(adapter_study):
    out, report = adapter_study
    expected = {"lora-btx": ("lora", 1, "outputs"), "lora-bam": ("lora", 3, "outputs"),
                "lora-bam-shared": ("lora", 3, "outputs"), "lora-bam-param-mixing": ("lora", 3, "parameters"),
                "ia3-bam": ("ia3", 3, "outputs"), "ia3-bam-param-mixing": ("ia3", 3, "parameters")}
    for method, (kind, n_attn, mixing) in expected.items():
        stage, = (p for p in out.glob(f"stages/mix-{method}-*")
                  if re.fullmatch(rf"mix-{method}-[0-9a-f]{{12}}", p.name))
        config = json.loads((stage / "model" / "config.json").read_text())
        assert config["adapter_experts"] and config["adapter"] == kind and config["n_ffn_experts"] == 3
        assert (config["n_attn_experts"], config["attn_mixing"]) == (n_attn, mixing)
        assert config["kv_shared"] == (method == "lora-bam-shared")
        assert json.loads((stage / "model" / "mix.json").read_text())["base_expert"] is True
        trained, = (p / "run" for p in out.glob(f"stages/mixture-{method}-*")
                    if re.fullmatch(rf"mixture-{method}-[0-9a-f]{{12}}", p.name))
        btx = next(out.glob("stages/mixture-btx-*/run"))
        assert metrics_steps(trained) == metrics_steps(btx) == 6
        train, btx_train = (json.loads((r / "run.json").read_text())["fingerprint"]["train"] for r in (trained, btx))
        assert train["train_only"] == "routers,adapter,embeddings,norms" and train["lr"] == pytest.approx(2 * btx_train["lr"])
        # The seed's projections stay frozen under the adapters; the embeddings, LM head and norms,
        # held once and shared by every expert, train with the routers and adapters.
        mixed, after = (load_file(d / "model" / "model.safetensors") for d in (stage, trained))
        seed_weights = {name: t for name, t in mixed.items() if "adapter" not in name and "router" not in name}
        for name, tensor in seed_weights.items():
            moved = not torch.equal(tensor, after[name])
            assert moved == (name.endswith(("embed_tokens.weight", "lm_head.weight")) or "norm" in name), name
        assert any(not torch.equal(mixed[n], after[n]) for n in mixed if "adapter" in n or "router" in n)
        model = report["models"][f"{METHOD_LABELS[method]} (DM)"]
        assert set(model["perplexity"]) == {"general", "json", "email"}
        assert model["cost"]["full_experts"]["params_total"] > model["cost"]["params_total"]
        assert f"{METHOD_LABELS[method]} (CM)" not in report["models"]  # data-matched only


def test_adapter_report_rows_and_verdicts_follow_from_the_numbers(adapter_study):
    out, report = adapter_study
    section, models = report["adapter_experts"], report["models"]
    seed, bam = models["seed"], models["BAM KV experts (DM)"]
    md = (out / "report" / "report.md").read_text().split("## Adapter experts")[1].split("\n## ")[0]
    for method, row in section["rows"].items():
        model = models[row["name"]]
        # recomputed: the share of full BAM's gain over the seed, and parameters against the seed's
        s, m, b = (x["avg_ppl"]["mean"] for x in (seed, model, bam))
        closes = (s - m) / (s - b) if s > b else None
        assert (row["gain_closed"] is None) == (closes is None)
        if closes is not None:
            assert row["gain_closed"]["mean"] == pytest.approx(closes)
            assert f"| {row['name']} | {m:.2f} | {closes:.1%} |" in md
        assert row["params_vs_seed"] == pytest.approx(model["cost"]["params_total"] / seed["cost"]["params_total"])
        assert row["train_tokens_per_s"] == model["cost"]["train_tokens_per_s"] > 0
    claims = {c["claim"]: c for c in section["claims"]}
    held = claims["lora-bam holds at most 1.25x the seed's parameters"]
    assert held["per_seed"] == [section["rows"]["lora-bam"]["params_vs_seed"] <= 1.25]
    mixing = claims["lora-bam: mixing attention outputs (BAM) beats mixing parameters (MoLoRA)"]
    outputs, params = (models[section["rows"][m]["name"]]["avg_ppl"]["per_seed"]
                       for m in ("lora-bam", "lora-bam-param-mixing"))
    assert mixing["per_seed"] == [outputs[0] < params[0]]
    assert len(claims) == 4  # the two about lora-bam, and outputs vs parameters for LoRA and (IA)³
    for claim in claims.values():
        assert f"| {claim['claim']} | {claim['ours']} | {claim['verdict']} |" in md
