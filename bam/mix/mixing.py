"""Mixing: one Mixture-of-Experts checkpoint from dense checkpoints (METHOD.md section 3), and
adding one more dense expert to a mixture later (METHOD.md 3.3).

Every output tensor is a pure function of the same-named tensors of the dense sources:

    tensor                        btx       bam       bam-shared   upcycle (one source)
    ffn experts (gate_up, down)   stack     stack     stack        repeat N times
    attn q (weight, bias), o      average   stack     stack        copy
    attn k, v (weight, bias)      average   stack     average      copy
    everything else               average   average   average      copy
    ffn router                    new       new       new          new
    attn router                   -         new       new          -

Nexus (METHOD.md 3.3) takes the seed first, then N domain experts. The seed's FFN becomes the
always-on shared expert, the N domain experts' FFNs are stacked as the routed experts, and every
other tensor is averaged over all N+1 models, as btx does. The router is Nexus's: the given domain
embeddings (one per domain expert) and a new projection (small normals like any new router).
`nexus-bam` and `nexus-bam-shared` are our extension: attention experts as in bam / bam-shared,
one per model, the seed's included (attention has no shared expert; all N+1 are soft-routed).

"stack" puts expert j's tensor in slot j, expert-major (the layout bam/modeling/config.py describes): rows
of q/k/v, columns of o_proj, dim 0 of the 3-D FFN expert tensors. Averages are uniform unless
weights are given (they are normalized to sum to 1). Routers are new, N(0, router_init_std), drawn
from a generator seeded by (seed, tensor name), so a router does not depend on which tensors were
computed before it.

`add_expert` appends one dense model's FFN (and attention, if the mixture has attention experts)
as expert N+1 and merges every other tensor as (1 - λ) * moe + λ * new (see its docstring).

`mix` checks everything it can before it creates any output, then streams: the safetensors header
is written first and each output tensor is computed from the sources just before it is written, so
memory holds one output tensor and one input tensor at a time, never a whole model.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from bam.formats.model_dir import copy_tokenizer, open_model
from bam.formats.source import ModelSource
from bam.io.atomic import atomic_output_dir
from bam.io.tensor_files import SafetensorsFiles, StreamingSafetensorsWriter, WEIGHTS_NAME, is_row_block
from bam.modeling.config import config_from_dict
from bam.modeling.config import BamConfig
from bam.errors import BamError
from bam.mix.nexus import DomainEmbeddings

NEXUS_METHODS = ("nexus", "nexus-bam", "nexus-bam-shared")
METHODS = ("btx", "bam", "bam-shared", "upcycle", *NEXUS_METHODS)
PROVENANCE_NAME = "mix.json"
# Load-balancing coefficient the Nexus paper trains with (METHOD.md 3.1); btx/bam keep the dense
# config's (0.01 by default). `bam train --aux-loss-coef` overrides either.
NEXUS_AUX_LOSS_COEF = 0.05

# Config fields that must agree for two dense models to be experts of one MoE: they fix every
# tensor's shape, or they change the function the shared (averaged) parameters compute.
COMPATIBILITY_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "block", "norm", "norm_eps", "rope_theta", "qkv_bias",
    "tie_word_embeddings", "logit_scale",
)


# ---------------------------------------------------------------------------------------------
# The mixed config


def mixed_config(dense: BamConfig, method: str, n_experts: int, top_k: int = 1,
                 renormalize: bool = False, router_init_std: float = 0.02,
                 domain_embeddings: DomainEmbeddings | None = None,
                 nexus_hidden_dim: int | None = None) -> BamConfig:
    """The dense config with N routed FFN experts, plus attention experts for the bam methods.

    bam / bam-shared have N attention experts; the Nexus methods have N routed experts plus the
    shared one, so nexus-bam / nexus-bam-shared have N+1 attention experts (one per model).
    """
    check_method(method)
    nexus = method in NEXUS_METHODS
    n_models = n_experts + 1 if nexus else n_experts
    fields = dense.to_dict()
    fields.update(
        n_attn_experts=n_models if method.endswith(("bam", "bam-shared")) else 1,
        kv_shared=method.endswith("bam-shared"),
        attn_routing="soft",  # METHOD.md 3.2: soft routing; top-k attention is an ablation only
        attn_top_k=1,
        n_ffn_experts=n_experts,
        ffn_top_k=top_k,
        ffn_renormalize=renormalize,
        router_init_std=router_init_std,
        ffn_router="nexus" if nexus else "linear",
        ffn_shared_expert=nexus,
        nexus_embed_dim=domain_embeddings.dim if nexus else None,
        nexus_hidden_dim=(nexus_hidden_dim or dense.hidden_size) if nexus else None,
        ffn_expert_domains=domain_embeddings.names if nexus else None,
        nexus_embedding_source=domain_embeddings.source if nexus else None,
        router_aux_loss_coef=NEXUS_AUX_LOSS_COEF if nexus else dense.router_aux_loss_coef,
        architectures=["BamForCausalLM"],
    )
    return config_from_dict(fields, f"mixed config ({method})")


def check_method(method: str) -> None:
    if method not in METHODS:
        raise BamError(f"unknown mixing method {method!r}: expected one of {', '.join(METHODS)}")


def parameter_shapes(config: BamConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every stored parameter of `BamForCausalLM(config)`, in module order, the
    tied lm_head left out: the names and order of its `named_parameters()`.

    Computed from the config (the layout bam/modeling/config.py describes) rather than by building the
    model on the meta device, so mixing never imports the model and transformers' modeling code
    (seconds of a `bam mix` run). tests/test_mix.py checks it against the model for every variant.
    """
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    q_width = config.n_attn_experts * config.num_attention_heads * config.head_dim
    kv_width = config.n_kv_experts * config.num_key_value_heads * config.head_dim
    n_ffn = config.n_ffn_experts
    shapes = {"model.embed_tokens.weight": (v, d)}
    for i in range(config.num_hidden_layers):
        layer = f"model.layers.{i}."
        shapes[layer + "input_norm.weight"] = (d,)
        if config.block == "sequential":
            shapes[layer + "post_attention_norm.weight"] = (d,)
        for proj, width in (("q", q_width), ("k", kv_width), ("v", kv_width)):
            shapes[layer + f"attn.{proj}_proj.weight"] = (width, d)
            if config.qkv_bias:
                shapes[layer + f"attn.{proj}_proj.bias"] = (width,)
        shapes[layer + "attn.o_proj.weight"] = (d, q_width)
        if config.n_attn_experts > 1:
            shapes[layer + "attn.router.weight"] = (config.n_attn_experts, d)
        if config.ffn_router == "nexus":
            m, h = config.nexus_embed_dim, config.nexus_hidden_dim
            shapes[layer + "ffn.router.domain_embeddings"] = (n_ffn, m)
            shapes[layer + "ffn.router.gate_up_proj"] = (2 * h, m)
            shapes[layer + "ffn.router.down_proj"] = (d, h)
        elif n_ffn > 1:  # one expert takes every token: no linear router (bam/modeling/moe.py)
            shapes[layer + "ffn.router.weight"] = (n_ffn, d)
        shapes[layer + "ffn.experts.gate_up_proj"] = (n_ffn, 2 * f, d)
        shapes[layer + "ffn.experts.down_proj"] = (n_ffn, d, f)
        if config.ffn_shared_expert:
            shapes[layer + "ffn.shared_expert.gate_up_proj"] = (2 * f, d)
            shapes[layer + "ffn.shared_expert.down_proj"] = (d, f)
    shapes["model.norm.weight"] = (d,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, d)
    return shapes


# ---------------------------------------------------------------------------------------------
# Per-tensor rules: which one applies, and the pure functions that implement them


@dataclass(frozen=True)
class Rule:
    # mix: "average" | "copy" | "stack" | "repeat" | "router" | "shared_expert" | "domain_embeddings"
    # add_expert: "keep" | "append" | "append_embedding" | "router_row" | "merge"
    kind: str
    dim: int = 0  # the dimension experts are stacked along ("stack", "repeat")
    routed_only: bool = False  # "stack" over the domain experts only (Nexus: not the seed)


# Attention tensors each method keeps per expert, and the dim experts are stacked along: rows for
# the input projections ([H*Dh, d] -> [N*H*Dh, d]), columns for the output projection.
STACKED_ATTENTION = {
    "bam": {"q_proj.weight": 0, "q_proj.bias": 0, "k_proj.weight": 0, "k_proj.bias": 0,
            "v_proj.weight": 0, "v_proj.bias": 0, "o_proj.weight": 1},
    "bam-shared": {"q_proj.weight": 0, "q_proj.bias": 0, "o_proj.weight": 1},
}
STACKED_ATTENTION["nexus-bam"] = STACKED_ATTENTION["bam"]
STACKED_ATTENTION["nexus-bam-shared"] = STACKED_ATTENTION["bam-shared"]


def tensor_rule(name: str, method: str) -> Rule:
    """How output tensor `name` is built under `method` (the table in this module's docstring)."""
    if name.endswith(".router.weight"):
        return Rule("router")
    if name.endswith(".ffn.router.domain_embeddings"):
        return Rule("domain_embeddings")
    if ".ffn.router." in name:  # the Nexus projection W1, W2: new, like any router
        return Rule("router")
    if ".ffn.shared_expert." in name:
        return Rule("shared_expert")
    if ".ffn.experts." in name:
        return Rule("repeat" if method == "upcycle" else "stack", 0, routed_only=method in NEXUS_METHODS)
    if method == "upcycle":
        return Rule("copy")
    _, found, leaf = name.rpartition(".attn.")
    dim = STACKED_ATTENTION.get(method, {}).get(leaf) if found else None
    return Rule("average") if dim is None else Rule("stack", dim)


def average(tensors: Iterable[torch.Tensor], weights: Sequence[float] | None = None,
            dtype: torch.dtype | None = None) -> torch.Tensor:
    """sum_j w_j * t_j with w normalized to sum to 1 (uniform without weights).

    Accumulates in at least fp32, so averaging bf16 experts loses nothing before the final cast.
    With weights given, `tensors` may be a lazy iterator: only one input is held at a time.
    """
    if weights is None:
        tensors = list(tensors)
        weights = [1.0] * len(tensors)
    total = float(sum(weights))
    if not weights or total <= 0 or any(w < 0 for w in weights):
        raise BamError(f"averaging weights {list(weights)}: expected non-negative numbers with a positive sum")
    acc = None
    for weight, tensor in zip(weights, tensors, strict=True):
        if acc is None:
            # The first term starts the sum: no zero-filled accumulator to add it to. Scale in
            # place only a copy made by the cast, never the caller's tensor.
            acc = tensor.to(torch.promote_types(tensor.dtype, torch.float32))
            acc = acc * (weight / total) if acc is tensor else acc.mul_(weight / total)
            dtype = dtype or tensor.dtype
        else:
            acc.add_(tensor, alpha=weight / total)  # a bf16 `tensor` is upcast inside the kernel, no copy
    return acc.to(dtype)


def stack(tensors: Iterable[torch.Tensor], n: int, dim: int = 0, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Concatenate n equal-shaped tensors along `dim`, tensor j in slot j (expert-major).

    The output is allocated once and filled in place, so a lazy iterator holds one input at a time.
    """
    out, count = None, 0
    for j, tensor in enumerate(tensors):
        if out is None:
            shape = list(tensor.shape)
            shape[dim] *= n
            out = torch.empty(shape, dtype=dtype or tensor.dtype)
        width = tensor.shape[dim]
        out.narrow(dim, j * width, width).copy_(tensor)
        count += 1
    if count != n:
        raise ValueError(f"stack expected {n} tensors, got {count}")
    return out


def router_seed(seed: int, name: str) -> int:
    """A 63-bit generator seed from (seed, tensor name): independent of processing order."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def new_router(name: str, shape: Sequence[int], std: float, seed: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A fresh router weight ~ N(0, std^2), the same for the same (seed, name) on every machine."""
    generator = torch.Generator().manual_seed(router_seed(seed, name))
    return (torch.randn(tuple(shape), generator=generator, dtype=torch.float32) * std).to(dtype)


# ---------------------------------------------------------------------------------------------
# Checks that run before any output exists


def check_request(sources: Sequence[ModelSource], method: str, num_experts: int | None,
                  top_k: int, weights: Sequence[float] | None, router_init_std: float,
                  domain_embeddings: DomainEmbeddings | None = None) -> int:
    """Validate the options against the sources; returns N, the number of (routed) FFN experts."""
    check_method(method)
    if method not in NEXUS_METHODS and domain_embeddings is not None:
        raise BamError(f"--domain-embeddings applies to the nexus methods, not {method}")
    if method in NEXUS_METHODS:
        n_experts = check_nexus_request(sources, method, num_experts, router_init_std, domain_embeddings)
    elif method == "upcycle":
        if len(sources) != 1:
            raise BamError(f"upcycle takes exactly one model directory, got {len(sources)}")
        if num_experts is None:
            raise BamError("upcycle needs --num-experts N (how many copies of the FFN to make)")
        if weights is not None:
            raise BamError("--weights does not apply to upcycle (one model, nothing is averaged)")
        n_experts = num_experts
    else:
        if not sources:
            raise BamError(f"{method} needs at least one model directory (one per expert)")
        n_experts = len(sources)
        if num_experts is not None and num_experts != n_experts:
            raise BamError(f"--num-experts {num_experts} but {n_experts} model directories were given: "
                           f"{method} makes one expert per directory (repeat a directory to copy it)")
    if n_experts < 1:
        raise BamError(f"--num-experts {n_experts}: expected a positive integer")
    if not 1 <= top_k <= n_experts:
        raise BamError(f"--top-k {top_k}: expected between 1 and the number of experts ({n_experts})")
    if router_init_std < 0:
        raise BamError(f"--router-init-std {router_init_std}: expected a non-negative number")
    if weights is not None:
        if len(weights) != len(sources):
            raise BamError(f"--weights has {len(weights)} values for {len(sources)} models")
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise BamError(f"--weights {','.join(map(str, weights))}: expected non-negative numbers "
                           f"with a positive sum")
    return n_experts


def check_nexus_request(sources: Sequence[ModelSource], method: str, num_experts: int | None,
                        router_init_std: float, domain_embeddings: DomainEmbeddings | None) -> int:
    """Nexus: the seed, then N >= 1 domain experts with one domain embedding each; returns N."""
    if len(sources) < 2:
        raise BamError(f"{method} takes the seed model directory first, then at least one domain expert "
                       f"(got {len(sources)} directory)")
    n_experts = len(sources) - 1
    if num_experts is not None and num_experts != n_experts:
        raise BamError(f"--num-experts {num_experts} but {n_experts} domain experts were given after the seed")
    if domain_embeddings is None:
        raise BamError(f"{method} needs --domain-embeddings FILE (make one with `bam embed-domains`)")
    domain_embeddings.check("--domain-embeddings")
    if len(domain_embeddings.vectors) != n_experts:
        raise BamError(f"--domain-embeddings has {len(domain_embeddings.vectors)} domains "
                       f"({', '.join(domain_embeddings.names)}) for {n_experts} domain experts; "
                       f"pick them in expert order with --domains")
    if router_init_std <= 0:
        # e = W2 SwiGLU(W1 d): with W1 = W2 = 0 each one's gradient is a multiple of the other: stuck at 0.
        raise BamError(f"--router-init-std {router_init_std}: the Nexus projection needs a positive std")
    return n_experts


def check_sources(sources: Sequence[ModelSource]) -> None:
    """Every source is dense, and all of them agree on the architecture and every tensor's shape."""
    first = sources[0]
    for source in sources:
        config = source.config
        if not config.is_dense:
            raise BamError(f"{source.path}: already a mixture (n_ffn_experts={config.n_ffn_experts}, "
                           f"n_attn_experts={config.n_attn_experts}, ffn_router={config.ffn_router!r}, "
                           f"ffn_shared_expert={config.ffn_shared_expert}); mix takes dense models")
    for source in sources[1:]:
        for field in COMPATIBILITY_FIELDS:
            a, b = getattr(first.config, field), getattr(source.config, field)
            if a != b:
                raise BamError(f"experts differ in {field}: {a!r} in {first.path} vs {b!r} in {source.path}")
    shapes = parameter_shapes(first.config)
    for source in sources:
        present = set(source.tensor_names)
        for name in shapes:
            if name not in present:
                raise BamError(f"{source.path}: tensor {name} missing")
        for name, shape in _stored_shapes(source):
            if name in shapes and shape != shapes[name]:
                raise BamError(_shape_message(source, name, shape, shapes[name], first))


def _stored_shapes(source: ModelSource) -> Iterable[tuple[str, tuple[int, ...]]]:
    """Shapes readable without loading tensors: from the safetensors header of our own checkpoints.

    Imported (Hugging Face) sources map and reshape tensors while reading, so their shapes are
    checked as each tensor is read instead (the output is still left unwritten on a mismatch).
    """
    if source.family != "bam":
        return []
    files = SafetensorsFiles(source.path)
    return [(name, files.shape(name)) for name in files.names()]


def _shape_message(source: ModelSource, name: str, shape, expected, reference: ModelSource) -> str:
    return (f"tensor {name} has shape {tuple(shape)} in {source.path} but {tuple(expected)} "
            f"in {reference.path}")


def check_tokenizers(sources: Sequence[ModelSource]) -> None:
    """Experts must share one vocabulary: compare the token model (vocab, merges) of tokenizer.json."""
    reference = None
    for source in sources:
        path = source.tokenizer_dir / "tokenizer.json" if source.tokenizer_dir else None
        if path is None or not path.exists():
            continue
        with open(path, encoding="utf-8") as f:
            token_model = json.load(f).get("model")
        if reference is None:
            reference = (source, token_model)
        elif token_model != reference[1]:
            raise BamError(f"experts have different tokenizers: tokenizer.json of {reference[0].path} "
                           f"and {source.path} differ in vocabulary or merges")


def check_output(out: Path, sources: Sequence[ModelSource], overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise BamError(f"{out}: output already exists (choose another path or pass --overwrite)")
    for source in sources:
        if out.resolve() == Path(source.path).resolve():
            raise BamError(f"{out}: output would replace input model {source.path}")


# ---------------------------------------------------------------------------------------------
# The streaming driver


def source_dtype(source: ModelSource) -> torch.dtype:
    """The checkpoint's dtype, read from one (small) matmul weight rather than a norm, which some
    checkpoints keep in fp32."""
    return source.tensor("model.layers.0.attn.q_proj.weight").dtype


def mix(sources: Sequence[ModelSource], method: str, out: str | Path, *, top_k: int = 1,
        renormalize: bool = False, num_experts: int | None = None, router_init_std: float = 0.02,
        seed: int = 0, weights: Sequence[float] | None = None, overwrite: bool = False,
        progress: bool | None = None, domain_embeddings: DomainEmbeddings | None = None,
        nexus_hidden_dim: int | None = None) -> Path:
    """Write the MoE mixed from `sources` to `out`; returns `out`.

    btx, bam and bam-shared make one expert per source (N = len(sources); pass a directory twice to
    use it twice); upcycle copies one source's FFN into `num_experts` experts. The Nexus methods
    take the seed first and one routed expert per further source; `domain_embeddings` holds one
    vector per routed expert, in their order, and `nexus_hidden_dim` is h' (default: hidden_size).
    The output has the sources' dtype (that of the first source; other sources are cast to it),
    the first source's tokenizer, and a mix.json recording how it was made. `progress=None` shows a
    bar on a terminal.
    """
    out = Path(out)
    n_experts = check_request(sources, method, num_experts, top_k, weights, router_init_std, domain_embeddings)
    check_sources(sources)
    check_tokenizers(sources)
    check_output(out, sources, overwrite)
    config = mixed_config(sources[0].config, method, n_experts, top_k, renormalize, router_init_std,
                          domain_embeddings, nexus_hidden_dim)
    dtype = source_dtype(sources[0])
    config.dtype = dtype

    input_shapes = parameter_shapes(sources[0].config)
    output_shapes = parameter_shapes(config)
    if weights is not None:
        weights = [float(w) / sum(weights) for w in weights]

    def read(source: ModelSource, name: str) -> torch.Tensor:
        tensor = source.tensor(name)
        if tuple(tensor.shape) != input_shapes[name]:
            raise BamError(_shape_message(source, name, tensor.shape, input_shapes[name], sources[0]))
        return tensor

    def read_parts(source: ModelSource, name: str) -> Iterator[torch.Tensor]:
        """`source`'s tensor `name` as row blocks (ModelSource.tensor_parts) in the output dtype,
        checked as they come: each has the tensor's row width, and together they fill its shape."""
        expected = input_shapes[name]
        left = math.prod(expected)
        for part in source.tensor_parts(name):
            left -= part.numel()
            if not is_row_block(part, expected) or left < 0:
                raise BamError(_shape_message(source, name, part.shape, expected, sources[0]))
            yield part.to(dtype)
        if left:
            raise BamError(f"tensor {name} has {math.prod(expected) - left} values in {source.path} but "
                           f"{math.prod(expected)} (shape {expected}) in {sources[0].path}")

    def output(name: str) -> torch.Tensor | Iterable[torch.Tensor]:
        """The output tensor `name`, or for dim-0 stacks its row blocks, which the writer appends
        one after another: expert j's rows follow expert j-1's in the file, so the stacked tensor
        (and, for imported Llama experts, the gate/up concatenation) is never built in memory."""
        rule = tensor_rule(name, method)
        if rule.kind == "router":
            return new_router(name, output_shapes[name], router_init_std, seed, dtype)
        if rule.kind == "copy":
            return read(sources[0], name).to(dtype)
        if rule.kind == "repeat":
            return list(read_parts(sources[0], name)) * n_experts
        if rule.kind == "shared_expert":  # the seed's one FFN: [1, ...] in the dense model -> [...]
            return read_parts(sources[0], name.replace(".ffn.shared_expert.", ".ffn.experts."))
        if rule.kind == "domain_embeddings":
            return torch.stack(list(domain_embeddings.vectors.values())).to(dtype)
        if rule.kind == "stack":
            experts = sources[1:] if rule.routed_only else sources
            if rule.dim == 0:
                return itertools.chain.from_iterable(read_parts(source, name) for source in experts)
            return stack((read(source, name) for source in experts), len(experts), rule.dim, dtype)
        parts = (read(source, name) for source in sources)  # lazy: one input in memory at a time
        return average(parts, weights or [1.0] * len(sources), dtype)

    with atomic_output_dir(out, overwrite=overwrite) as tmp, _one_compute_thread():
        config.save_pretrained(tmp)
        specs = {name: (dtype, shape) for name, shape in output_shapes.items()}
        with StreamingSafetensorsWriter(tmp / WEIGHTS_NAME, specs) as writer:
            for name in tqdm(specs, desc=f"bam mix ({method})", unit="tensor", disable=_quiet(progress)):
                writer.write(name, output(name))
        tokenizer_source = next((s for s in sources if s.tokenizer_dir is not None), None)
        copy_tokenizer(tokenizer_source.tokenizer_dir if tokenizer_source else None, tmp)
        provenance = {
            "method": method,
            "sources": [{"path": str(Path(s.path).resolve()), "family": s.family} for s in sources],
            "n_experts": n_experts,
            "top_k": top_k,
            "renormalize": renormalize,
            "router_init_std": router_init_std,
            "seed": seed,
            "weights": weights,
            "dtype": str(dtype).removeprefix("torch."),
            "tokenizer_from": str(tokenizer_source.path) if tokenizer_source else None,
        }
        if method in NEXUS_METHODS:
            provenance.update(shared_expert_from=provenance["sources"][0]["path"],
                              domains=domain_embeddings.names, nexus_hidden_dim=config.nexus_hidden_dim,
                              embedding_source=domain_embeddings.source)
        (tmp / PROVENANCE_NAME).write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
    return out


# ---------------------------------------------------------------------------------------------
# Adding an expert to a mixture (METHOD.md 3.3, "adding an expert after training")


def added_tensor_rule(name: str, config: BamConfig) -> Rule:
    """How tensor `name` of a mixture with config `config` grows when one dense expert is appended.

        FFN experts; q/o of attention experts (k/v too with KV experts)  append the new model's slice
        Nexus domain embeddings                                         append the new domain's vector
        Nexus projection W1, W2; the shared expert                      keep
        linear FFN router, attention router                             append a new row
        everything else (k/v too with KV sharing)                       merge (1 - λ) * moe + λ * new
    """
    if name.endswith(".ffn.router.domain_embeddings"):
        return Rule("append_embedding")
    if name.endswith(".router.weight"):
        return Rule("router_row")
    if ".ffn.router." in name or ".ffn.shared_expert." in name:
        return Rule("keep")
    if ".ffn.experts." in name:
        return Rule("append", 0)
    _, found, leaf = name.rpartition(".attn.")
    if found and config.n_attn_experts > 1:
        dim = STACKED_ATTENTION["bam-shared" if config.kv_shared else "bam"].get(leaf)
        if dim is not None:
            return Rule("append", dim)
    return Rule("merge")


def grown_config(config: BamConfig, domain: str, linear_router: bool = False) -> BamConfig:
    """The mixture's config with one more routed FFN expert (and attention expert, if it has them);
    `linear_router` swaps a Nexus router for a linear one (`add_expert(..., reset_router=True)`)."""
    fields = config.to_dict()
    fields.update(
        n_ffn_experts=config.n_ffn_experts + 1,
        n_attn_experts=config.n_attn_experts + 1 if config.n_attn_experts > 1 else 1,
        ffn_expert_domains=None if config.ffn_expert_domains is None else [*config.ffn_expert_domains, domain],
    )
    if linear_router:
        fields.update(ffn_router="linear", nexus_embed_dim=None, nexus_hidden_dim=None, nexus_embedding_source=None)
    return config_from_dict(fields, "config with the added expert")


def check_add_request(moe: ModelSource, new: ModelSource, domain: str, embedding: torch.Tensor | None,
                      merge_weight: float, reset_router: bool, router_init_std: float) -> None:
    config = moe.config
    if config.is_dense:
        raise BamError(f"{moe.path}: a dense model; add-expert appends to a mixture (make one with bam mix)")
    if not new.config.is_dense:
        raise BamError(f"{new.path}: already a mixture (n_ffn_experts={new.config.n_ffn_experts}); "
                       "the new expert must be a dense model")
    for field in COMPATIBILITY_FIELDS:
        a, b = getattr(config, field), getattr(new.config, field)
        if a != b:
            raise BamError(f"new expert differs from the mixture in {field}: {b!r} in {new.path} vs {a!r} in {moe.path}")
    if not isinstance(domain, str) or not domain:
        raise BamError(f"--domain {domain!r}: expected a domain name")
    if domain in (config.ffn_expert_domains or []):
        raise BamError(f"--domain {domain}: the mixture already has an expert for it "
                       f"(experts: {', '.join(config.ffn_expert_domains)})")
    if config.ffn_router == "nexus" and not reset_router:
        if embedding is None:
            raise BamError(f"{moe.path}: a Nexus mixture needs the new domain's embedding")
        if tuple(embedding.shape) != (config.nexus_embed_dim,):
            raise BamError(f"domain embedding of {domain!r} has shape {tuple(embedding.shape)}, the mixture's "
                           f"have ({config.nexus_embed_dim},) (nexus_embed_dim): embed it like the others")
        if not bool(torch.isfinite(embedding).all()):
            raise BamError(f"domain embedding of {domain!r} has non-finite values")
    elif embedding is not None:
        router = "a reset (new linear) router" if reset_router else f"ffn_router={config.ffn_router!r}"
        raise BamError(f"{moe.path}: {router} has no domain embeddings; pass none")
    if not 0 < merge_weight <= 1:
        raise BamError(f"--merge-weight {merge_weight}: expected a number in (0, 1]")
    if router_init_std < 0:
        raise BamError(f"--router-init-std {router_init_std}: expected a non-negative number")


def add_expert(moe: str | Path | ModelSource, new: str | Path | ModelSource, domain: str,
               embedding: torch.Tensor | None, out: str | Path, *, reset_router: bool = False,
               merge_weight: float | None = None, router_init_std: float | None = None, seed: int = 0,
               overwrite: bool = False, progress: bool | None = None) -> Path:
    """Write `moe` with the dense model `new` appended as routed expert N+1 to `out`; returns `out`.

    - The new model's FFN becomes the last routed expert. If the mixture has attention experts,
      the new model's Q and O (and K, V, unless K/V are shared) become the last attention expert.
    - Nexus: `embedding` [nexus_embed_dim] becomes the last row of every layer's domain
      embeddings. Compute it the way the mixture's were (bam.mix.nexus with the mixture's
      `nexus_embedding_source`). The projection is kept as trained (no router reset), so the new
      expert is routed by P(d_new) from the start.
    - A linear FFN router and an attention router each get one new row ~ N(0, router_init_std^2)
      (default: the mixture's router_init_std), seeded by (seed, tensor name, domain); the
      trained rows are kept.
    - `reset_router` replaces the whole FFN router by a new linear one ~ N(0, router_init_std^2)
      over all N+1 experts, whatever the mixture had (a Nexus router's projection and domain
      embeddings are dropped): the "linear router reset" baseline METHOD.md 3.3 compares Nexus with.
    - The shared expert is kept. Every other tensor (embeddings, norms, LM head, averaged
      attention, shared K/V) becomes (1 - λ) * moe + λ * new with λ = `merge_weight`, by default
      1/(N+1), N = routed experts before adding (METHOD.md 3.3). (For a Nexus mixture of a seed and
      N experts those tensors average N+1 models, so 1/(N+2) would be the exact running mean; we
      keep the paper's 1/(N+1).)

    `out` gets the mixture's dtype and tokenizer and a mix.json: the mixture's, plus this addition.
    Everything is checked before `out` is created, and tensors are streamed as in `mix`.
    """
    moe = moe if isinstance(moe, ModelSource) else open_model(moe)
    new = new if isinstance(new, ModelSource) else open_model(new)
    out = Path(out)
    config = moe.config
    n_experts = config.n_ffn_experts
    lam = 1.0 / (n_experts + 1) if merge_weight is None else float(merge_weight)
    std = config.router_init_std if router_init_std is None else float(router_init_std)
    check_add_request(moe, new, domain, embedding, lam, reset_router, std)
    check_sources([new])
    check_tokenizers([moe, new])
    check_output(out, [moe, new], overwrite)

    new_config = grown_config(config, domain, linear_router=reset_router and config.ffn_router == "nexus")
    dtype = source_dtype(moe)
    new_config.dtype = dtype
    moe_shapes, new_shapes = parameter_shapes(config), parameter_shapes(new.config)
    output_shapes = parameter_shapes(new_config)
    names = list(output_shapes)

    def read(source: ModelSource, name: str) -> torch.Tensor:
        tensor = source.tensor(name)
        expected = (moe_shapes if source is moe else new_shapes)[name]
        if tuple(tensor.shape) != expected:
            raise BamError(f"{source.path}: tensor {name} has shape {tuple(tensor.shape)}, expected {expected}")
        return tensor.to(dtype)

    def output_tensor(name: str) -> torch.Tensor:
        rule = added_tensor_rule(name, config)
        if rule.kind == "keep":
            return read(moe, name)
        if rule.kind == "append_embedding":
            return torch.cat([read(moe, name), embedding.detach().reshape(1, -1).to(dtype)])
        if rule.kind == "router_row":
            # No old linear router: the mixture had a Nexus one (reset), or a single routed expert,
            # which needs no router (bam/modeling/moe.py).
            if name not in moe_shapes or (reset_router and ".ffn." in name):
                return new_router(name, output_shapes[name], std, seed, dtype)
            row = new_router(f"{name}/added/{domain}", (1, output_shapes[name][1]), std, seed, dtype)
            return torch.cat([read(moe, name), row])
        if rule.kind == "append":
            return torch.cat([read(moe, name), read(new, name)], dim=rule.dim)
        return average([read(moe, name), read(new, name)], [1.0 - lam, lam], dtype)

    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        new_config.save_pretrained(tmp)
        specs = {name: (dtype, output_shapes[name]) for name in names}
        with StreamingSafetensorsWriter(tmp / WEIGHTS_NAME, specs) as writer:
            for name in tqdm(names, desc="bam add-expert", unit="tensor", disable=_quiet(progress)):
                writer.write(name, output_tensor(name))
        copy_tokenizer(moe.tokenizer_dir, tmp)
        provenance_path = Path(moe.path) / PROVENANCE_NAME
        provenance = json.loads(provenance_path.read_text(encoding="utf-8")) if provenance_path.is_file() else {}
        provenance.setdefault("added_experts", []).append({
            "domain": domain,
            "path": str(Path(new.path).resolve()),
            "family": new.family,
            "into": str(Path(moe.path).resolve()),
            "expert_index": n_experts,
            "merge_weight": lam,
            "reset_router": reset_router,
            "router_init_std": std,
            "seed": seed,
        })
        (tmp / PROVENANCE_NAME).write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
    return out


@contextlib.contextmanager
def _one_compute_thread() -> Iterator[None]:
    """Run torch ops on one thread while the writer hashes and writes on a thread of its own.

    Averaging is memory-bound, so more threads gain little, and with more busy threads than
    cores an OpenMP worker that is descheduled stalls the whole op: a full-size mix on 2 busy
    cores took ~20% less wall time this way. The setting is process-wide, so it is restored.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _quiet(progress: bool | None) -> bool | None:
    # tqdm's disable=None means "disable when not writing to a terminal".
    return None if progress is None else not progress
