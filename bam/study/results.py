"""What the study measures, filed by model and seed.

A model of the study is the same across seeds (say, the BAM mixture trained compute-matched); each
seed trains and evaluates its own copy. ModelKey names the model, ModelRuns holds its evaluation for
each seed. Display labels ("BAM KV experts (CM)") are made from a ModelKey only in report.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from bam.study.settings import AddExpertSettings

# The add-expert experiment's models by role, in the report's order: the mixture before adding the
# held-out domain's expert, then with it added keeping the Nexus router, and with a new linear router
# ("reset"), each before and after finetuning.
ADD_EXPERT_ROLES = ("before", "added", "added-finetuned", "reset", "reset-finetuned")


class ModelKey(NamedTuple):
    """One model of the study. `group`, `method` and `setting` are report.json's fields of it."""

    # "dense" (the seed), "expert", "adapter-expert" (an adapter on the seed), "moe" (a mixture) or
    # "add-expert" (the extension experiment)
    group: str
    method: str | None = None  # moe: the study method (STUDY_METHODS); add-expert: the experiment's;
    #                            adapter-expert: the adapter's kind ("lora", "ia3")
    setting: str | None = None  # moe: "DM" or "CM" (data- or compute-matched); add-expert: the role
    domain: str | None = None  # expert, adapter-expert: its domain; add-expert: the domain added

    @classmethod
    def seed(cls) -> ModelKey:
        return cls("dense")

    @classmethod
    def expert(cls, domain: str) -> ModelKey:
        return cls("expert", domain=domain)

    @classmethod
    def adapter_expert(cls, kind: str, domain: str) -> ModelKey:
        return cls("adapter-expert", kind, domain=domain)

    @classmethod
    def mixture(cls, method: str, setting: str) -> ModelKey:
        return cls("moe", method, setting)

    @classmethod
    def add_expert(cls, experiment: AddExpertSettings, role: str) -> ModelKey:
        return cls("add-expert", experiment.method, role, experiment.domain)


@dataclass
class ModelRuns:
    """One model's evaluations, one per seed, and what the report shows of its training."""

    evals: dict[int, dict] = field(default_factory=dict)  # seed -> its eval stage's record
    model_dirs: dict[int, str] = field(default_factory=dict)  # seed -> its model directory (relative to OUT inside it)
    metrics: str | None = None  # the first training metrics.jsonl recorded (loss curves, tokens/s)
    expert_names: list[str] | None = None  # a mixture's experts in router order (routing plots)
