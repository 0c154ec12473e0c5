"""From per-seed evaluations to the study's results: each model's statistics over seeds, the paper's
claims (METHOD.md section 6) and the add-expert experiment's (METHOD.md 3.3) checked per seed, so the
report can say how stable they are. `assemble` builds the `results` that report.py writes.
"""

from __future__ import annotations

import json
import operator
import statistics
from pathlib import Path

from bam.study.methods import ADAPTER_EXPERT_METHODS, ATTENTION_TOPK
from bam.study.report import METHOD_LABELS, model_label
from bam.study.results import ADD_EXPERT_ROLES, ModelKey, ModelRuns
from bam.study.settings import StudySettings


def _stat(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "per_seed": values}


def assemble(settings: StudySettings, runs: dict[ModelKey, ModelRuns], corpus: dict, provenance: dict,
             title: str, recipes: dict[str, dict] | None = None,
             adapter_recipes: dict[str, dict] | None = None) -> dict:
    """The study's results (report.py's input): `runs` in the order they were recorded, summarized.
    `recipes`: how each ablation method was mixed (Study.recipe_record), for the ablations section;
    `adapter_recipes`: how each method of adapter experts was (AdapterRecipe, its `describe`)."""
    domains = list(settings.domains)
    models = {}
    for key, model in runs.items():
        evals = [model.evals[seed] for seed in settings.seeds]
        ppl = {d: _stat([e["perplexity"][d] for e in evals]) for d in domains}
        avg = _stat([statistics.fmean(e["perplexity"][d] for d in domains) for e in evals])
        cost = dict(evals[0]["cost"])
        if model.metrics:
            rates = [json.loads(line).get("tokens_per_s") for line in Path(model.metrics).read_text().splitlines()]
            rates = [r for r in rates if r]
            if rates:
                cost["train_tokens_per_s"] = statistics.median(rates)
        models[key] = {"perplexity": ppl, "avg_ppl": avg, "cost": cost, "metrics": model.metrics,
                       "model_dirs": dict(model.model_dirs),
                       "routing": evals[0].get("routing"), "expert_names": model.expert_names,
                       "bpb": {d: statistics.fmean(e["bpb"][d] for e in evals) for d in domains}}
    ordering = check_ordering(models, domains, settings)
    summary = (f"{len(settings.seeds)} seed(s) {settings.seeds}; experts: "
               f"{', '.join(settings.expert_domains)} + the seed as the {settings.general_domain} expert; "
               f"mixture training {settings.mixture.steps} steps x {settings.mixture.batch_size} x "
               f"{settings.seq_len} tokens (data-matched).")
    return {"title": title, "summary": summary, "domains": domains, "seeds": settings.seeds,
            "settings": settings.record(), "corpus": corpus, "provenance": provenance, "models": models,
            "ordering": ordering, "relative_to_btx": relative_to_btx(models, domains),
            "add_expert": summarize_add_expert(settings, runs),
            "ablations": check_ablations(models, settings, recipes or {}),
            "adapter_experts": check_adapter_experts(models, settings, adapter_recipes or {})}


def check_ordering(models: dict[ModelKey, dict], domains: list[str], settings: StudySettings) -> dict:
    """The paper's claims (METHOD.md section 6), checked per seed so the report can say how stable."""
    n_seeds = len(settings.seeds)
    lines, checks = [], {}

    def avg(key: ModelKey, i: int) -> float:
        return models[key]["avg_ppl"]["per_seed"][i]

    for setting in ("DM", "CM"):
        btx = ModelKey.mixture("btx", setting)
        for method in ("bam", "bam-shared"):
            key = ModelKey.mixture(method, setting)
            if key not in models or btx not in models:
                continue
            wins = [avg(key, i) < avg(btx, i) for i in range(n_seeds)]
            checks[f"{method} < btx ({setting})"] = wins
            lines.append(f"{model_label(key)} average perplexity below {model_label(btx)}: {sum(wins)}/{n_seeds} "
                         f"seeds ({models[key]['avg_ppl']['mean']:.3f} vs {models[btx]['avg_ppl']['mean']:.3f})")
    dense = [key for key in models if key.group in ("dense", "expert")]
    for domain in settings.expert_domains:
        expert = ModelKey.expert(domain)
        ppl = {key: models[key]["perplexity"][domain]["per_seed"] for key in dense}
        wins = [all(ppl[expert][i] <= other[i] for other in ppl.values()) for i in range(n_seeds)]
        checks[f"expert {domain} best dense on {domain}"] = wins
        lines.append(f"{model_label(expert)} is the best dense model on {domain}: {sum(wins)}/{n_seeds} seeds")
    return {"checks": checks, "lines": lines}


# ---------------------------------------------------------------------------------------------
# Relative to BTX: the paper's Table 1 (METHOD.md section 6), whose absolute perplexities no other
# seed and corpus can match, compared as each mixture's change against BTX

# Table 1's per-domain perplexities (590M seed), by the built-in corpus's domain names (its "law" is legal).
PAPER_TABLE_1 = {
    ("btx", "DM"): {"general": 26.72, "code": 3.78, "legal": 6.63, "math": 5.77},
    ("bam", "DM"): {"general": 24.02, "code": 3.45, "legal": 6.04, "math": 5.31},
    ("bam", "CM"): {"general": 24.84, "code": 3.53, "legal": 6.21, "math": 5.43},
    ("bam-shared", "DM"): {"general": 25.67, "code": 3.64, "legal": 6.39, "math": 5.57},
    ("bam-shared", "CM"): {"general": 26.00, "code": 3.72, "legal": 6.50, "math": 5.63},
}


def relative_to_btx(models: dict[ModelKey, dict], domains: list[str]) -> dict | None:
    """Per Table 1 mixture that ran: its mean perplexity's change against BTX's (data-matched; BTX is
    also the compute-matched reference), per domain and on the average, ours and the paper's (the
    paper's only for domains it has; its average over its four). None when BTX did not run."""
    btx = models.get(ModelKey.mixture("btx", "DM"))
    if btx is None:
        return None
    paper_btx = PAPER_TABLE_1["btx", "DM"]

    def change(value: float, reference: float) -> float:
        return value / reference - 1.0

    rows = []
    for (method, setting), paper in PAPER_TABLE_1.items():
        key = ModelKey.mixture(method, setting)
        if method == "btx" or key not in models:
            continue
        ours = {d: change(models[key]["perplexity"][d]["mean"], btx["perplexity"][d]["mean"]) for d in domains}
        ours["avg"] = change(models[key]["avg_ppl"]["mean"], btx["avg_ppl"]["mean"])
        theirs = {d: change(paper[d], paper_btx[d]) for d in domains if d in paper}
        theirs["avg"] = change(statistics.fmean(paper.values()), statistics.fmean(paper_btx.values()))
        rows.append({"model": key, "ours": ours, "paper": theirs})
    return {"reference": ModelKey.mixture("btx", "DM"), "rows": rows}


# ---------------------------------------------------------------------------------------------
# The paper's ablations (METHOD.md section 6, Tables 4-6; bam/study/methods.py)

# The paper's average perplexities (its small scale, 4 domains) that each claim rests on.
PAPER_AVG_PPL = {"bam": 9.71, "btx": 10.73, "btx-param-matched": 11.41, "btx-2n-experts": 11.18,
                 "btx-param-active-matched": 9.85}  # parameter-matched table: data-matched, mean of 4 domains
PAPER_ROUTING_AVG_PPL = {"btx": 10.72, "soft": 10.47, 1: 10.81, 2: 10.72}  # attention routing, compute-matched
RELATIONS = {"<": operator.lt, "<=": operator.le}


def ablation_claims(methods: list[str], compute_matched: bool) -> list[dict]:
    """The paper's claims about the ablations among `methods`, each "a's average perplexity is below
    b's" (relation "<") or "a's is at most b's" ("<=", for "b does not beat a"), in one setting:
    the parameter-matched table is data-matched, the routing table compute-matched (DM when the study
    does not compute-match)."""
    claims = []

    def claim(text: str, a: str, b: str, setting: str, paper: tuple[float, float], relation: str = "<") -> None:
        if a in methods and b in methods:
            claims.append({"claim": text, "a": ModelKey.mixture(a, setting), "b": ModelKey.mixture(b, setting),
                           "relation": relation, "paper": paper})

    p = PAPER_AVG_PPL
    claim("BTX with copies of the seed's FFN at BAM's total parameters does not catch up with BAM",
          "bam", "btx-param-matched", "DM", (p["bam"], p["btx-param-matched"]))
    claim("BTX with twice the experts (copies of the seed's FFN) does not catch up with BAM",
          "bam", "btx-2n-experts", "DM", (p["bam"], p["btx-2n-experts"]))
    claim("BTX at BAM's total and active parameters (top-k of the copies) comes closer to BAM than BTX",
          "btx-param-active-matched", "btx", "DM", (p["btx-param-active-matched"], p["btx"]))
    claim("BTX at BAM's total and active parameters (top-k of the copies) stays behind BAM",
          "bam", "btx-param-active-matched", "DM", (p["bam"], p["btx-param-active-matched"]))
    routing = "CM" if compute_matched else "DM"
    r = PAPER_ROUTING_AVG_PPL
    for soft in ("bam", "bam-shared"):
        topk = [m for m in methods if ATTENTION_TOPK.get(m, (None,))[0] == soft]
        if topk:
            claim("soft attention routing beats BTX", soft, "btx", routing, (r["soft"], r["btx"]))
        for method in topk:
            k = ATTENTION_TOPK[method][1]
            claim(f"top-{k} attention routing does not beat BTX", "btx", method, routing, (r["btx"], r[k]), "<=")
            claim(f"soft attention routing beats top-{k}", soft, method, routing, (r["soft"], r[k]))
    return claims


def verdict(holds: list[bool]) -> str:
    """Whether we see a claim: in every seed, in none, or in some."""
    n, k = len(holds), sum(holds)
    return f"seen ({k}/{n} seeds)" if k == n else f"not seen (0/{n} seeds)" if k == 0 else f"seen in {k}/{n} seeds"


def check_ablations(models: dict[ModelKey, dict], settings: StudySettings, recipes: dict[str, dict]) -> dict | None:
    """Each of the paper's ablation claims whose models ran, checked per seed, with both sides' average
    perplexity over seeds; None when the study ran no ablation."""
    claims = []
    for claim in ablation_claims(settings.methods, settings.compute_matched):
        a, b = (models[claim[side]]["avg_ppl"] for side in ("a", "b"))
        holds = [RELATIONS[claim["relation"]](x, y) for x, y in zip(a["per_seed"], b["per_seed"])]
        claims.append({**claim, "a_avg_ppl": a, "b_avg_ppl": b, "per_seed": holds, "verdict": verdict(holds)})
    if not claims and not recipes:
        return None
    return {"recipes": recipes, "claims": claims}


# ---------------------------------------------------------------------------------------------
# Adapter experts (issue 17, METHOD.md 7; bam/study/methods.py)

COST_KEYS = ("params_total", "params_active", "flops_per_token", "kv_cache_bytes_per_token")
SEED_PARAMS_LIMIT = 1.25  # issue 17: lora-bam holds at most 1.25x the seed's parameters
GAIN_CLOSED_TARGET = 0.7  # issue 17: lora-bam closes at least 70% of full BAM's average gain over the seed
FULL_BAM = ModelKey.mixture("bam", "DM")  # the full method the adapter experts are measured against


def gain_closed(seed: float, method: float, bam: float) -> float | None:
    """The share of full BAM's average-perplexity gain over the seed that `method` achieves:
    (seed - method) / (seed - bam); None when full BAM did not improve on the seed."""
    return (seed - method) / (seed - bam) if seed > bam else None


def check_adapter_experts(models: dict[ModelKey, dict], settings: StudySettings,
                          recipes: dict[str, dict]) -> dict | None:
    """For each method of adapter experts (data-matched): its average perplexity, the share of full
    BAM's gain it closes per seed, its costs beside its full-expert twin's and the seed's, its
    mixture training's tokens/s; then issue 17's claims, checked per seed. None without such a method."""
    methods = [m for m in settings.methods if m in ADAPTER_EXPERT_METHODS]
    if not methods:
        return None
    seed, bam = models[ModelKey.seed()], models.get(FULL_BAM)
    rows = {}
    for method in methods:
        model = models[ModelKey.mixture(method, "DM")]
        closed = None
        if bam is not None:
            shares = [gain_closed(*avgs) for avgs in zip(seed["avg_ppl"]["per_seed"], model["avg_ppl"]["per_seed"],
                                                            bam["avg_ppl"]["per_seed"])]
            closed = None if None in shares else _stat(shares)
        cost, twin = model["cost"], model["cost"].get("full_experts")
        rows[method] = {
            "model": ModelKey.mixture(method, "DM"), "recipe": recipes.get(method), "avg_ppl": model["avg_ppl"],
            "gain_closed": closed, "params_vs_seed": cost["params_total"] / seed["cost"]["params_total"],
            "cost": {k: cost[k] for k in COST_KEYS}, "full_experts": twin,
            "full_experts_vs_seed": twin["params_total"] / seed["cost"]["params_total"] if twin else None,
            "train_tokens_per_s": cost.get("train_tokens_per_s"),
        }
    reference = None if bam is None else {"avg_ppl": bam["avg_ppl"], "cost": {k: bam["cost"][k] for k in COST_KEYS},
                                          "train_tokens_per_s": bam["cost"].get("train_tokens_per_s")}
    return {"seed": {"avg_ppl": seed["avg_ppl"], "cost": {k: seed["cost"][k] for k in COST_KEYS}},
            "full_bam": reference, "rows": rows, "claims": adapter_claims(rows, settings, bam is not None)}


def adapter_claims(rows: dict[str, dict], settings: StudySettings, have_bam: bool) -> list[dict]:
    """Issue 17's claims about the methods that ran: each {"claim", "ours" (the numbers), "per_seed"
    (whether it holds, or None when it cannot be checked), "verdict"}."""
    n = len(settings.seeds)
    claims = []

    def claim(text: str, ours: str, per_seed: list[bool] | None, why_not: str = "") -> None:
        claims.append({"claim": text, "ours": ours, "per_seed": per_seed,
                       "verdict": verdict(per_seed) if per_seed is not None else f"cannot say ({why_not})"})

    if "lora-bam" in rows:
        row = rows["lora-bam"]
        twin = row["full_experts_vs_seed"]
        claim(f"lora-bam holds at most {SEED_PARAMS_LIMIT}x the seed's parameters",
              f"{row['params_vs_seed']:.3f}x the seed's" + (f" (its full-expert twin: {twin:.3f}x)" if twin else ""),
              [row["params_vs_seed"] <= SEED_PARAMS_LIMIT] * n)  # (a config's count: the same every seed)
        closed = row["gain_closed"]
        claim(f"lora-bam closes at least {GAIN_CLOSED_TARGET:.0%} of full BAM's average gain over the seed",
              "—" if closed is None else
              f"{closed['mean']:.1%} (per seed: {', '.join(f'{x:.1%}' for x in closed['per_seed'])})",
              None if closed is None else [x >= GAIN_CLOSED_TARGET for x in closed["per_seed"]],
              "full BAM (DM) did not run" if not have_bam else "full BAM did not improve on the seed")
    for kind in ("lora", "ia3"):
        outputs, params = rows.get(f"{kind}-bam"), rows.get(f"{kind}-bam-param-mixing")
        if outputs is None or params is None:
            continue
        a, b = outputs["avg_ppl"], params["avg_ppl"]
        ca, cb = outputs["cost"], params["cost"]
        rate_a, rate_b = outputs["train_tokens_per_s"], params["train_tokens_per_s"]
        ours = (f"average perplexity {a['mean']:.3f} vs {b['mean']:.3f}; FLOPs/token {ca['flops_per_token']:,} vs "
                f"{cb['flops_per_token']:,}; KV-cache bytes/token {ca['kv_cache_bytes_per_token']:,} vs "
                f"{cb['kv_cache_bytes_per_token']:,}; train tokens/s "
                + (f"{rate_a:.0f} vs {rate_b:.0f}" if rate_a and rate_b else "—"))
        other = "MoLoRA" if kind == "lora" else "MoV"
        claim(f"{kind}-bam: mixing attention outputs (BAM) beats mixing parameters ({other})", ours,
              [x < y for x, y in zip(a["per_seed"], b["per_seed"])])
    return claims


# ---------------------------------------------------------------------------------------------
# The add-expert experiment


def new_expert_share(evaluation: dict, new_domain_index: int) -> float | None:
    """Share of the new domain's tokens the last (added) FFN expert receives, averaged over layers."""
    ffn = (evaluation.get("routing") or {}).get("ffn")
    if not ffn:
        return None
    return statistics.fmean(layer[new_domain_index][-1] for layer in ffn)


def summarize_add_expert(settings: StudySettings, runs: dict[ModelKey, ModelRuns]) -> dict | None:
    """Per role and seed: new-domain perplexity, old-domain average, and the added expert's token share."""
    if settings.add_expert is None:
        return None
    method, domain = settings.add_expert.method, settings.add_expert.domain
    domains = list(settings.domains)
    old = [d for d in domains if d != domain]
    rows = {}
    for role in ("dense", *ADD_EXPERT_ROLES):
        key = ModelKey.expert(domain) if role == "dense" else ModelKey.add_expert(settings.add_expert, role)
        evals = [runs[key].evals[seed] for seed in settings.seeds]
        # Before adding, the last expert is an old one: no share to report.
        shares = [None if role == "before" else new_expert_share(e, domains.index(domain)) for e in evals]
        rows[role] = {
            "model": key,
            "steps_after_adding": settings.add_expert.finetune.steps if role.endswith("finetuned") else 0,
            "new_ppl": _stat([e["perplexity"][domain] for e in evals]),
            "old_avg_ppl": _stat([statistics.fmean(e["perplexity"][d] for d in old) for e in evals]),
            "new_expert_share": _stat(shares) if None not in shares else None,
        }
    # Relative change on the old domains against the mixture before adding, per seed (the report's
    # table and the summary line both read it from here).
    for role, row in rows.items():
        row["old_change"] = None if role in ("dense", "before") else _stat(
            [a / b - 1 for a, b in zip(row["old_avg_ppl"]["per_seed"], rows["before"]["old_avg_ppl"]["per_seed"])])
    n = len(settings.seeds)

    def per_seed_of(role: str, key: str) -> list[float]:
        return rows[role][key]["per_seed"]

    before, nexus, reset = (per_seed_of(r, "new_ppl") for r in ("before", "added-finetuned", "reset-finetuned"))
    share = per_seed_of("added-finetuned", "new_expert_share")
    gain = [1 - a / b for a, b in zip(nexus, reset)]
    checks = {
        f"adding lowers {domain} perplexity": [a < b for a, b in zip(nexus, before)],
        f"Nexus router beats linear reset on {domain}": [a < b for a, b in zip(nexus, reset)],
        f"most {domain} tokens go to the new expert": [x > 0.5 for x in share],
    }
    lines = [
        f"{METHOD_LABELS[method]} + {domain} (finetuned) below the mixture before adding on {domain}: "
        f"{sum(checks[f'adding lowers {domain} perplexity'])}/{n} seeds "
        f"({statistics.fmean(nexus):.3f} vs {statistics.fmean(before):.3f})",
        f"Nexus router vs linear router reset, both finetuned {settings.add_expert.finetune.steps} steps: "
        f"{domain} perplexity {statistics.fmean(nexus):.3f} vs {statistics.fmean(reset):.3f}, "
        f"a relative improvement of {statistics.fmean(gain):+.1%} for Nexus (better in "
        f"{sum(checks[f'Nexus router beats linear reset on {domain}'])}/{n} seeds; the paper reports +18.8% "
        f"after 1B finetuning tokens)",
        f"share of {domain} tokens routed to the new expert (mean over layers), Nexus finetuned: "
        f"{statistics.fmean(share):.1%} (above 50% in {sum(checks[f'most {domain} tokens go to the new expert'])}/{n} "
        f"seeds); linear reset finetuned: {statistics.fmean(per_seed_of('reset-finetuned', 'new_expert_share')):.1%}",
        f"old domains ({', '.join(old)}) average perplexity after adding and finetuning: "
        f"{rows['added-finetuned']['old_change']['mean']:+.1%} relative to before adding",
    ]
    return {"domain": domain, "old_domains": old, "method": method, "rows": rows, "checks": checks, "lines": lines}
