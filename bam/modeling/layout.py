"""The parameter layout of a BamConfig: every tensor's name, shape and role, as one table.

This is the one place the layout is written out. Code that needs the tensors of a model it has not
built reads them here: mixing and adding an expert (which rule builds each tensor follows from its
role, bam/mix/rules.py), import and export (each Hugging Face family names the roles' tensors in
its own conversion map, bam/formats/names.py), training (which parameters decay, which never
train, the `--train-only` groups: bam/train/optim.py) and the cost model (bam/modeling/cost.py).
The model builds the same tensors from its modules; tests/test_mix.py checks the table against it
for every variant. The arrangement inside each tensor (expert-major stacking, the fused gate/up
projection) is the one bam/modeling/config.py describes.

    role               tensors                                    experts along   decays  trains
    embedding          model.embed_tokens.weight                  -               yes     yes
    lm_head            lm_head.weight (absent when tied)          -               yes     yes
    norm               input_norm, post_attention_norm, norm;     -               no      yes
                       attn_output_norm, ffn_output_norm (post) or all four (sandwich);
                       ffn_input_norm (parallel_ffn_norm); each a weight, and a bias with norm_bias
    attn_query         attn.q_proj (weight, bias), attn.o_proj,   q: 0, o: 1      yes     yes
                       attn.q_norm (qk_norm)                      0               no      yes
    attn_key_value     attn.k_proj, attn.v_proj (weight, bias),   0               yes     yes
                       attn.k_norm (qk_norm)                      0               no      yes
    attn_output        attn.o_proj.bias (attn_output_bias)        -               no      yes
    attn_router        attn.router.weight                         -               no      yes
    ffn_router         ffn.router.weight (linear router)          -               no      yes
    nexus_projection   ffn.router.gate_up_proj, down_proj (W1,W2) -               no      yes
    domain_embeddings  ffn.router.domain_embeddings               0               no      no
    ffn_experts        ffn.experts.gate_up_proj, down_proj        0               yes     yes
                       (up_proj if not ffn_gated; biases: ffn_bias)
    shared_expert      ffn.shared_expert.gate_up_proj, down_proj  -               yes     yes
    adapter            attn.adapter.*, ffn.adapter.* (adapter)    -               yes     yes
                       (LoRA's A and B matrices decay; (IA)³'s 1-D vectors do not)

The q/k norms (`qk_norm`) belong to the attention expert whose heads they normalize, so BAM stacks
them with its queries (and keys, with KV experts) and BTX averages them. Each holds one weight per
expert, stacked expert-major into one 1-D tensor: per head (Qwen3) q_norm [n_attn_experts * head_dim]
and k_norm [n_kv_experts * head_dim]; over all heads (qk_norm_scope='all', OLMo 2) q_norm
[n_attn_experts * H * head_dim] and k_norm [n_kv_experts * H_kv * head_dim]; 1-D, so like every
norm weight they do not decay.

The output projection's bias (attn_output_bias, GPT-NeoX) is one per layer, not per attention
expert: the soft gates sum to 1, so sum_j g_j (o_j + b) = sum_j g_j o_j + b. Every method averages
it, which for copies of one model is that model's bias (the mixture then equals the dense model).

With norm_placement='post' (OLMo 2) a layer has no input norms: `attn_output_norm` normalizes the
attention's output (the mixture's, after o_proj) and `ffn_output_norm` the FFN's, each before the
residual add; one per layer like any norm, so every method averages them.
With norm_placement='sandwich' (Gemma 2, 3) a layer has both: `input_norm` and `post_attention_norm`
(the FFN's input norm, Llama's name) as with 'pre', then `attn_output_norm` and `ffn_output_norm` as
with 'post'. With norm_weight_offset (Gemma) a norm weight w stands for the factor offset + w; the
map is affine, so averaging the weights averages the factors and every method keeps its meaning.

Biases decay in no role (the nanoGPT/LLaMA convention, as for norms). Routers do not decay either:
decay pulls them to zero, towards uniform routing, which fights the experts' specialisation. A
Nexus expert's domain embedding is a fixed description of its data (METHOD.md 3.3): never trained.

An adapter (config.adapter, bam/modeling/adapters.py) adds, after each sublayer's own tensors and
per targeted projection: for LoRA `{proj}_lora_A` [r, I] and `{proj}_lora_B` [O, r] (PEFT's lora_A
and lora_B weights), the FFN's fused input as two pairs, `gate_up_proj_lora_A` [2, r, D] and
`gate_up_proj_lora_B` [2, F, r] (gate first); for (IA)³ `{proj}_ia3`, the output's width for q/k/v
and down_proj's input width F. Decay would pull an (IA)³ vector to 0, not to its identity 1: they
are 1-D, so they do not decay.

With adapter experts (config.adapter_experts) the experts share one copy of the seed's weights
(`n_weight_copies`: q/k/v/o, their norms and the FFN's [1, ...] stack hold one expert's worth) and
each adapter tensor gains a leading expert dim, one adapter per expert of its projection
(`projection_experts`: q/o n_attn_experts, k/v n_kv_experts, the FFN's n_ffn_experts), e.g.
`q_proj_lora_A` [Na, r, D], `gate_up_proj_lora_B` [E, 2, F, r], `down_proj_ia3` [E, F]; their 2-D
stacks of vectors still do not decay.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from bam.modeling.config import BamConfig


@dataclass(frozen=True)
class Role:
    decays: bool
    trained: bool = True


ROLES = {
    "embedding": Role(decays=True),
    "lm_head": Role(decays=True),
    "norm": Role(decays=False),
    "attn_query": Role(decays=True),  # one per attention expert
    "attn_key_value": Role(decays=True),  # one per attention expert, or one shared (kv_shared)
    "attn_output": Role(decays=False),  # the output projection's bias: one per layer, whatever the experts
    "attn_router": Role(decays=False),
    "ffn_router": Role(decays=False),
    "nexus_projection": Role(decays=False),
    "domain_embeddings": Role(decays=False, trained=False),
    "ffn_experts": Role(decays=True),
    "shared_expert": Role(decays=True),
    "adapter": Role(decays=True),  # LoRA's matrices; (IA)³'s vectors are 1-D, which never decay
}
# The routers' trained parts: new at every mix, the usual post-mix warm-up (a Nexus router's domain
# embeddings are fixed, so they are not among them).
ROUTER_ROLES = ("attn_router", "ffn_router", "nexus_projection")


@dataclass(frozen=True)
class Param:
    """One stored tensor: `name` as in `named_parameters()`, `local` its name inside the layer
    (the full name outside layers), `expert_dim` the dimension experts are laid along, expert-major
    (None where a tensor is not per expert)."""

    name: str
    shape: tuple[int, ...]
    role: str
    expert_dim: int | None = None
    layer: int | None = None

    @property
    def local(self) -> str:
        return self.name if self.layer is None else self.name.removeprefix(f"model.layers.{self.layer}.")

    @property
    def decays(self) -> bool:
        # Matrices decay, vectors (norm weights, biases, (IA)³'s) never: the FFN experts' biases
        # (ffn_bias) and adapter experts' (IA)³ vectors are [E, ...] stacks of vectors, so they are
        # known by their names.
        return ROLES[self.role].decays and len(self.shape) >= 2 and not self.name.endswith(("bias", "_ia3"))

    @property
    def trained(self) -> bool:
        return ROLES[self.role].trained

    def numel(self) -> int:
        return math.prod(self.shape)


def qk_norm_widths(config: BamConfig) -> tuple[int, int]:
    """One attention expert's query and key norm widths: a head's (Qwen3) or all heads' (OLMo 2)."""
    a = config.head_dim
    if config.qk_norm_scope == "head":
        return a, a
    return config.num_attention_heads * a, config.num_key_value_heads * a


def layer_parameters(config: BamConfig, i: int) -> list[Param]:
    """The tensors of layer `i`, in module order."""
    d = config.hidden_size
    n_q, n_kv = config.n_weight_copies(config.n_attn_experts), config.n_weight_copies(config.n_kv_experts)
    q_width = n_q * config.num_attention_heads * config.head_dim
    kv_width = n_kv * config.num_key_value_heads * config.head_dim
    n_ffn = config.n_ffn_experts
    prefix = f"model.layers.{i}."

    def param(local: str, shape: tuple[int, ...], role: str, expert_dim: int | None = None) -> Param:
        return Param(prefix + local, shape, role, expert_dim, i)

    def norms(*names: str) -> list[Param]:  # each norm's weight, and its bias with norm_bias
        kinds = ("weight", "bias") if config.norm_bias else ("weight",)
        return [param(f"{name}.{kind}", (d,), "norm") for name in names for kind in kinds]

    if config.norm_placement == "post":  # OLMo 2: each sublayer's output, before the residual add
        params = norms("attn_output_norm", "ffn_output_norm")
    else:
        params = norms("input_norm")
        if config.block == "sequential":
            params += norms("post_attention_norm")
    if config.parallel_ffn_norm:  # GPT-NeoX: the parallel block's FFN reads a norm of its own
        params += norms("ffn_input_norm")
    if config.norm_placement == "sandwich":  # Gemma 2, 3: the 'pre' norms, then the 'post' ones
        params += norms("attn_output_norm", "ffn_output_norm")
    for proj, width, role in (("q", q_width, "attn_query"), ("k", kv_width, "attn_key_value"),
                              ("v", kv_width, "attn_key_value")):
        params.append(param(f"attn.{proj}_proj.weight", (width, d), role, 0))
        if config.qkv_bias:
            params.append(param(f"attn.{proj}_proj.bias", (width,), role, 0))
    params.append(param("attn.o_proj.weight", (d, q_width), "attn_query", 1))
    if config.attn_output_bias:  # one per layer, not per expert (see ROLES)
        params.append(param("attn.o_proj.bias", (d,), "attn_output"))
    if config.qk_norm:
        q_norm, k_norm = qk_norm_widths(config)
        params += [param("attn.q_norm.weight", (n_q * q_norm,), "attn_query", 0),
                   param("attn.k_norm.weight", (n_kv * k_norm,), "attn_key_value", 0)]
    if config.n_attn_experts > 1:
        params.append(param("attn.router.weight", (config.n_attn_experts, d), "attn_router"))
    experts_dim = 0 if config.adapter_experts else None
    params += [param(f"attn.adapter.{local}", shape, "adapter", experts_dim)
               for local, shape in adapter_shapes(config, "attn")]
    if config.ffn_router == "nexus":
        m, h = config.nexus_embed_dim, config.nexus_hidden_dim
        params += [param("ffn.router.domain_embeddings", (n_ffn, m), "domain_embeddings", 0),
                   param("ffn.router.gate_up_proj", (2 * h, m), "nexus_projection"),
                   param("ffn.router.down_proj", (d, h), "nexus_projection")]
    elif n_ffn > 1:  # one expert takes every token: no linear router (bam/modeling/moe.py)
        params.append(param("ffn.router.weight", (n_ffn, d), "ffn_router"))
    params += [param(f"ffn.experts.{local}", (config.n_weight_copies(n_ffn), *shape), "ffn_experts", 0)
               for local, shape in ffn_shapes(config)]
    if config.ffn_shared_expert:
        params += [param(f"ffn.shared_expert.{local}", shape, "shared_expert") for local, shape in ffn_shapes(config)]
    params += [param(f"ffn.adapter.{local}", shape, "adapter", experts_dim)
               for local, shape in adapter_shapes(config, "ffn")]
    return params


def adapted_projections(config: BamConfig, sublayer: str) -> list[tuple[str, int, int, int]]:
    """The projections of one layer's `sublayer` ('attn' or 'ffn') that config.adapter targets, as
    (our name, input width, output width of one piece, pieces), in module order: a LoRA on gate_proj
    and up_proj is the two pieces of our fused gate_up_proj (gate first)."""
    if config.adapter is None:
        return []
    d, f, a = config.hidden_size, config.intermediate_size, config.head_dim
    q, kv = config.num_attention_heads * a, config.num_key_value_heads * a
    targets = set(config.adapter_targets)
    if sublayer == "attn":
        widths = {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d)}
        return [(name, i, o, 1) for name, (i, o) in widths.items() if name in targets]
    found = []
    if {"gate_proj", "up_proj"} <= targets:
        found.append(("gate_up_proj", d, f, 2))
    elif "up_proj" in targets:  # a non-gated FFN's input projection (ffn_gated=False)
        found.append(("up_proj", d, f, 1))
    if "down_proj" in targets:
        found.append(("down_proj", f, d, 1))
    return found


def adapter_shapes(config: BamConfig, sublayer: str) -> list[tuple[str, tuple[int, ...]]]:
    """The adapter tensors of one layer's `sublayer` and their shapes, in module order
    (bam/modeling/adapters.py Adapter): per targeted projection, LoRA's A [r, I] and B [O, r] (with a
    leading 2 for the fused gate_up_proj's two pairs), or (IA)³'s vector: the output's width, or
    the input's for down_proj (PEFT's feedforward module, whose input it rescales)."""
    shapes = []
    for name, i, o, pieces in adapted_projections(config, sublayer):
        lead = (pieces,) if pieces > 1 else ()
        if config.adapter_experts:  # one adapter per expert of the projection, stacked
            lead = (config.projection_experts(name), *lead)
        if config.adapter == "lora":
            r = config.lora_rank
            shapes += [(f"{name}_lora_A", (*lead, r, i)), (f"{name}_lora_B", (*lead, o, r))]
        else:
            shapes.append((f"{name}_ia3", (*lead, i if name == "down_proj" else o)))
    return shapes


def ffn_shapes(config: BamConfig) -> list[tuple[str, tuple[int, ...]]]:
    """One FFN's tensors and shapes, in module order (bam/modeling/moe.py FFNParameters): the input
    projection, [gate; up] rows of a gated MLP or up alone (ffn_gated=False), down_proj, then with
    ffn_bias their biases. The FFN experts stack E of these along a leading dim."""
    d, f = config.hidden_size, config.intermediate_size
    in_proj, in_width = ("gate_up_proj", 2 * f) if config.ffn_gated else ("up_proj", f)
    shapes = [(in_proj, (in_width, d)), ("down_proj", (d, f))]
    if config.ffn_bias:
        shapes += [(f"{in_proj}_bias", (in_width,)), ("down_proj_bias", (d,))]
    return shapes


def parameters(config: BamConfig) -> list[Param]:
    """Every stored parameter of `BamForCausalLM(config)` in module order, the tied lm_head left
    out: the names, order and shapes of its `named_parameters()`.

    Computed from the config rather than by building the model on the meta device, so mixing
    never imports the model and transformers' modeling code (seconds of a `bam mix` run).
    """
    d, v = config.hidden_size, config.vocab_size
    params = [Param("model.embed_tokens.weight", (v, d), "embedding")]
    for i in range(config.num_hidden_layers):
        params += layer_parameters(config, i)
    params.append(Param("model.norm.weight", (d,), "norm"))
    if config.norm_bias:
        params.append(Param("model.norm.bias", (d,), "norm"))
    if not config.tie_word_embeddings:
        params.append(Param("lm_head.weight", (v, d), "lm_head"))
    return params


def parameter_table(config: BamConfig) -> dict[str, Param]:
    """`parameters(config)` by name."""
    return {param.name: param for param in parameters(config)}


def parameter_shapes(config: BamConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every stored parameter, in module order (see `parameters`)."""
    return {param.name: param.shape for param in parameters(config)}
