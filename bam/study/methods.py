"""The study's mixtures (PIPELINE.yaml `methods:`): BTX and BAM as `bam mix` makes them, and the
paper's ablations (METHOD.md section 6, its Tables 4-6), each one `bam mix` call with options.

With N domain experts (the seed, as the general expert, first) and the study's FFN top-k (`top_k`):

    method                     FFN experts                       FFN top-k            attention
    btx                        N                                 top_k                one, averaged
    bam                        N                                 top_k                N experts, soft
    bam-shared                 N                                 top_k                N experts (one K/V), soft
    btx-param-matched          N + c copies of the seed's FFN    top_k                one, averaged
    btx-2n-experts             N + N copies of the seed's FFN    top_k                one, averaged
    btx-param-active-matched   N + c (as btx-param-matched)      k                    one, averaged
    bam-attn-top1, -top2       N                                 top_k                N experts, top-1 / top-2
    bam-shared-attn-top1, -2   N                                 top_k                N experts (one K/V), top-1 / top-2

c >= 1 is the number of copies whose BTX has the total parameter count closest to BAM's (KV experts,
N experts, top_k), and k the top-k whose active parameter count is closest to BAM's; both are
computed from the seed's config (bam.modeling.cost), so they follow the number of domains and the
model's shape. The paper (4 domains, 590M seed) has c = 2 and k = 3 ("6 experts", "top-3 of 6");
btx-2n-experts is its "8 experts". At least one copy is made, so the ablation never collapses into BTX.

A copy of the seed's FFN is an extra FFN expert only: every averaged tensor (attention, embeddings,
norms, LM head) is the average over the N real models, exactly BTX's, because the copies are mixed
with weight 0 (`bam mix DIR... SEED... --weights 1,..,1,0,..,0`). Extra parameters thus come only
from the FFN, as in the paper: the ablation differs from BTX in its FFN experts and router rows only.
The paper's own ablation (its params: 700M with 4 experts, 776M with 6, each FFN expert 38M) gives
c = 2 and k = 3 by this rule.

Top-k attention routing (METHOD.md 3.2) keeps the softmax of the attention router over all experts,
keeps the top k per token and renormalizes them (bam/modeling/attention.py). The paper's routing
table is compute-matched and its soft row is the KV-sharing variant's, so `--ablations` runs the
bam-shared ones; the bam ones are there for a study that wants them.

Adapter experts (METHOD.md 7, issue 17; `bam demo --adapters`): each domain expert is an adapter on
the frozen seed (`bam train SEED --adapter`, the study's `adapters:` settings), trained data-matched
with the full expert of its domain (the same CPT steps, batch, sequence length and general-data
fraction); `bam mix --base SEED ADAPTER...` (bam/mix/adapter_mix.py) makes the seed the general
expert (a zero adapter) and expert i the seed plus domain i's adapter; the mixture trains its
routers, adapters and the seed's embeddings, LM head and norms (bam train's default for such a
mixture; the seed's projections frozen) for the full methods' mixture steps (data-matched only):

    method                   adapters   mixed as     attention experts mix
    lora-btx                 LoRA       btx          (one attention: the adapters' q/k/v/o averaged in)
    lora-bam                 LoRA       bam          outputs (BAM: sum_j g_j Attn_j)
    lora-bam-shared          LoRA       bam-shared   outputs, k/v adapters averaged in (one KV cache)
    lora-bam-param-mixing    LoRA       bam          parameters (MoLoRA: one attention, sum_j g_j delta_j)
    ia3-bam                  (IA)³      bam          outputs
    ia3-bam-param-mixing     (IA)³      bam          parameters (MoV)
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass

from bam.mix.adapter_mix import adapter_mixed_config
from bam.mix.mixing import mixed_config
from bam.modeling.config import BamConfig, config_from_dict
from bam.modeling.cost import params_active, params_total

MOE_METHODS = ("btx", "bam", "bam-shared")
# `bam demo --ablations`: the paper's parameter-matched BTX and top-k attention routing (its Tables 4-6)
ABLATION_METHODS = ("btx-param-matched", "btx-2n-experts", "btx-param-active-matched",
                    "bam-shared-attn-top1", "bam-shared-attn-top2")


@dataclass(frozen=True)
class AdapterMethod:
    """A method of adapter experts: the adapters' kind, `bam mix --method`, and `--attn-mixing`."""

    adapter: str  # "lora" or "ia3"
    mix_method: str  # bam.mix.adapter_mix.ADAPTER_METHODS
    attn_mixing: str = "outputs"  # bam.modeling.config.ATTN_MIXINGS


ADAPTER_EXPERT_METHODS = {
    "lora-btx": AdapterMethod("lora", "btx"),
    "lora-bam": AdapterMethod("lora", "bam"),
    "lora-bam-shared": AdapterMethod("lora", "bam-shared"),
    "lora-bam-param-mixing": AdapterMethod("lora", "bam", "parameters"),
    "ia3-bam": AdapterMethod("ia3", "bam"),
    "ia3-bam-param-mixing": AdapterMethod("ia3", "bam", "parameters"),
}
# `bam demo --adapters`: BTX and BAM of LoRA experts, BAM's two ways to mix attention experts, (IA)³
ADAPTER_DEMO_METHODS = ("lora-btx", "lora-bam", "lora-bam-param-mixing", "ia3-bam")
# The mixtures of full experts (every `bam mix` of whole models), then those of adapter experts
FULL_EXPERT_METHODS = (*MOE_METHODS, *ABLATION_METHODS, "bam-attn-top1", "bam-attn-top2")
STUDY_METHODS = (*FULL_EXPERT_METHODS, *ADAPTER_EXPERT_METHODS)
# The top-k attention methods: name -> (the soft method it ablates, k)
ATTENTION_TOPK = {f"{soft}-attn-top{k}": (soft, k) for soft in ("bam", "bam-shared") for k in (1, 2)}


@dataclass(frozen=True)
class MixRecipe:
    """How the study mixes a method from its N domain experts: `bam mix --method mix_method` over the
    experts and `seed_copies` more copies of the seed, with these routing options."""

    mix_method: str
    n_domains: int
    seed_copies: int = 0
    top_k: int = 1
    attn_routing: str = "soft"
    attn_top_k: int = 1

    @property
    def n_experts(self) -> int:
        return self.n_domains + self.seed_copies

    def weights(self) -> list[float] | None:
        """`bam mix --weights`: the real models 1, the copies 0 (averages over the real models only);
        None (uniform) without copies."""
        return [1.0] * self.n_domains + [0.0] * self.seed_copies if self.seed_copies else None

    def expert_names(self, domains: list[str]) -> list[str]:
        """The FFN experts in router order: the domains, then the seed's copies (domains[0] is the seed's)."""
        return [*domains, *(f"{domains[0]} copy {i + 1}" for i in range(self.seed_copies))]

    def config(self, dense: BamConfig, renormalize: bool = False) -> BamConfig:
        """The mixture's config, as `bam mix` writes it."""
        return mixed_config(dense, self.mix_method, self.n_experts, self.top_k, renormalize,
                            attn_routing=self.attn_routing, attn_top_k=self.attn_top_k)

    def describe(self) -> str:
        """e.g. "4 domain experts + 1 copy of the seed's FFN, FFN top-2 of 5"."""
        experts = f"{self.n_domains} domain experts"
        if self.seed_copies:
            experts += f" + {self.seed_copies} cop{'y' if self.seed_copies == 1 else 'ies'} of the seed's FFN"
        text = f"{experts}, FFN top-{self.top_k} of {self.n_experts}"
        if self.attn_routing == "topk":
            text += f", attention top-{self.attn_top_k} of {self.n_domains}"
        return text


@dataclass(frozen=True)
class AdapterRecipe(MixRecipe):
    """How the study mixes a method of adapter experts: `bam mix --base SEED --method mix_method
    --attn-mixing attn_mixing` over the domains' adapters, the seed the first (general) expert.
    `adapter` holds the experts' adapter config fields (StudySettings.adapter_fields)."""

    adapter: dict | None = None
    attn_mixing: str = "outputs"

    def config(self, dense: BamConfig, renormalize: bool = False) -> BamConfig:
        """The mixture's config, as `bam mix --base` writes it."""
        one_expert = config_from_dict({**dense.to_dict(), **self.adapter}, f"{self.adapter['adapter']} expert")
        return adapter_mixed_config(dense, one_expert, self.mix_method, self.n_experts, attn_mixing=self.attn_mixing,
                                    top_k=self.top_k, renormalize=renormalize)

    def describe(self) -> str:
        """e.g. "the seed + 3 LoRA experts (rank 8) mixed as bam, attention mixing outputs, FFN top-1 of 4"."""
        kind = "LoRA" if self.adapter["adapter"] == "lora" else "(IA)³"
        rank = f" (rank {self.adapter['lora_rank']})" if self.adapter["adapter"] == "lora" else ""
        return (f"the seed + {self.n_domains - 1} {kind} experts{rank} on {', '.join(self.adapter['adapter_targets'])} "
                f"mixed as {self.mix_method}, attention mixing {self.attn_mixing}, FFN top-{self.top_k} of "
                f"{self.n_experts}")


def recipe(method: str, dense: BamConfig, n_domains: int, top_k: int = 1, renormalize: bool = False,
           adapters: dict[str, dict] | None = None) -> MixRecipe:
    """Study method `method` (STUDY_METHODS) for N = `n_domains` experts of config `dense`; `adapters`:
    the adapter config fields of each kind ("lora", "ia3"), for the adapter-expert methods."""
    if method in ADAPTER_EXPERT_METHODS:
        spec = ADAPTER_EXPERT_METHODS[method]
        return AdapterRecipe(spec.mix_method, n_domains, top_k=top_k, adapter=adapters[spec.adapter],
                             attn_mixing=spec.attn_mixing)
    if method in MOE_METHODS:
        return MixRecipe(method, n_domains, top_k=top_k)
    if method in ATTENTION_TOPK:
        soft, k = ATTENTION_TOPK[method]
        return MixRecipe(soft, n_domains, top_k=top_k, attn_routing="topk", attn_top_k=k)
    if method == "btx-2n-experts":
        return MixRecipe("btx", n_domains, seed_copies=n_domains, top_k=top_k)
    bam = mixed_config(dense, "bam", n_domains, top_k, renormalize)
    copies = closest(lambda c: params_total(mixed_config(dense, "btx", n_domains + c, top_k)), params_total(bam),
                     itertools.count(1))
    if method == "btx-param-matched":
        return MixRecipe("btx", n_domains, seed_copies=copies, top_k=top_k)
    assert method == "btx-param-active-matched", method
    n = n_domains + copies
    k = closest(lambda k: params_active(mixed_config(dense, "btx", n, k, renormalize)), params_active(bam),
                range(1, n + 1))
    return MixRecipe("btx", n_domains, seed_copies=copies, top_k=k)


def closest(count, target: int, candidates: Iterable[int]) -> int:
    """The candidate whose count(candidate) is closest to `target`, the smallest on a tie. Counts grow
    with the candidate (one more expert, one more active expert), so the search stops past the target."""
    best = None
    for candidate in candidates:
        distance = abs(count(candidate) - target)
        if best is not None and distance >= best[0]:
            break
        best = (distance, candidate)
    return best[1]
