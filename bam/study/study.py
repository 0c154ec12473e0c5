"""The Branch-Attend-Mix study as a staged, cached, resumable pipeline (`bam run`, `bam demo`).

Stages (METHOD.md section 1), each one directory under OUT/stages named by a hash of everything
it depends on (its settings and its inputs' stage names), complete when it holds `done.json`:

    corpus -> tokenizer -> shards -> seed -> experts (continued pretraining, one per domain)
           -> mix (one per method) -> mixture training (data- and compute-matched) -> eval -> report

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
import hashlib
import json
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
import yaml

from bam.formats.model_dir import load_model, open_model, save_model
from bam.io.atomic import atomic_output_dir
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
from bam.modeling.cost import flops_per_token, summarize
from bam.data.shards import Domain, TokenizedDomain, document_split, iter_eval_batches, prepare_domain
from bam.errors import BamError
from bam.eval.perplexity import evaluate_domains
from bam.mix.mixing import add_expert, mix
from bam.modeling.model import BamForCausalLM
from bam.mix.nexus import DomainEmbeddings, EmbeddingSource, embed_domains, finetune_weights
from bam.modeling.presets import build_config, preset_fields
from bam.study.report import write_report
from bam.data.tokenizer import load_tokenizer, train_tokenizer
from bam.train.loop import TrainConfig, train

MOE_METHODS = ("btx", "bam", "bam-shared")
ADD_EXPERT_METHODS = ("nexus", "nexus-bam", "nexus-bam-shared")
METHOD_LABELS = {"btx": "BTX", "bam": "BAM KV experts", "bam-shared": "BAM KV sharing"}
BUILTIN = "builtin"


# ---------------------------------------------------------------------------------------------
# Settings: one dataclass per section of PIPELINE.yaml


def _from_dict(cls, data: dict | None, where: str):
    data = data or {}
    if not isinstance(data, dict):
        raise BamError(f"{where}: expected a mapping")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise BamError(f"{where}.{unknown[0]}: unknown field (expected one of {', '.join(sorted(names))})")
    return cls(**data)


@dataclass
class TrainSettings:
    steps: int = 100
    batch_size: int = 16
    lr: float = 1e-3
    warmup: int = 10
    save_every: int = 50
    eval_every: int = 0

    def __post_init__(self):
        for name in ("steps", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise BamError(f"{name}={getattr(self, name)!r}: expected a positive integer")


@dataclass
class AddExpertSettings:
    """Nexus's extension experiment: hold `domain` out of a `method` mixture, then add its expert."""

    domain: str = "legal"
    method: str = "nexus"
    # A brief finetune of an already trained mixture: a lower learning rate than the mixture's own
    # training from the freshly mixed model (at the demo's 1e-3 the old domains lost another 9%).
    finetune: TrainSettings = field(default_factory=lambda: TrainSettings(steps=50, lr=3e-4, warmup=5))
    embed_max_tokens: int = 65536  # tokens of each domain's train split the seed embeds

    def __post_init__(self):
        if not isinstance(self.finetune, TrainSettings):
            self.finetune = _from_dict(TrainSettings, self.finetune, "add_expert.finetune")
        if self.method not in ADD_EXPERT_METHODS:
            raise BamError(f"add_expert.method={self.method!r}: expected one of {', '.join(ADD_EXPERT_METHODS)}")
        if not isinstance(self.embed_max_tokens, int) or self.embed_max_tokens <= 0:
            raise BamError(f"add_expert.embed_max_tokens={self.embed_max_tokens!r}: expected a positive integer")


@dataclass
class StudySettings:
    """Everything a study depends on. The built-in demo is one of these (see DEMO_PRESETS)."""

    domains: dict[str, str] = field(default_factory=lambda: {d: BUILTIN for d in DOMAINS})
    general_domain: str = "general"  # the seed's domain: the seed itself is that domain's expert
    max_chars_per_domain: int | None = 2_000_000  # for built-in domains
    val_fraction: float = 0.05
    test_fraction: float = 0.1
    tokenizer: str | None = None  # a tokenizer directory; None trains a byte-level BPE
    vocab_size: int = 4096
    seed_model: str | None = None  # a model directory; None initializes `preset` and pretrains it
    preset: str = "small"
    seq_len: int = 256
    pretrain: TrainSettings = field(default_factory=TrainSettings)
    pretrain_general_weight: float = 0.55  # the rest is spread evenly over the other domains
    cpt: TrainSettings = field(default_factory=TrainSettings)
    cpt_general_fraction: float = 0.1  # METHOD.md 1.3: ~10% general data during CPT
    methods: list[str] = field(default_factory=lambda: list(MOE_METHODS))
    top_k: int = 1
    renormalize: bool = False
    router_init_std: float = 0.02
    mixture: TrainSettings = field(default_factory=TrainSettings)
    compute_matched: bool = True
    eval_max_tokens: int | None = 65536
    eval_batch_size: int = 8
    routing_max_tokens: int = 8192
    seeds: list[int] = field(default_factory=lambda: [0])
    add_expert: AddExpertSettings | None = None

    def __post_init__(self):
        for name in ("pretrain", "cpt", "mixture"):
            value = getattr(self, name)
            if not isinstance(value, TrainSettings):
                setattr(self, name, _from_dict(TrainSettings, value, name))
        if self.add_expert is not None and not isinstance(self.add_expert, AddExpertSettings):
            self.add_expert = _from_dict(AddExpertSettings, self.add_expert, "add_expert")
        if self.general_domain not in self.domains:
            raise BamError(f"general_domain={self.general_domain!r}: expected one of the domains "
                           f"({', '.join(self.domains)})")
        if len(self.domains) < 2:
            raise BamError("domains: expected at least two (the general one and one expert domain)")
        for method in self.methods:
            if method not in MOE_METHODS:
                raise BamError(f"methods: unknown method {method!r} (expected {', '.join(MOE_METHODS)})")
        if not self.seeds or not all(isinstance(s, int) for s in self.seeds):
            raise BamError(f"seeds={self.seeds!r}: expected a non-empty list of integers")
        if self.add_expert is not None:
            if self.add_expert.domain not in self.expert_domains:
                raise BamError(f"add_expert.domain={self.add_expert.domain!r}: expected one of the expert "
                               f"domains ({', '.join(self.expert_domains)})")
            if len(self.expert_domains) < 2:
                raise BamError("add_expert: needs at least two expert domains, one held out and one "
                               "routed expert to build the mixture from")

    @property
    def expert_domains(self) -> list[str]:
        return [d for d in self.domains if d != self.general_domain]


DEMO_PRESETS = {
    # CI and smoke tests: the whole study in well under three minutes.
    "tiny": dict(preset="tiny", vocab_size=1024, max_chars_per_domain=300_000, seq_len=128,
                 pretrain=dict(steps=60, batch_size=8, lr=3e-3, warmup=6, save_every=30),
                 cpt=dict(steps=30, batch_size=8, lr=1.5e-3, warmup=3, save_every=30),
                 mixture=dict(steps=30, batch_size=8, lr=1.5e-3, warmup=3, save_every=30),
                 add_expert=dict(domain="legal", embed_max_tokens=8192,
                                 finetune=dict(steps=15, batch_size=8, lr=5e-4, warmup=2, save_every=15)),
                 eval_max_tokens=8192, routing_max_tokens=2048),
    # The default `bam demo`: about 19 minutes on a 2-core CPU (3 of them the add-expert experiment).
    # Its corpus is the README's reference (bam.data.corpus.REFERENCE_FINGERPRINT).
    "small": dict(preset="small", vocab_size=4096, max_chars_per_domain=REFERENCE_MAX_CHARS, seq_len=256,
                  pretrain=dict(steps=400, batch_size=16, lr=2e-3, warmup=40, save_every=100),
                  cpt=dict(steps=150, batch_size=16, lr=1e-3, warmup=15, save_every=50),
                  mixture=dict(steps=150, batch_size=16, lr=1e-3, warmup=15, save_every=50),
                  add_expert=dict(domain="legal", embed_max_tokens=32768,
                                  finetune=dict(steps=50, batch_size=16, lr=3e-4, warmup=5, save_every=50)),
                  eval_max_tokens=32768, routing_max_tokens=8192),
}


def load_pipeline_file(path: str | Path) -> tuple[StudySettings, Path | None]:
    """Read PIPELINE.yaml: StudySettings fields plus an optional `out`."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BamError(f"{path}: pipeline file not found") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise BamError(f"{path}: not a readable YAML file ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise BamError(f"{path}: expected a mapping of pipeline settings")
    out = data.pop("out", None)
    if "demo" in data:  # start from a built-in preset and override what the file names
        base = data.pop("demo")
        if base not in DEMO_PRESETS:
            raise BamError(f"{path}: demo={base!r}: expected one of {', '.join(DEMO_PRESETS)}")
        preset = dict(DEMO_PRESETS[base])
        if "domains" in data:  # the preset's add-expert experiment is about the preset's own domains
            preset.pop("add_expert", None)
        data = {**preset, **data}
    try:
        return _from_dict(StudySettings, data, str(path)), (Path(out) if out else None)
    except TypeError as err:
        raise BamError(f"{path}: {err}") from None


# ---------------------------------------------------------------------------------------------
# Stages


def _key(spec) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:12]


class Stages:
    """Stage directories named by what they depend on; `done.json` marks a finished one.

    Every record also carries `provenance`, what the study knows of its data and software when the
    stage finishes (Study.provenance): per domain the sha256 of the documents and their counts, the
    versions of Python, torch, transformers and the built-in corpus's sources.
    """

    def __init__(self, root: Path):
        self.root = root / "stages"
        self.provenance: dict = {}

    def dir(self, name: str, spec) -> Path:
        return self.root / f"{name}-{_key(spec)}"

    @staticmethod
    def done(directory: Path) -> dict | None:
        """The stage's record, or None if it has not finished (a torn marker counts as unfinished)."""
        try:
            return json.loads((directory / "done.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def finish(self, directory: Path, info: dict) -> dict:
        info = {**info, "provenance": self.provenance}
        tmp = directory / "done.json.tmp"
        tmp.write_text(json.dumps(info, indent=2, default=str))
        tmp.replace(directory / "done.json")
        return info


def log(message: str) -> None:
    print(f"[bam] {message}", flush=True)


def software_versions() -> dict:
    """What else the numbers depend on: torch picks its CPU kernels by architecture and vector
    instruction set (AVX2, AVX512, ...), and a kernel's float sums round in its own order."""
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "machine": platform.machine(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}


@dataclass
class Study:
    settings: StudySettings
    out: Path
    stages: Stages = None
    domains: dict[str, TokenizedDomain] = field(default_factory=dict)
    tokenizer_dir: Path | None = None
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
        if s.tokenizer:
            self.tokenizer_dir = Path(s.tokenizer)
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
        if s.seed_model and s.pretrain.steps == 0:
            return Path(s.seed_model)
        init_spec = {"preset": s.preset, "tokenizer": self.rel(self.tokenizer_dir), "seed": seed,
                     "from": s.seed_model}
        init = self.stages.dir("init", init_spec)
        if s.seed_model is None and not self.stages.done(init):
            tokenizer = load_tokenizer(self.tokenizer_dir)
            config = build_config(preset_fields(s.preset), tokenizer, f"preset {s.preset}")
            torch.manual_seed(seed)
            with atomic_output_dir(init, overwrite=True) as tmp:
                save_model(BamForCausalLM(config), tmp / "model", self.tokenizer_dir)
                self.stages.finish(tmp, {"preset": s.preset})
        start = Path(s.seed_model) if s.seed_model else init / "model"
        weights = {d: (s.pretrain_general_weight if d == s.general_domain
                       else (1 - s.pretrain_general_weight) / len(s.expert_domains)) for d in s.domains}
        return self.train_stage("seed", start, weights, s.pretrain, seed)

    def train_stage(self, name: str, model: Path, weights: dict[str, float], settings: TrainSettings,
                    seed: int, max_steps: int | None = None) -> Path:
        """Train `model` in stage `name`; the stage key covers the input model's own stage name."""
        steps = max_steps or settings.steps
        spec = {"model": self.rel(model), "weights": weights, "train": dataclasses.asdict(settings),
                "steps": steps, "seed": seed, "seq_len": self.settings.seq_len,
                "domains": {n: d.path.name for n, d in self.domains.items()}}
        stage = self.stages.dir(name, spec)
        if self.stages.done(stage):
            return stage / "run" / "model"
        log(f"training {name}: {steps} steps from {self.rel(model)}")
        stage.mkdir(parents=True, exist_ok=True)
        started = time.time()
        result = train(TrainConfig(
            model=model, data=list(self.domains.values()), data_weights=weights, out=stage / "run",
            max_steps=steps, batch_size=settings.batch_size, seq_len=self.settings.seq_len,
            lr=settings.lr, warmup=settings.warmup, save_every=settings.save_every,
            eval_every=settings.eval_every, seed=seed, resume=True, keep=1,
        ))
        self.stages.finish(stage, {"seconds": time.time() - started, "steps": steps})
        return result

    def experts(self, seed_model: Path, seed: int) -> dict[str, Path]:
        s = self.settings
        experts = {s.general_domain: seed_model}
        for domain in s.expert_domains:
            weights = {d: 0.0 for d in s.domains}
            weights[domain] = 1 - s.cpt_general_fraction
            weights[s.general_domain] = s.cpt_general_fraction
            experts[domain] = self.train_stage(f"expert-{domain}", seed_model, weights, s.cpt, seed)
        return experts

    def mixed(self, method: str, experts: dict[str, Path], seed: int) -> Path:
        s = self.settings
        spec = {"method": method, "experts": {d: self.rel(p) for d, p in experts.items()}, "top_k": s.top_k,
                "renormalize": s.renormalize, "std": s.router_init_std, "seed": seed}
        stage = self.stages.dir(f"mix-{method}", spec)
        if not self.stages.done(stage):
            log(f"mixing {method} from {len(experts)} experts")
            with atomic_output_dir(stage, overwrite=True) as tmp:
                mix([open_model(p) for p in experts.values()], method, tmp / "model", top_k=s.top_k,
                    renormalize=s.renormalize, router_init_std=s.router_init_std, seed=seed)
                self.stages.finish(tmp, {"method": method})
        return stage / "model"

    def mixture_steps(self, method: str, experts: dict[str, Path]) -> dict[str, int]:
        """Data-matched: every method trains the same steps. Compute-matched: same training FLOPs
        as BTX (the cheapest per token), so a costlier method trains proportionally fewer steps."""
        s = self.settings
        steps = {"DM": s.mixture.steps}
        if s.compute_matched and method != "btx":
            dense = open_model(next(iter(experts.values()))).config
            from bam.mix.mixing import mixed_config  # noqa: PLC0415

            n = len(experts)
            btx = flops_per_token(mixed_config(dense, "btx", n, s.top_k, s.renormalize), s.seq_len)
            this = flops_per_token(mixed_config(dense, method, n, s.top_k, s.renormalize), s.seq_len)
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


@torch.no_grad()
def routing_statistics(model, domains: list[TokenizedDomain], seq_len: int, batch_size: int,
                       max_tokens: int) -> dict:
    """Per layer and domain: share of token slots each FFN expert receives, mean attention gate."""
    n_layers = model.config.num_hidden_layers
    ffn = [[None] * len(domains) for _ in range(n_layers)]
    attn = [[None] * len(domains) for _ in range(n_layers)]
    for d, domain in enumerate(domains):
        ffn_counts = torch.zeros(n_layers, model.config.n_ffn_experts)
        attn_sums = torch.zeros(n_layers, model.config.n_attn_experts)
        n_tokens = 0
        for tokens, mask in iter_eval_batches(domain, "test", seq_len, batch_size, max_tokens):
            out = model(input_ids=tokens[:, :-1], use_cache=False, output_routing=True)
            keep_T = mask.flatten()
            n_tokens += int(keep_T.sum())
            for layer, r in enumerate(out.routing):
                if r.ffn_expert_index is not None:
                    chosen = r.ffn_expert_index[keep_T].flatten()
                    ffn_counts[layer] += torch.bincount(chosen, minlength=model.config.n_ffn_experts)
                if r.attn_gates is not None:
                    attn_sums[layer] += r.attn_gates.flatten(0, 1)[keep_T].sum(0)
        for layer in range(n_layers):
            if model.config.n_ffn_experts > 1:
                ffn[layer][d] = (ffn_counts[layer] / ffn_counts[layer].sum()).tolist()
            if model.config.n_attn_experts > 1:
                attn[layer][d] = (attn_sums[layer] / max(n_tokens, 1)).tolist()
    return {"ffn": ffn if model.config.n_ffn_experts > 1 else None,
            "attn": attn if model.config.n_attn_experts > 1 else None}


# ---------------------------------------------------------------------------------------------
# The study


def run_study(settings: StudySettings, out: Path, title: str = "bam run") -> dict:
    out = Path(out)
    study = Study(settings, out)
    study.prepare_data()
    per_seed: dict[str, dict] = {}  # model name -> {"seeds": [...], "evals": [...], ...}

    def record(name: str, group: str, model_dir: Path, seed: int, method=None, setting=None,
               metrics: Path | None = None, routing: bool = False, experts: list[str] | None = None):
        result = study.evaluate(model_dir, name, routing)
        entry = per_seed.setdefault(name, {"group": group, "method": method, "setting": setting,
                                           "evals": [], "metrics": None, "expert_names": experts})
        entry["evals"].append(result)
        if metrics is not None and metrics.exists() and entry["metrics"] is None:
            entry["metrics"] = str(metrics)

    for seed in settings.seeds:
        log(f"=== seed {seed} ===")
        seed_model = study.seed_model(seed)
        record("seed", "dense", seed_model, seed, metrics=seed_model.parent / "metrics.jsonl")
        experts = study.experts(seed_model, seed)
        for domain, path in experts.items():
            if domain != settings.general_domain:
                record(f"expert {domain}", "expert", path, seed, metrics=path.parent / "metrics.jsonl")
        for method in settings.methods:
            mixed = study.mixed(method, experts, seed)
            for setting, steps in study.mixture_steps(method, experts).items():
                trained = study.train_stage(f"mixture-{method}", mixed, {d: 1.0 for d in settings.domains},
                                            settings.mixture, seed, max_steps=steps)
                name = f"{METHOD_LABELS[method]} ({setting})"
                record(name, "moe", trained, seed, method, setting, trained.parent / "metrics.jsonl",
                       routing=True, experts=list(experts))
                if method == "btx" and settings.compute_matched:
                    # BTX is the compute reference, so its CM run is its DM run.
                    per_seed[f"{METHOD_LABELS[method]} (CM)"] = per_seed[name] | {"setting": "CM"}
        if settings.add_expert is not None:
            add_expert_experiment(study, seed_model, experts, seed, record)

    results = assemble(settings, study, per_seed, title)
    with atomic_output_dir(out / "report", overwrite=True) as tmp:
        write_report(results, tmp)
    log(f"report written to {out / 'report' / 'report.md'}")
    return results


ADD_EXPERT_LABELS = {"nexus": "Nexus", "nexus-bam": "Nexus-BAM KV experts", "nexus-bam-shared": "Nexus-BAM KV sharing"}
# The models of the extension experiment, by role: (name template, router variant, finetuned)
ADD_EXPERT_ROLES = {
    "before": "{label} before adding {domain}",
    "added": "{label} + {domain}",
    "added-finetuned": "{label} + {domain}, finetuned",
    "reset": "linear reset + {domain}",
    "reset-finetuned": "linear reset + {domain}, finetuned",
}


def add_expert_name(settings: StudySettings, role: str) -> str:
    return ADD_EXPERT_ROLES[role].format(label=ADD_EXPERT_LABELS[settings.add_expert.method],
                                         domain=settings.add_expert.domain)


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
        record(add_expert_name(s, role), "add-expert", model_dir, seed, s.add_expert.method, role, metrics,
               routing=True, experts=names)

    file("before", before, routed, before.parent / "metrics.jsonl")
    weights = finetune_weights(domain, old)
    for variant, reset in (("added", False), ("reset", True)):
        grown = study.added(before, experts[domain], embeddings, reset, seed)
        file(variant, grown, [*routed, domain])
        tuned = study.train_stage(f"finetune-{variant}", grown, weights, s.add_expert.finetune, seed)
        file(f"{variant}-finetuned", tuned, [*routed, domain], tuned.parent / "metrics.jsonl")


def new_expert_share(evaluation: dict, new_domain_index: int) -> float | None:
    """Share of the new domain's tokens the last (added) FFN expert receives, averaged over layers."""
    ffn = (evaluation.get("routing") or {}).get("ffn")
    if not ffn:
        return None
    return statistics.fmean(layer[new_domain_index][-1] for layer in ffn)


def summarize_add_expert(settings: StudySettings, per_seed: dict) -> dict | None:
    """Per role and seed: new-domain perplexity, old-domain average, and the added expert's token share."""
    if settings.add_expert is None:
        return None
    domain = settings.add_expert.domain
    domains = list(settings.domains)
    old = [d for d in domains if d != domain]
    rows = {}
    for role in ("dense", *ADD_EXPERT_ROLES):
        name = f"expert {domain}" if role == "dense" else add_expert_name(settings, role)
        evals = per_seed[name]["evals"]
        # Before adding, the last expert is an old one: no share to report.
        shares = [None if role == "before" else new_expert_share(e, domains.index(domain)) for e in evals]
        rows[role] = {
            "name": name,
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
    label = ADD_EXPERT_LABELS[settings.add_expert.method]
    lines = [
        f"{label} + {domain} (finetuned) below the mixture before adding on {domain}: "
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
    return {"domain": domain, "old_domains": old, "method": settings.add_expert.method, "rows": rows,
            "checks": checks, "lines": lines}


def _stat(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "per_seed": values}


def assemble(settings: StudySettings, study: Study, per_seed: dict, title: str) -> dict:
    domains = list(settings.domains)
    models = {}
    for name, entry in per_seed.items():
        evals = entry["evals"]
        ppl = {d: _stat([e["perplexity"][d] for e in evals]) for d in domains}
        avg = _stat([statistics.fmean(e["perplexity"][d] for d in domains) for e in evals])
        cost = dict(evals[0]["cost"])
        if entry["metrics"]:
            rates = [json.loads(line).get("tokens_per_s") for line in Path(entry["metrics"]).read_text().splitlines()]
            rates = [r for r in rates if r]
            if rates:
                cost["train_tokens_per_s"] = statistics.median(rates)
        models[name] = {"group": entry["group"], "method": entry["method"], "setting": entry["setting"],
                        "perplexity": ppl, "avg_ppl": avg, "cost": cost, "metrics": entry["metrics"],
                        "routing": evals[0].get("routing"), "expert_names": entry["expert_names"],
                        "bpb": {d: statistics.fmean(e["bpb"][d] for e in evals) for d in domains}}
    ordering = check_ordering(models, domains, settings)
    summary = (f"{len(settings.seeds)} seed(s) {settings.seeds}; experts: "
               f"{', '.join(settings.expert_domains)} + the seed as the {settings.general_domain} expert; "
               f"mixture training {settings.mixture.steps} steps x {settings.mixture.batch_size} x "
               f"{settings.seq_len} tokens (data-matched).")
    return {"title": title, "summary": summary, "domains": domains, "seeds": settings.seeds,
            "settings": dataclasses.asdict(settings), "corpus": study.corpus_info,
            "provenance": study.provenance(), "models": models,
            "ordering": ordering, "add_expert": summarize_add_expert(settings, per_seed)}


def check_ordering(models: dict, domains: list[str], settings: StudySettings) -> dict:
    """The paper's claims (METHOD.md section 6), checked per seed so the report can say how stable."""
    n_seeds = len(settings.seeds)
    lines, checks = [], {}

    def avg(name: str, i: int) -> float | None:
        return models[name]["avg_ppl"]["per_seed"][i] if name in models else None

    for setting in ("DM", "CM"):
        btx = f"BTX ({setting})"
        for method in ("bam", "bam-shared"):
            name = f"{METHOD_LABELS[method]} ({setting})"
            if name not in models or btx not in models:
                continue
            wins = [avg(name, i) < avg(btx, i) for i in range(n_seeds)]
            checks[f"{method} < btx ({setting})"] = wins
            lines.append(f"{name} average perplexity below {btx}: {sum(wins)}/{n_seeds} seeds "
                         f"({models[name]['avg_ppl']['mean']:.3f} vs {models[btx]['avg_ppl']['mean']:.3f})")
    for domain in settings.expert_domains:
        name = f"expert {domain}"
        dense = [n for n, m in models.items() if m["group"] in ("dense", "expert")]
        wins = [all(models[name]["perplexity"][domain]["per_seed"][i] <= models[o]["perplexity"][domain]["per_seed"][i]
                    for o in dense) for i in range(n_seeds)]
        checks[f"expert {domain} best dense on {domain}"] = wins
        lines.append(f"expert {domain} is the best dense model on {domain}: {sum(wins)}/{n_seeds} seeds")
    return {"checks": checks, "lines": lines}


def run_demo(preset: str, out: Path, seeds: list[int] | None = None) -> dict:
    if preset not in DEMO_PRESETS:
        raise BamError(f"--preset {preset!r}: expected one of {', '.join(DEMO_PRESETS)}")
    fields = dict(DEMO_PRESETS[preset])
    if seeds:
        fields["seeds"] = seeds
    return run_study(_from_dict(StudySettings, fields, "demo"), out, title=f"bam demo --preset {preset}")


__all__ = ["StudySettings", "TrainSettings", "DEMO_PRESETS", "run_study", "run_demo", "load_pipeline_file"]
