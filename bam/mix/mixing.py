"""Mixing: one Mixture-of-Experts checkpoint from dense checkpoints (METHOD.md section 3).

Every output tensor is a pure function of the same-named tensors of the dense sources; which
function, under each method, is the table in bam/mix/rules.py. This file holds the mixed config,
the checks, and the driver that runs the rules.

`mix` checks everything it can before it creates any output, then streams: the safetensors header
is written first and each output tensor is computed from the sources just before it is written, so
memory holds one output tensor and one input tensor at a time, never a whole model. `add_expert`
(bam/mix/add_expert.py) reuses the checks and streams the same way.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from bam.errors import BamError
from bam.formats.model_dir import copy_tokenizer
from bam.formats.source import ModelSource
from bam.io.atomic import atomic_output_dir
from bam.io.tensor_files import SafetensorsFiles, StreamingSafetensorsWriter, WEIGHTS_NAME, is_row_block
from bam.mix.nexus import DomainEmbeddings
from bam.mix.provenance import write_provenance
from bam.mix.rules import METHODS, NEXUS_METHODS, average, new_router, stack, tensor_rule
from bam.modeling.config import ATTN_ROUTINGS, COMPATIBILITY_FIELDS, BamConfig, config_from_dict
from bam.modeling.layout import Param, parameter_shapes, parameters

# Load-balancing coefficient the Nexus paper trains with (METHOD.md 3.1); btx/bam keep the dense
# config's (0.01 by default). `bam train --aux-loss-coef` overrides either.
NEXUS_AUX_LOSS_COEF = 0.05


# ---------------------------------------------------------------------------------------------
# The mixed config


def mixed_config(dense: BamConfig, method: str, n_experts: int, top_k: int = 1,
                 renormalize: bool = False, router_init_std: float = 0.02,
                 domain_embeddings: DomainEmbeddings | None = None,
                 nexus_hidden_dim: int | None = None, attn_routing: str = "soft",
                 attn_top_k: int = 1) -> BamConfig:
    """The dense config with N routed FFN experts, plus attention experts for the bam methods.

    bam / bam-shared have N attention experts; the Nexus methods have N routed experts plus the
    shared one, so nexus-bam / nexus-bam-shared have N+1 attention experts (one per model).
    `attn_routing="topk"` with `attn_top_k` K routes each token to K attention experts instead of
    all of them (the paper's ablation; check_request refuses it for methods without attention experts).
    """
    check_method(method)
    nexus = method in NEXUS_METHODS
    n_models = n_experts + 1 if nexus else n_experts
    fields = dense.to_dict()
    fields.update(
        n_attn_experts=n_models if method.endswith(("bam", "bam-shared")) else 1,
        kv_shared=method.endswith("bam-shared"),
        attn_routing=attn_routing,  # METHOD.md 3.2: soft by default; top-k attention is an ablation only
        attn_top_k=attn_top_k,
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


# ---------------------------------------------------------------------------------------------
# Checks that run before any output exists


def check_request(sources: Sequence[ModelSource], method: str, num_experts: int | None,
                  top_k: int, weights: Sequence[float] | None, router_init_std: float,
                  domain_embeddings: DomainEmbeddings | None = None, attn_routing: str = "soft",
                  attn_top_k: int = 1) -> int:
    """Validate the options against the sources; returns N, the number of (routed) FFN experts."""
    check_method(method)
    check_attention_routing(method, len(sources), attn_routing, attn_top_k)
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


def check_attention_routing(method: str, n_sources: int, attn_routing: str, attn_top_k: int) -> None:
    """Top-k attention routing needs attention experts to route among: one per source of the bam methods."""
    if attn_routing not in ATTN_ROUTINGS:
        raise BamError(f"--attn-routing {attn_routing!r}: expected one of {', '.join(ATTN_ROUTINGS)}")
    if attn_routing == "soft":
        if attn_top_k != 1:
            raise BamError(f"--attn-top-k {attn_top_k} applies to --attn-routing topk (soft routing uses every expert)")
        return
    if not method.endswith(("bam", "bam-shared")):
        raise BamError(f"--attn-routing topk applies to methods with attention experts "
                       f"(bam, bam-shared, nexus-bam, nexus-bam-shared), not {method}")
    if not 1 <= attn_top_k <= n_sources:
        raise BamError(f"--attn-top-k {attn_top_k}: expected between 1 and the number of attention experts "
                       f"({n_sources}, one per model directory)")


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
        if config.adapter is not None:  # its tensors have no mixing rule yet (bam/mix/rules.py)
            raise BamError(f"{source.path}: has an adapter (config field adapter={config.adapter!r}); "
                           f"mix takes dense models without one")
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
        nexus_hidden_dim: int | None = None, attn_routing: str = "soft", attn_top_k: int = 1) -> Path:
    """Write the MoE mixed from `sources` to `out`; returns `out`.

    btx, bam and bam-shared make one expert per source (N = len(sources); pass a directory twice to
    use it twice); upcycle copies one source's FFN into `num_experts` experts. The Nexus methods
    take the seed first and one routed expert per further source; `domain_embeddings` holds one
    vector per routed expert, in their order, and `nexus_hidden_dim` is h' (default: hidden_size).
    `attn_routing="topk"` routes each token to `attn_top_k` of the attention experts (bam methods; an
    ablation, METHOD.md 3.2): the tensors are those of soft routing, only the config differs.
    The output has the sources' dtype (that of the first source; other sources are cast to it),
    the first source's tokenizer, and a mix.json recording how it was made. `progress=None` shows a
    bar on a terminal.
    """
    out = Path(out)
    n_experts = check_request(sources, method, num_experts, top_k, weights, router_init_std, domain_embeddings,
                              attn_routing, attn_top_k)
    check_sources(sources)
    check_tokenizers(sources)
    check_output(out, sources, overwrite)
    config = mixed_config(sources[0].config, method, n_experts, top_k, renormalize, router_init_std,
                          domain_embeddings, nexus_hidden_dim, attn_routing, attn_top_k)
    dtype = source_dtype(sources[0])
    config.dtype = dtype

    input_shapes = parameter_shapes(sources[0].config)
    outputs = parameters(config)
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

    def output(param: Param) -> torch.Tensor | Iterable[torch.Tensor]:
        """The output tensor `param`, or for dim-0 stacks its row blocks, which the writer appends
        one after another: expert j's rows follow expert j-1's in the file, so the stacked tensor
        (and, for imported Llama experts, the gate/up concatenation) is never built in memory."""
        name, rule = param.name, tensor_rule(param, method)
        if rule.kind == "router":
            return new_router(name, param.shape, router_init_std, seed, dtype)
        if rule.kind == "copy":
            return read(sources[0], name).to(dtype)
        if rule.kind == "repeat":
            return list(read_parts(sources[0], name)) * n_experts
        if rule.kind == "shared_expert":  # the seed's one FFN: [1, ...] in the dense model -> [...]
            # (a bias [1, F] is one row of [F]: the parts lose the leading expert dim)
            return (part.reshape(-1, *param.shape[1:])
                    for part in read_parts(sources[0], name.replace(".ffn.shared_expert.", ".ffn.experts.")))
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
        specs = {param.name: (dtype, param.shape) for param in outputs}
        with StreamingSafetensorsWriter(tmp / WEIGHTS_NAME, specs) as writer:
            for param in tqdm(outputs, desc=f"bam mix ({method})", unit="tensor", disable=progress_disabled(progress)):
                writer.write(param.name, output(param))
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
        write_provenance(tmp, provenance)
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


def progress_disabled(progress: bool | None) -> bool | None:
    # tqdm's disable=None means "disable when not writing to a terminal".
    return None if progress is None else not progress
