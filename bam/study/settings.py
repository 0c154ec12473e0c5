"""What a study depends on: PIPELINE.yaml's schema (StudySettings and its sections), checked when read,
and the built-in demo's presets.

A training section (pretrain, cpt, mixture, add_expert.finetune) is not a schema of its own: it sets
fields of `bam train`'s TrainConfig, which declares and checks them, over the study's own defaults
(STUDY_TRAINING).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from bam.data.corpus import DOMAINS, REFERENCE_MAX_CHARS
from bam.errors import BamError, need
from bam.formats.wheel_model import SMOLLM2
from bam.modeling.config import ADAPTER_TARGETS
from bam.study.methods import (
    ABLATION_METHODS,
    ADAPTER_DEMO_METHODS,
    ADAPTER_EXPERT_METHODS,
    ATTENTION_TOPK,
    MOE_METHODS,
    STUDY_METHODS,
)
from bam.train.config import TrainConfig
from bam.train.optim import ADAPTER_MIXTURE_TRAINS, parse_train_only

ADD_EXPERT_METHODS = ("nexus", "nexus-bam", "nexus-bam-shared")
BUILTIN = "builtin"


def _fields(data: dict | None, names: list[str], where: str) -> dict:
    """`data` (None for none), checked to be a mapping of some of `names`."""
    data = data or {}
    if not isinstance(data, dict):
        raise BamError(f"{where}: expected a mapping")
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise BamError(f"{where}.{unknown[0]}: unknown field (expected one of {', '.join(sorted(names))})")
    return data


def _from_dict(cls, data: dict | None, where: str):
    return cls(**_fields(data, [f.name for f in dataclasses.fields(cls)], where))


# ---------------------------------------------------------------------------------------------
# Training sections: overrides of TrainConfig

# The study's training defaults where they differ from `bam train`'s (TrainConfig's): the study
# trains small models for a few hundred steps, so a higher learning rate (1e-3, not 3e-4), a short
# warmup (10 steps, not 100), a checkpoint every 50 steps (not 500), and no validation while
# training (every stage's model is evaluated on the test split afterwards). `steps` is TrainConfig's
# max_steps, the steps a stage trains (100, not 1000). batch_size is TrainConfig's own 16, named
# here because every stage key and report.json list these six values.
STUDY_TRAINING = {"steps": 100, "batch_size": 16, "lr": 1e-3, "warmup": 10, "save_every": 50, "eval_every": 0}
# TrainConfig fields each stage sets itself (what it trains, on which data, where), or that the
# study's own settings give (seq_len, the split fractions): a section may set any other.
STAGE_FIELDS = ("model", "data", "data_weights", "out", "tokenizer", "cache_dir", "val_fraction",
                "test_fraction", "max_steps", "seq_len", "seed", "resume", "keep")


@dataclass
class TrainSettings:
    """One training section: STUDY_TRAINING updated by the section's own values, as PIPELINE.yaml
    names them. It is the stage key's `train` and report.json's record of the section."""

    values: dict

    @classmethod
    def parse(cls, section: dict | TrainSettings | None, where: str, skippable: bool = False) -> TrainSettings:
        """`skippable`: `steps: 0` is allowed and means the section does not train (pretrain, when
        `seed_model` is already trained)."""
        if isinstance(section, TrainSettings):
            return section
        names = ["steps", *(f.name for f in dataclasses.fields(TrainConfig) if f.name not in STAGE_FIELDS)]
        settings = cls({**STUDY_TRAINING, **_fields(section, names, where)})
        skipped = skippable and settings.steps == 0 and not isinstance(settings.steps, bool)
        try:
            # What each stage sets itself stands in as placeholders, so that TrainConfig checks the
            # section's values now, before any stage runs.
            settings.config(model="", data=["stage data"], out="", **({"max_steps": 1} if skipped else {}))
        except BamError as err:
            raise BamError(f"{where}: {err}") from None
        return settings

    @property
    def steps(self) -> int:
        return self.values["steps"]

    @property
    def batch_size(self) -> int:
        return self.values["batch_size"]

    def config(self, **stage) -> TrainConfig:
        """One stage's TrainConfig: this section's values, then what the stage sets (`stage`)."""
        fields = {("max_steps" if name == "steps" else name): value for name, value in self.values.items()}
        return TrainConfig(**{**fields, **stage})


# ---------------------------------------------------------------------------------------------
# PIPELINE.yaml: one dataclass per section


@dataclass
class AddExpertSettings:
    """Nexus's extension experiment: hold `domain` out of a `method` mixture, then add its expert."""

    domain: str = "legal"
    method: str = "nexus"
    # A brief finetune of an already trained mixture: a lower learning rate than the mixture's own
    # training from the freshly mixed model (at the demo's 1e-3 the old domains lost another 9%).
    finetune: TrainSettings = field(default_factory=lambda: {"steps": 50, "lr": 3e-4, "warmup": 5})
    embed_max_tokens: int = 65536  # tokens of each domain's train split the seed embeds

    def __post_init__(self):
        self.finetune = TrainSettings.parse(self.finetune, "add_expert.finetune")
        need(self.method in ADD_EXPERT_METHODS, "add_expert.method", self.method,
             f"one of {', '.join(ADD_EXPERT_METHODS)}")
        need(isinstance(self.embed_max_tokens, int) and self.embed_max_tokens > 0, "add_expert.embed_max_tokens",
             self.embed_max_tokens, "a positive integer")


@dataclass
class AdapterSettings:
    """The adapter experts' shape (PIPELINE.yaml `adapters:`) and training, for the adapter-expert
    methods (bam/study/methods.py). LoRA on every linear projection at rank 8, alpha 16 (scaling 2): on
    the default demo's seed a bam mixture of 4 such experts holds 1.16x the seed's parameters (rank 16:
    1.31x, past issue 17's 1.25x). (IA)³ on PEFT's (and MoV's) k_proj, v_proj, down_proj.
    `lr_scale` multiplies the learning rate of the adapters' CPT and of their mixtures' training.
    Adapters train at a higher rate than full weights: on the default demo (`bam demo --adapters`,
    2026-12-03) lora-bam closed 4.9% of full BAM's average gain over the seed at the full methods'
    rate (lr_scale 1), 31.9% at 5 and 31.2% at 10, hence 5 (mixtures training routers and adapters).
    `mixture_train_only`: what a mixture of adapter experts trains (`bam train --train-only`), by
    default what `bam train` trains on one (bam.train.optim.ADAPTER_MIXTURE_TRAINS: routers, adapters
    and the seed's embeddings, LM head and norms), named in every mixture's stage key. On the default
    demo lora-bam closed 31.9% of full BAM's gain training routers and adapters, 86.4% training
    those too (2026-12-03, README "Adapter experts")."""

    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: list[str] = field(default_factory=lambda: list(ADAPTER_TARGETS["lora"]))
    ia3_targets: list[str] = field(default_factory=lambda: ["k_proj", "v_proj", "down_proj"])
    lr_scale: float = 5.0
    mixture_train_only: str = ADAPTER_MIXTURE_TRAINS

    def __post_init__(self):
        need(isinstance(self.lora_rank, int) and not isinstance(self.lora_rank, bool) and self.lora_rank > 0,
             "adapters.lora_rank", self.lora_rank, "a positive integer")
        need(isinstance(self.lora_alpha, (int, float)) and not isinstance(self.lora_alpha, bool)
             and self.lora_alpha > 0, "adapters.lora_alpha", self.lora_alpha, "a positive number")
        for kind in ("lora", "ia3"):
            targets = getattr(self, f"{kind}_targets")
            need(isinstance(targets, list) and targets and all(t in ADAPTER_TARGETS[kind] for t in targets),
                 f"adapters.{kind}_targets", targets, f"a non-empty list of {', '.join(ADAPTER_TARGETS[kind])}")
        need(isinstance(self.lr_scale, (int, float)) and not isinstance(self.lr_scale, bool) and self.lr_scale > 0,
             "adapters.lr_scale", self.lr_scale, "a positive number")
        need(isinstance(self.mixture_train_only, str), "adapters.mixture_train_only", self.mixture_train_only,
             "a comma-separated list of bam train --train-only groups, e.g. routers,adapter")
        try:
            parse_train_only(self.mixture_train_only)
        except BamError as err:
            raise BamError(f"adapters.mixture_train_only: {err}") from None

    def cpt_training(self, section: TrainSettings) -> TrainSettings:
        """The cpt section for the adapters alone on the frozen seed: its learning rate times lr_scale."""
        if self.lr_scale == 1:
            return section
        return TrainSettings({**section.values, "lr": section.values["lr"] * self.lr_scale})

    def mixture_training(self, section: TrainSettings) -> TrainSettings:
        """The mixture section for a mixture of adapter experts: its learning rate times lr_scale, and
        what it trains, mixture_train_only."""
        return TrainSettings({**self.cpt_training(section).values, "train_only": self.mixture_train_only})

    def train_fields(self, kind: str) -> dict:
        """`bam train --adapter KIND`'s fields (TrainConfig) of one domain's adapter expert."""
        if kind == "lora":
            return {"adapter": "lora", "adapter_rank": self.lora_rank, "adapter_alpha": float(self.lora_alpha),
                    "adapter_targets": list(self.lora_targets)}
        return {"adapter": "ia3", "adapter_targets": list(self.ia3_targets)}

    def config_fields(self, kind: str) -> dict:
        """The model config fields of such an adapter (bam/modeling/config.py), as `bam train` sets them."""
        return TrainConfig(model="", data=["stage data"], out="", **self.train_fields(kind)).adapter_fields()


@dataclass
class StudySettings:
    """Everything a study depends on. The built-in demo is one of these (see DEMO_PRESETS).

    Sections are given as mappings, as PIPELINE.yaml gives them, and checked on construction.
    """

    domains: dict[str, str] = field(default_factory=lambda: {d: BUILTIN for d in DOMAINS})
    general_domain: str = "general"  # the seed's domain: the seed itself is that domain's expert
    max_chars_per_domain: int | None = 2_000_000  # for built-in domains
    val_fraction: float = 0.05
    test_fraction: float = 0.1
    tokenizer: str | None = None  # a tokenizer directory; None: seed_model's own, else a byte-level BPE trained here
    vocab_size: int = 4096
    # A model directory, GGUF file or pip:NAME==VERSION (bam/formats/wheel_model.py); None
    # initializes `preset` and pretrains it
    seed_model: str | None = None
    preset: str = "small"
    seq_len: int = 256
    pretrain: TrainSettings = field(default_factory=dict)
    pretrain_general_weight: float = 0.55  # the rest is spread evenly over the other domains
    cpt: TrainSettings = field(default_factory=dict)
    cpt_general_fraction: float = 0.1  # METHOD.md 1.3: ~10% general data during CPT
    methods: list[str] = field(default_factory=lambda: list(MOE_METHODS))
    top_k: int = 1
    renormalize: bool = False
    router_init_std: float = 0.02
    mixture: TrainSettings = field(default_factory=dict)
    compute_matched: bool = True
    eval_max_tokens: int | None = 65536
    eval_batch_size: int = 8
    routing_max_tokens: int = 8192
    seeds: list[int] = field(default_factory=lambda: [0])
    add_expert: AddExpertSettings | None = None
    adapters: AdapterSettings = field(default_factory=AdapterSettings)  # for the adapter-expert methods

    def __post_init__(self):
        for name in ("pretrain", "cpt", "mixture"):
            setattr(self, name, TrainSettings.parse(getattr(self, name), name, skippable=name == "pretrain"))
        if self.pretrain.steps == 0 and self.seed_model is None:
            raise BamError("pretrain: steps=0 skips pretraining, which needs seed_model (a trained model)")
        if self.add_expert is not None and not isinstance(self.add_expert, AddExpertSettings):
            self.add_expert = _from_dict(AddExpertSettings, self.add_expert, "add_expert")
        if not isinstance(self.adapters, AdapterSettings):
            self.adapters = _from_dict(AdapterSettings, self.adapters, "adapters")
        if self.general_domain not in self.domains:
            raise BamError(f"general_domain={self.general_domain!r}: expected one of the domains "
                           f"({', '.join(self.domains)})")
        if len(self.domains) < 2:
            raise BamError("domains: expected at least two (the general one and one expert domain)")
        for method in self.methods:
            if method not in STUDY_METHODS:
                raise BamError(f"methods: unknown method {method!r} (expected {', '.join(STUDY_METHODS)})")
            if method in ATTENTION_TOPK and ATTENTION_TOPK[method][1] >= len(self.domains):
                # top-k of k attention experts, gates renormalized, is soft routing itself
                raise BamError(f"methods: {method} needs more than {ATTENTION_TOPK[method][1]} domains "
                               f"(one attention expert each), got {len(self.domains)}")
        need(bool(self.seeds) and all(isinstance(s, int) for s in self.seeds), "seeds", self.seeds,
             "a non-empty list of integers")
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

    @property
    def adapter_kinds(self) -> list[str]:
        """The kinds of adapter experts the methods need ("lora", "ia3"), in the methods' order."""
        return list(dict.fromkeys(ADAPTER_EXPERT_METHODS[m].adapter for m in self.methods
                                  if m in ADAPTER_EXPERT_METHODS))

    def record(self) -> dict:
        """Every setting as PIPELINE.yaml names it (report.json's `settings`)."""
        record = dataclasses.asdict(self)
        for name in ("pretrain", "cpt", "mixture"):
            record[name] = dict(getattr(self, name).values)
        if self.add_expert is not None:
            record["add_expert"]["finetune"] = dict(self.add_expert.finetune.values)
        return record


DEMO_PRESETS = {
    # CI and smoke tests: the whole study in well under three minutes.
    "tiny": dict(preset="tiny", vocab_size=1024, max_chars_per_domain=300_000, seq_len=128,
                 pretrain=dict(steps=60, batch_size=8, lr=3e-3, warmup=6, save_every=30),
                 cpt=dict(steps=30, batch_size=8, lr=1.5e-3, warmup=3, save_every=30),
                 mixture=dict(steps=30, batch_size=8, lr=1.5e-3, warmup=3, save_every=30),
                 add_expert=dict(domain="legal", embed_max_tokens=8192,
                                 finetune=dict(steps=15, batch_size=8, lr=5e-4, warmup=2, save_every=15)),
                 eval_max_tokens=8192, routing_max_tokens=2048),
    # The default `bam demo`: about 45 minutes on a 2-core CPU (measured 2026-12-02; README).
    # Its corpus is the README's reference (bam.data.corpus.REFERENCE_FINGERPRINT).
    "small": dict(preset="small", vocab_size=4096, max_chars_per_domain=REFERENCE_MAX_CHARS, seq_len=256,
                  pretrain=dict(steps=400, batch_size=16, lr=2e-3, warmup=40, save_every=100),
                  cpt=dict(steps=150, batch_size=16, lr=1e-3, warmup=15, save_every=50),
                  mixture=dict(steps=150, batch_size=16, lr=1e-3, warmup=15, save_every=50),
                  add_expert=dict(domain="legal", embed_max_tokens=32768,
                                  finetune=dict(steps=50, batch_size=16, lr=3e-4, warmup=5, save_every=50)),
                  eval_max_tokens=32768, routing_max_tokens=8192),
    # A real pretrained seed (issue 19): SmolLM2-135M-Instruct, its own tokenizer, branched into code,
    # math and legal experts on the built-in corpus, the seed itself the general expert; no
    # pretraining. Batches of 4x256 tokens (dense CPT about 10 s a step on 2 cores, a 4-expert BAM
    # about twice that); 48 steps (49k tokens) per expert and per mixture, at a pretrained model's
    # fine-tuning rates (3e-4 CPT, 1e-4 for the mixtures, which start from trained experts); no Nexus
    # experiment. About 2 hours on 2 CPU cores, checkpointed every 12 steps (README).
    # FFN routing is the original BTX's top-2 renormalized, not BAM's top-1 gate p_i: scaling every
    # FFN output by its gate (~1/4 from a fresh router) breaks a pretrained seed (a BAM of four
    # copies of SmolLM2: LM loss 15.1 against the seed's 2.68 on textwrap.py; renormalized top-2
    # computes the seed exactly), which the paper's long mixture training repairs and 48 steps cannot.
    "smollm2": dict(seed_model=SMOLLM2, max_chars_per_domain=REFERENCE_MAX_CHARS, seq_len=256,
                    pretrain=dict(steps=0), top_k=2, renormalize=True,
                    cpt=dict(steps=48, batch_size=4, lr=3e-4, warmup=5, save_every=12),
                    mixture=dict(steps=48, batch_size=4, lr=1e-4, warmup=5, save_every=12),
                    eval_max_tokens=8192, eval_batch_size=4, routing_max_tokens=2048),
}


def demo_settings(preset: str, seeds: list[int] | None = None, ablations: bool = False,
                  adapters: bool = False, seed_model: str | None = None) -> StudySettings:
    """The built-in demo's settings (`bam demo --preset PRESET [--seeds ...] [--ablations] [--adapters]
    [--seed-model M]`); `ablations` adds the paper's ablations (ABLATION_METHODS) to the mixtures,
    `adapters` the methods of adapter experts (ADAPTER_DEMO_METHODS); `seed_model` replaces the
    preset's seed (smollm2's), or with the presets that pretrain their own, is what they pretrain from."""
    if preset not in DEMO_PRESETS:
        raise BamError(f"--preset {preset!r}: expected one of {', '.join(DEMO_PRESETS)}")
    fields = dict(DEMO_PRESETS[preset])
    if seeds:
        fields["seeds"] = seeds
    if seed_model:
        fields["seed_model"] = seed_model
    fields["methods"] = [*MOE_METHODS, *(ABLATION_METHODS if ablations else ()),
                         *(ADAPTER_DEMO_METHODS if adapters else ())]
    return _from_dict(StudySettings, fields, "demo")


# The sections of PIPELINE.yaml that a file starting from `demo: PRESET` updates field by field
# rather than replaces (`cpt: {steps: 10}` keeps the preset's batch size and learning rate).
MERGED_SECTIONS = ("pretrain", "cpt", "mixture", "add_expert", "adapters")


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
        for name in MERGED_SECTIONS:  # the file's fields of a section override the preset's one by one
            if isinstance(preset.get(name), dict) and isinstance(data.get(name), dict):
                data[name] = {**preset[name], **data[name]}
        data = {**preset, **data}
    try:
        return _from_dict(StudySettings, data, str(path)), (Path(out) if out else None)
    except TypeError as err:
        raise BamError(f"{path}: {err}") from None
