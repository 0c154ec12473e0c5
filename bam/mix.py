"""Mixing: one Mixture-of-Experts checkpoint from dense checkpoints (METHOD.md section 3).

Every output tensor is a pure function of the same-named tensors of the N dense sources:

    tensor                        btx       bam       bam-shared   upcycle (one source)
    ffn experts (gate_up, down)   stack     stack     stack        repeat N times
    attn q (weight, bias), o      average   stack     stack        copy
    attn k, v (weight, bias)      average   stack     average      copy
    everything else               average   average   average      copy
    ffn router                    new       new       new          new
    attn router                   -         new       new          -

"stack" puts expert j's tensor in slot j, expert-major (the layout bam/config.py describes): rows
of q/k/v, columns of o_proj, dim 0 of the 3-D FFN expert tensors. Averages are uniform unless
weights are given (they are normalized to sum to 1). Routers are new, N(0, router_init_std), drawn
from a generator seeded by (seed, tensor name), so a router does not depend on which tensors were
computed before it.

`mix` checks everything it can before it creates any output, then streams: the safetensors header
is written first and each output tensor is computed from the sources just before it is written, so
memory holds one output tensor and one input tensor at a time, never a whole model.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from bam.checkpoint import (
    WEIGHTS_NAME,
    ModelSource,
    SafetensorsFiles,
    StreamingSafetensorsWriter,
    atomic_output_dir,
    config_from_dict,
    copy_tokenizer,
    expected_tensor_names,
)
from bam.config import BamConfig
from bam.errors import BamError

METHODS = ("btx", "bam", "bam-shared", "upcycle")
PROVENANCE_NAME = "mix.json"

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
                 renormalize: bool = False, router_init_std: float = 0.02) -> BamConfig:
    """The dense config with N FFN experts, plus N attention experts for bam / bam-shared."""
    check_method(method)
    has_attn_experts = method in ("bam", "bam-shared")
    fields = dense.to_dict()
    fields.update(
        n_attn_experts=n_experts if has_attn_experts else 1,
        kv_shared=method == "bam-shared",
        attn_routing="soft",  # METHOD.md 3.2: soft routing; top-k attention is an ablation only
        attn_top_k=1,
        n_ffn_experts=n_experts,
        ffn_top_k=top_k,
        ffn_renormalize=renormalize,
        router_init_std=router_init_std,
        architectures=["BamForCausalLM"],
    )
    return config_from_dict(fields, f"mixed config ({method})")


def check_method(method: str) -> None:
    if method not in METHODS:
        raise BamError(f"unknown mixing method {method!r}: expected one of {', '.join(METHODS)}")


def parameter_shapes(config: BamConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every stored parameter of a model with this config (built on the meta device)."""
    from bam.model import BamForCausalLM  # noqa: PLC0415  (model imports are heavy; config-only users skip them)

    with torch.device("meta"):
        model = BamForCausalLM(config)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


# ---------------------------------------------------------------------------------------------
# Per-tensor rules: which one applies, and the pure functions that implement them


@dataclass(frozen=True)
class Rule:
    kind: str  # "average" | "copy" | "stack" | "repeat" | "router"
    dim: int = 0  # the dimension experts are stacked along ("stack", "repeat")


# Attention tensors each method keeps per expert, and the dim experts are stacked along: rows for
# the input projections ([H*Dh, d] -> [N*H*Dh, d]), columns for the output projection.
STACKED_ATTENTION = {
    "bam": {"q_proj.weight": 0, "q_proj.bias": 0, "k_proj.weight": 0, "k_proj.bias": 0,
            "v_proj.weight": 0, "v_proj.bias": 0, "o_proj.weight": 1},
    "bam-shared": {"q_proj.weight": 0, "q_proj.bias": 0, "o_proj.weight": 1},
}


def tensor_rule(name: str, method: str) -> Rule:
    """How output tensor `name` is built under `method` (the table in this module's docstring)."""
    if name.endswith(".router.weight"):
        return Rule("router")
    if ".ffn.experts." in name:
        return Rule("repeat" if method == "upcycle" else "stack", 0)
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
            acc = torch.zeros(tensor.shape, dtype=torch.promote_types(tensor.dtype, torch.float32))
            dtype = dtype or tensor.dtype
        acc.add_(tensor.to(acc.dtype), alpha=weight / total)
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


def repeat_experts(tensor: torch.Tensor, n: int) -> torch.Tensor:
    """Sparse upcycling: a one-expert tensor [1, ...] copied into n identical experts [n, ...]."""
    return tensor.repeat(n, *[1] * (tensor.dim() - 1))


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
                  top_k: int, weights: Sequence[float] | None, router_init_std: float) -> int:
    """Validate the options against the sources; returns N, the number of experts."""
    check_method(method)
    if method == "upcycle":
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
        if len(weights) != n_experts:
            raise BamError(f"--weights has {len(weights)} values for {n_experts} models")
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise BamError(f"--weights {','.join(map(str, weights))}: expected non-negative numbers "
                           f"with a positive sum")
    return n_experts


def check_sources(sources: Sequence[ModelSource]) -> None:
    """Every source is dense, and all of them agree on the architecture and every tensor's shape."""
    first = sources[0]
    for source in sources:
        config = source.config
        if config.n_ffn_experts > 1 or config.n_attn_experts > 1:
            raise BamError(f"{source.path}: already a mixture (n_ffn_experts={config.n_ffn_experts}, "
                           f"n_attn_experts={config.n_attn_experts}); mix takes dense models")
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
        progress: bool | None = None) -> Path:
    """Write the MoE mixed from `sources` to `out`; returns `out`.

    btx, bam and bam-shared make one expert per source (N = len(sources); pass a directory twice to
    use it twice); upcycle copies one source's FFN into `num_experts` experts. The output has the
    sources' dtype (that of the first source; other sources are cast to it), the first source's
    tokenizer, and a mix.json recording how it was made. `progress=None` shows a bar on a terminal.
    """
    out = Path(out)
    n_experts = check_request(sources, method, num_experts, top_k, weights, router_init_std)
    check_sources(sources)
    check_tokenizers(sources)
    check_output(out, sources, overwrite)
    config = mixed_config(sources[0].config, method, n_experts, top_k, renormalize, router_init_std)
    dtype = source_dtype(sources[0])
    config.dtype = dtype

    input_shapes = parameter_shapes(sources[0].config)
    output_shapes = parameter_shapes(config)
    names = expected_tensor_names(config)
    if weights is not None:
        weights = [float(w) / sum(weights) for w in weights]

    def read(source: ModelSource, name: str) -> torch.Tensor:
        tensor = source.tensor(name)
        if tuple(tensor.shape) != input_shapes[name]:
            raise BamError(_shape_message(source, name, tensor.shape, input_shapes[name], sources[0]))
        return tensor

    def output_tensor(name: str) -> torch.Tensor:
        rule = tensor_rule(name, method)
        if rule.kind == "router":
            return new_router(name, output_shapes[name], router_init_std, seed, dtype)
        if rule.kind == "copy":
            return read(sources[0], name).to(dtype)
        if rule.kind == "repeat":
            return repeat_experts(read(sources[0], name).to(dtype), n_experts)
        parts = (read(source, name) for source in sources)  # lazy: one input in memory at a time
        if rule.kind == "stack":
            return stack(parts, len(sources), rule.dim, dtype)
        return average(parts, weights or [1.0] * len(sources), dtype)

    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        config.save_pretrained(tmp)
        specs = {name: (dtype, output_shapes[name]) for name in names}
        with StreamingSafetensorsWriter(tmp / WEIGHTS_NAME, specs) as writer:
            for name in tqdm(names, desc=f"bam mix ({method})", unit="tensor", disable=_quiet(progress)):
                writer.write(name, output_tensor(name))
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
        (tmp / PROVENANCE_NAME).write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
    return out


def _quiet(progress: bool | None) -> bool | None:
    # tqdm's disable=None means "disable when not writing to a terminal".
    return None if progress is None else not progress
