"""The study's report: report.json for scripts, report.md for people, PNG plots for both; and the
display labels of the study's models ("BTX (DM)"), made here only.

Input is one `results` dict built by bam.study.claims.assemble, its models keyed by
bam.study.results.ModelKey; report.json and report.md name each model by its label and spell its key
out as group, method and setting (`labelled`):
  results["models"][key] = {"perplexity": {domain: {"mean", "std", "per_seed"}}, "avg_ppl": {...},
                            "cost": {...}, "metrics": path of its training metrics.jsonl or None,
                            "model_dirs": {seed: its model directory, relative to the study's OUT when inside it},
                            "routing": {"ffn": [layer][domain][expert], "attn": [layer][domain][expert]},
                            "expert_names", "bpb"}
  report.json["models"][label] = {"group": "dense"|"expert"|"moe"|"add-expert", "method",
                                  "setting": "DM"|"CM"|role|None, **results["models"][key]}
  results["domains"], results["corpus"], results["seeds"], results["ordering"], results["notes"]
  results["provenance"]: per-domain sha256 and counts, software versions, the built-in corpus's
                         fingerprint against the README's (bam.study.study.Study.provenance)
  results["relative_to_btx"]: bam.study.claims.relative_to_btx or None: "reference" (BTX (DM)'s key), "rows",
                        each {"model": key, "ours", "paper": {domain or "avg": perplexity / BTX's - 1}}
  results["ablations"]: the paper's ablations (bam.study.claims.check_ablations) or None: "recipes" (method ->
                        how it was mixed, bam.study.study.Study.recipe_record) and "claims", each comparing
                        two models' average perplexity ("a", "b": keys; labels in report.json) per seed
  results["adapter_experts"]: methods of adapter experts (bam.study.claims.check_adapter_experts) or None:
                         "seed", "full_bam" (average perplexity, costs), "rows" (method -> its
                         numbers, "model": key; report.json's "name": label) and issue 17's "claims"
  results["add_expert"]: the Nexus extension experiment (bam.study.claims.summarize_add_expert) or None;
                         its models are in results["models"] with group "add-expert", its rows name
                         theirs by key ("model"), report.json's by label ("name").
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

from bam.data.corpus import REFERENCE_FINGERPRINT
from bam.study.results import ModelKey

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# The methods' names in the report: the study's mixtures (bam.study.methods.STUDY_METHODS) and those of
# the add-expert experiment (ADD_EXPERT_METHODS).
METHOD_LABELS = {"btx": "BTX", "bam": "BAM KV experts", "bam-shared": "BAM KV sharing",
                 "btx-param-matched": "BTX param-matched", "btx-2n-experts": "BTX 2N experts",
                 "btx-param-active-matched": "BTX param+active-matched",
                 "bam-attn-top1": "BAM KV experts top-1 attention", "bam-attn-top2": "BAM KV experts top-2 attention",
                 "bam-shared-attn-top1": "BAM KV sharing top-1 attention",
                 "bam-shared-attn-top2": "BAM KV sharing top-2 attention",
                 "lora-btx": "BTX of LoRA experts", "lora-bam": "BAM of LoRA experts",
                 "lora-bam-shared": "BAM KV sharing of LoRA experts",
                 "lora-bam-param-mixing": "BAM of LoRA experts, parameter mixing",
                 "ia3-bam": "BAM of (IA)³ experts", "ia3-bam-param-mixing": "BAM of (IA)³ experts, parameter mixing",
                 "nexus": "Nexus", "nexus-bam": "Nexus-BAM KV experts", "nexus-bam-shared": "Nexus-BAM KV sharing"}
ADAPTER_LABELS = {"lora": "LoRA", "ia3": "(IA)³"}
# The add-expert experiment's models, by role (bam.study.results.ADD_EXPERT_ROLES)
ADD_EXPERT_LABELS = {
    "before": "{method} before adding {domain}",
    "added": "{method} + {domain}",
    "added-finetuned": "{method} + {domain}, finetuned",
    "reset": "linear reset + {domain}",
    "reset-finetuned": "linear reset + {domain}, finetuned",
}


def model_label(key: ModelKey) -> str:
    """How the report, report.json and the log name a model of the study."""
    if key.group == "dense":
        return "seed"
    if key.group == "expert":
        return f"expert {key.domain}"
    if key.group == "adapter-expert":
        return f"{ADAPTER_LABELS[key.method]} expert {key.domain}"
    if key.group == "moe":
        return f"{METHOD_LABELS[key.method]} ({key.setting})"
    return ADD_EXPERT_LABELS[key.setting].format(method=METHOD_LABELS[key.method], domain=key.domain)


def labelled(results: dict) -> dict:
    """`results` as report.json lays them out: models, and the add-expert experiment's rows, named by
    their labels, each model's key spelled out as its group, method and setting."""
    models = {model_label(key): {"group": key.group, "method": key.method, "setting": key.setting, **model}
              for key, model in results["models"].items()}
    out = {**results, "models": models}
    experiment = results.get("add_expert")
    if experiment:
        rows = {role: {"name": model_label(row["model"]), **{k: v for k, v in row.items() if k != "model"}}
                for role, row in experiment["rows"].items()}
        out["add_expert"] = {**experiment, "rows": rows}
    relative = results.get("relative_to_btx")
    if relative:
        rows = [{**row, "model": model_label(row["model"])} for row in relative["rows"]]
        out["relative_to_btx"] = {"reference": model_label(relative["reference"]), "rows": rows}
    ablations = results.get("ablations")
    if ablations:
        claims = [{**claim, "a": model_label(claim["a"]), "b": model_label(claim["b"])}
                  for claim in ablations["claims"]]
        out["ablations"] = {**ablations, "claims": claims}
    adapters = results.get("adapter_experts")
    if adapters:
        rows = {method: {"name": model_label(row["model"]), **{k: v for k, v in row.items() if k != "model"}}
                for method, row in adapters["rows"].items()}
        out["adapter_experts"] = {**adapters, "rows": rows}
    return out


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.{digits}f}"


def _ppl_cell(stat: dict) -> str:
    if stat.get("std") and len(stat.get("per_seed", [])) > 1:
        return f"{_fmt(stat['mean'])} ± {_fmt(stat['std'])}"
    return _fmt(stat["mean"])


def _human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def study_models(results: dict, group: str | None = None) -> dict:
    """The main comparison's models (all but the add-expert experiment's), or one group's."""
    if group is None:
        return {n: m for n, m in results["models"].items() if m["group"] != "add-expert"}
    return {n: m for n, m in results["models"].items() if m["group"] == group}


def perplexity_table(results: dict, models: dict | None = None) -> str:
    domains = results["domains"]
    lines = ["| model | " + " | ".join(domains) + " | avg |",
             "|---|" + "---|" * (len(domains) + 1)]
    for name, model in (study_models(results) if models is None else models).items():
        cells = [_ppl_cell(model["perplexity"][d]) for d in domains]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {_ppl_cell(model['avg_ppl'])} |")
    return "\n".join(lines)


def cost_table(results: dict) -> str:
    lines = ["| model | params total | params active | FLOPs/token (n_ctx) | KV-cache bytes/token | train tokens/s |",
             "|---|---|---|---|---|---|"]
    for name, model in results["models"].items():
        cost = model.get("cost") or {}
        if not cost:
            continue
        tps = cost.get("train_tokens_per_s")
        lines.append(f"| {name} | {_human(cost['params_total'])} | {_human(cost['params_active'])} | "
                     f"{_human(cost['flops_per_token'])} | {cost['kv_cache_bytes_per_token']:,} | "
                     f"{_fmt(tps, 0) if tps else '—'} |")
    return "\n".join(lines)


def corpus_table(results: dict) -> str:
    lines = ["| domain | sha256 (first 12) | documents (train/val/test) | characters | tokens (train/val/test) | found in |",
             "|---|---|---|---|---|---|"]
    for name, info in results["corpus"].items():
        docs, toks = info["documents"], info["tokens"]
        chars = "—" if info.get("characters") is None else f"{info['characters']:,}"
        lines.append(f"| {name} | `{info['sha256'][:12]}` | {docs['train']}/{docs['validation']}/{docs['test']} | "
                     f"{chars} | {toks['train']:,}/{toks['validation']:,}/{toks['test']:,} | "
                     f"{'; '.join(info['sources'])} |")
    return "\n".join(lines)


def provenance_lines(results: dict) -> list[str]:
    """The corpus fingerprint, whether it is the README's, and the software the numbers came from."""
    provenance = results.get("provenance") or {}
    lines = []
    corpus = provenance.get("builtin_corpus")
    if corpus:
        same = corpus["reference_fingerprint"] == REFERENCE_FINGERPRINT
        lines.append(f"built-in corpus fingerprint `{corpus['fingerprint']}`; at the default demo's size "
                     f"`{corpus['reference_fingerprint'][:12]}`, "
                     + ("the README's" if same else f"not the README's `{REFERENCE_FINGERPRINT[:12]}`"))
        lines += [f"warning: {w}" for w in corpus["warnings"]]
        sources = {k: v for k, v in corpus["source_versions"].items() if k not in ("python", "python_implementation")}
        lines.append("corpus sources: " + ", ".join(f"{k} {v}" for k, v in sources.items()))
    versions = provenance.get("versions")
    if versions:
        lines.append("software: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    return lines


def _read_losses(path: str) -> tuple[list[int], list[float]]:
    steps, losses = [], []
    for line in Path(path).read_text().splitlines():
        row = json.loads(line)
        if row.get("lm_loss") is not None:
            steps.append(row["step"])
            losses.append(row["lm_loss"])
    return steps, losses


def _smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average, debiased like TensorBoard's, so short runs stay readable."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


def plot_loss_curves(results: dict, out: Path) -> Path | None:
    """Training loss of the dense stages (seed, experts) and of the mixture runs, side by side."""
    titles = {"dense": "dense models: seed pretraining and expert CPT", "expert": "dense models: seed pretraining and expert CPT",
              "adapter-expert": "adapter experts: CPT of an adapter on the frozen seed",
              "moe": "mixture training", "add-expert": "adding an expert: mixture, then finetune after adding"}
    panels = {title: [] for title in titles.values()}
    plotted = set()  # a CM run that trained the DM run's steps is the DM run (BTX's always): one curve
    for name, model in results["models"].items():
        if model.get("metrics") and model["metrics"] not in plotted:
            plotted.add(model["metrics"])
            panels[titles[model["group"]]].append((name, model["metrics"]))
    panels = {title: runs for title, runs in panels.items() if runs}
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8), squeeze=False)
    axes = axes[0]
    for ax, (title, runs) in zip(axes, panels.items()):
        for name, path in runs:
            steps, losses = _read_losses(path)
            if steps:
                line, = ax.plot(steps, _smooth(losses), label=name, linewidth=1.3)
                ax.plot(steps, losses, color=line.get_color(), alpha=0.2, linewidth=0.6)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("training LM loss (nats/token, smoothed)")
        ax.grid(alpha=0.3)
        if runs:
            ax.legend(fontsize=7)
    path = out / "loss_curves.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _mean_ppl(model: dict, domain: str) -> float:
    return model["avg_ppl"]["mean"] if domain == "avg" else model["perplexity"][domain]["mean"]


def plot_perplexity(results: dict, out: Path) -> Path:
    domains, names = results["domains"] + ["avg"], list(study_models(results))
    fig, ax = plt.subplots(figsize=(max(8, len(names) * 0.9), 5))
    width = 0.8 / len(domains)
    for i, domain in enumerate(domains):
        values = [_mean_ppl(results["models"][n], domain) for n in names]
        ax.bar([x + i * width for x in range(len(names))], values, width, label=domain)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(names))], names, rotation=35, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("held-out perplexity (log scale, lower is better)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    path = out / "perplexity.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_routing(results: dict, out: Path) -> list[Path]:
    """Per MoE: share of each domain's tokens sent to each FFN expert, and mean attention gate."""
    paths = []
    domains = results["domains"]
    for name, model in results["models"].items():
        routing = model.get("routing")
        if not routing:
            continue
        panels = [(kind, routing[kind]) for kind in ("ffn", "attn") if routing.get(kind)]
        n_layers = len(panels[0][1])
        fig, axes = plt.subplots(len(panels), n_layers, figsize=(2.6 * n_layers + 1, 2.6 * len(panels)),
                                 squeeze=False)
        experts = model.get("expert_names") or [str(e) for e in range(len(panels[0][1][0][0]))]
        for row, (kind, layers) in enumerate(panels):
            for layer, matrix in enumerate(layers):
                ax = axes[row][layer]
                ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
                for i, values in enumerate(matrix):
                    for j, v in enumerate(values):
                        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6,
                                color="white" if v < 0.6 else "black")
                ax.set_xticks(range(len(experts)), experts, rotation=45, fontsize=6)
                ax.set_yticks(range(len(domains)), domains if layer == 0 else [], fontsize=7)
                label = "FFN token share" if kind == "ffn" else "attention gate"
                ax.set_title(f"L{layer} {label}", fontsize=7)
        fig.suptitle(f"Routing of {name}: rows = domain of the text, columns = expert", fontsize=9)
        fig.tight_layout()
        path = out / f"routing_{name.replace(' ', '_').replace('(', '').replace(')', '')}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_cost(results: dict, out: Path) -> Path | None:
    rows = [(n, m["cost"]) for n, m in results["models"].items() if m.get("cost") and m["group"] == "moe"]
    if not rows:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    names = [n for n, _ in rows]
    axes[0].bar(names, [c["flops_per_token"] / 1e6 for _, c in rows])
    axes[0].set_ylabel("inference MFLOPs per token")
    axes[1].bar(names, [c["kv_cache_bytes_per_token"] for _, c in rows])
    axes[1].set_ylabel("KV-cache bytes per token")
    for ax in axes:
        ax.tick_params(axis="x", rotation=35, labelsize=7)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = out / "cost.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def relative_lines(results: dict) -> list[str]:
    """Each Table 1 mixture's perplexity change against BTX, ours beside the paper's
    (bam.study.claims.relative_to_btx), with report.json's labels."""
    relative, domains = results["relative_to_btx"], results["domains"]
    md = [f"Change in mean perplexity against {relative['reference']} (negative: better), ours and, in brackets, "
          f"the paper's Table 1 (590M seed; its average is over its four domains):", "",
          "| model | " + " | ".join(domains) + " | avg |", "|---|" + "---|" * (len(domains) + 1)]
    for row in relative["rows"]:
        cells = [f"{row['ours'][d]:+.1%}" + (f" ({row['paper'][d]:+.1%})" if d in row["paper"] else "")
                 for d in [*domains, "avg"]]
        md.append(f"| {row['model']} | " + " | ".join(cells) + " |")
    return md


def ablation_lines(results: dict) -> list[str]:
    """The ablations section: how each ablation was mixed, then the paper's claims about them and
    whether we see them (bam.study.claims.check_ablations), the claims with report.json's labels."""
    ablations = results["ablations"]
    md = ["How each ablation was mixed (bam/study/methods.py; parameter counts against BAM KV experts'):", ""]
    for method, plan in ablations["recipes"].items():
        total, active = (plan[f"params_{n}"] / plan[f"bam_params_{n}"] - 1 for n in ("total", "active"))
        md.append(f"- {METHOD_LABELS[method]} (`{method}`): {plan['describe']}; params "
                  f"{_human(plan['params_total'])} total ({total:+.1%}), {_human(plan['params_active'])} active "
                  f"({active:+.1%})")
    md += ["", "| the paper's claim | average perplexity, ours (mean ± std over seeds) | the paper's | we see it |",
           "|---|---|---|---|"]
    for claim in ablations["claims"]:
        relation = " < " if claim["relation"] == "<" else " ≤ "
        ours = f"{claim['a']} {_ppl_cell(claim['a_avg_ppl'])}{relation}{claim['b']} {_ppl_cell(claim['b_avg_ppl'])}"
        paper = f"{claim['paper'][0]:.2f}{relation}{claim['paper'][1]:.2f}"
        md.append(f"| {claim['claim']} | {ours} | {paper} | {claim['verdict']} |")
    return md


def _ratio(value: float, reference: float | None) -> str:
    return f" ({value / reference:.2f}x)" if reference else ""


def adapter_lines(results: dict) -> list[str]:
    """The adapter experts' section (bam.study.claims.check_adapter_experts): per method how it was
    mixed, its average perplexity and share of full BAM's gain, its costs against the seed's and its
    full-expert twin's, its training tokens/s against full BAM's; then issue 17's claims."""
    section = results["adapter_experts"]
    seed, bam = section["seed"], section["full_bam"]
    bam_rate = bam["train_tokens_per_s"] if bam else None
    trains = results["settings"]["adapters"]["mixture_train_only"]
    md = ["Each domain expert is also an adapter on the frozen seed, trained on the same data for the same steps "
          f"as the full expert; the seed is the general expert; the mixture trains `{trains}` "
          "(`adapters.mixture_train_only`) for the full methods' steps (data-matched). Costs: parameters held "
          "and active, inference FLOPs and KV-cache bytes per token; the full-expert twin is the same mixture "
          "with every expert materialized (`bam mix --materialize`). Peak memory is measured by bench/, not here.", ""]
    for method, row in section["rows"].items():
        if row["recipe"]:
            md.append(f"- {row['name']} (`{method}`): {row['recipe']['describe']}")
    md += ["", "| model | avg perplexity | closes of full BAM's gain | params held (x seed) | params active | "
           "FLOPs/token | KV-cache bytes/token | full-expert twin: held / active / FLOPs / KV bytes | "
           "train tokens/s (x full BAM's) |", "|---|---|---|---|---|---|---|---|---|"]
    c = seed["cost"]
    md.append(f"| seed | {_ppl_cell(seed['avg_ppl'])} | 0% | {_human(c['params_total'])} (1.00x) | "
              f"{_human(c['params_active'])} | {_human(c['flops_per_token'])} | "
              f"{c['kv_cache_bytes_per_token']:,} | — | — |")
    if bam:
        c = bam["cost"]
        md.append(f"| {model_label(ModelKey.mixture('bam', 'DM'))} | {_ppl_cell(bam['avg_ppl'])} | 100% | "
                  f"{_human(c['params_total'])}{_ratio(c['params_total'], seed['cost']['params_total'])} | "
                  f"{_human(c['params_active'])} | {_human(c['flops_per_token'])} | "
                  f"{c['kv_cache_bytes_per_token']:,} | — | {_fmt(bam_rate, 0) if bam_rate else '—'} |")
    for row in section["rows"].values():
        c, twin, rate = row["cost"], row["full_experts"], row["train_tokens_per_s"]
        closed = "—" if row["gain_closed"] is None else f"{row['gain_closed']['mean']:.1%}"
        twin_cell = "—" if not twin else (
            f"{_human(twin['params_total'])} ({row['full_experts_vs_seed']:.2f}x) / {_human(twin['params_active'])} / "
            f"{_human(twin['flops_per_token'])} / {twin['kv_cache_bytes_per_token']:,}")
        md.append(f"| {row['name']} | {_ppl_cell(row['avg_ppl'])} | {closed} | {_human(c['params_total'])} "
                  f"({row['params_vs_seed']:.2f}x) | {_human(c['params_active'])} | {_human(c['flops_per_token'])} | "
                  f"{c['kv_cache_bytes_per_token']:,} | {twin_cell} | "
                  f"{(_fmt(rate, 0) + _ratio(rate, bam_rate)) if rate else '—'} |")
    md += ["", "Tokens/s: the median of the mixture training's logged steps, on whatever else ran on the machine.",
           "", "| issue 17's claim | ours | we see it |", "|---|---|---|"]
    md += [f"| {claim['claim']} | {claim['ours']} | {claim['verdict']} |" for claim in section["claims"]]
    return md


def add_expert_table(results: dict) -> str:
    experiment = results["add_expert"]
    domain, old = experiment["domain"], experiment["old_domains"]
    lines = [f"| model | steps after adding | {domain} perplexity | old domains avg perplexity | "
             f"old domains vs before adding | share of {domain} tokens to the new expert |",
             "|---|---|---|---|---|---|"]
    for row in experiment["rows"].values():
        share = "—" if row["new_expert_share"] is None else f"{row['new_expert_share']['mean']:.1%}"
        change = "—" if row["old_change"] is None else f"{row['old_change']['mean']:+.1%}"
        lines.append(f"| {row['name']} | {row['steps_after_adding']} | {_ppl_cell(row['new_ppl'])} | "
                     f"{_ppl_cell(row['old_avg_ppl'])} | {change} | "
                     f"{share} |")
    return "\n".join(lines) + f"\n\nOld domains: {', '.join(old)}."


def plot_add_expert(results: dict, out: Path) -> Path | None:
    """New-domain perplexity of each model of the experiment, and where the new domain's tokens go."""
    experiment = results.get("add_expert")
    if not experiment:
        return None
    domain, rows = experiment["domain"], experiment["rows"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.6))
    names = [row["name"] for row in rows.values()]
    colors = {"dense": "grey", "before": "tab:purple", "added": "tab:cyan", "added-finetuned": "tab:blue",
              "reset": "tab:orange", "reset-finetuned": "tab:red"}
    left.bar(range(len(rows)), [row["new_ppl"]["mean"] for row in rows.values()],
             yerr=[row["new_ppl"]["std"] for row in rows.values()], capsize=3,
             color=[colors.get(role, "tab:green") for role in rows])
    left.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=7)
    left.set_ylabel(f"held-out {domain} perplexity (lower is better)")
    left.grid(axis="y", alpha=0.3)
    d = results["domains"].index(domain)
    for role, row in rows.items():
        ffn = (results["models"][row["name"]].get("routing") or {}).get("ffn")
        if row["new_expert_share"] is None or not ffn:
            continue
        right.plot(range(len(ffn)), [layer[d][-1] for layer in ffn], marker="o", label=row["name"],
                   color=colors.get(role, "tab:green"))
        right.set_xticks(range(len(ffn)))
    right.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    right.set_ylim(0, 1)
    right.set_xlabel("layer")
    right.set_ylabel(f"share of {domain} tokens routed to the new expert")
    right.legend(fontsize=7)
    right.grid(alpha=0.3)
    fig.suptitle(f"Adding the {domain} expert to a trained mixture (first seed's routing)", fontsize=9)
    fig.tight_layout()
    path = out / "add_expert.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(results: dict, out: Path) -> None:
    """Write report.json, report.md and the plots into `out` (which the caller made atomic)."""
    results = labelled(results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(results, indent=2, default=str))
    plots = [plot_perplexity(results, out), plot_loss_curves(results, out), plot_cost(results, out),
             plot_add_expert(results, out), *plot_routing(results, out)]
    ordering = results.get("ordering", {})
    md = [f"# Branch-Attend-Mix study ({results.get('title', 'bam')})", ""]
    md += [results.get("summary", ""), ""]
    md += ["## Held-out perplexity (test split, lower is better)", "", perplexity_table(results), ""]
    for line in ordering.get("lines", []):
        md.append(f"- {line}")
    if results.get("relative_to_btx"):
        md += ["", "## Relative to BTX (the paper's Table 1)", ""] + relative_lines(results)
    if results.get("ablations"):
        md += ["", "## The paper's ablations (METHOD.md 6: parameter-matched BTX, top-k attention routing)", ""]
        md += ablation_lines(results)
    if results.get("adapter_experts"):
        md += ["", "## Adapter experts (issue 17, METHOD.md 7: LoRA and (IA)³ experts of the seed)", ""]
        md += adapter_lines(results)
    experiment = results.get("add_expert")
    if experiment:
        md += ["", f"## Adding an expert later: {experiment['domain']} (Nexus, METHOD.md 3.3)", "",
               f"A {experiment['method']} mixture is trained without {experiment['domain']}; its dense "
               f"{experiment['domain']} expert (CPT from the same seed) is then added with `add_expert`, keeping "
               "the Nexus router (its embedding is the projection of the new domain's embedding) or replacing it "
               "by a new linear router, and finetuned on 50% new domain, 50% old domains.", "",
               add_expert_table(results), ""]
        md += [f"- {line}" for line in experiment["lines"]]
        md += ["", "Per-domain perplexity of the experiment's models:", "",
               perplexity_table(results, study_models(results, "add-expert"))]
    md += ["", "## Cost", "", cost_table(results), "",
           "## Corpus", "", corpus_table(results), ""]
    md += [f"- {line}" for line in provenance_lines(results)] + [""]
    if results.get("notes"):
        md += ["## Notes", ""] + [f"- {n}" for n in results["notes"]] + [""]
    md += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots if p is not None]
    (out / "report.md").write_text("\n".join(md) + "\n")
