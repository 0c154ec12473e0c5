"""The training loop: one process, or `torchrun` with DDP or FSDP2; crash-safe, bit-exact resume.

Read top to bottom: the run's settings (TrainConfig), which parameters train and how they decay,
the learning-rate schedule, the process group, the data, the run fingerprint that guards
`--resume`, checkpoints, metrics, and finally `train()` itself.

Invariants the design keeps:
- **One loss curve whatever the hardware.** `batch_size` is the global batch of one optimizer step.
  Rank r of K takes rows r::K of it (MixtureSampler) and splits those into `grad_accum` equal
  micro-batches, so world size and accumulation are memory knobs: every row holds seq_len targets,
  hence the mean of the micro-batch means is the global mean and DDP's gradient average is the
  one-process gradient (up to float summation order). The load-balancing loss is the exception:
  it is nonlinear in the batch and is computed per micro-batch.
- **Bit-identical resume.** Data is a pure function of the step (MixtureSampler.batch), the
  learning rate a pure function of the step (`lr_at`), and a checkpoint holds the weights, AdamW's
  moments and step counts, the RNG states and the consecutive-bad-step counter. Resuming from
  step k therefore replays exactly what the uninterrupted run did after step k.
- **Nothing half-written is ever visible.** Checkpoints and the final model are built in a
  temporary directory and renamed into place; old checkpoints are renamed away before deletion.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import math
import os
import random
import re
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from bam.formats.model_dir import load_model, open_model, save_model
from bam.io.atomic import atomic_output_dir
from bam.io.manifest import sha256_file, verify_manifest
from bam.io.tensor_files import WEIGHTS_INDEX_NAME
from bam.data.shards import (
    Domain,
    DomainSpec,
    MixtureSampler,
    TokenizedDomain,
    empty_split_reason,
    parse_domain_spec,
    prepare_domain,
)
from bam.errors import BamError
from bam.eval.perplexity import autocast_for, evaluate_domains

# AdamW's betas: 0.95 for the second moment as in LLaMA/BTX-style LM training (faster to adapt
# than 0.999 after loss spikes).
ADAM_BETAS = (0.9, 0.95)
ADAM_EPS = 1e-8
DIST_MODES = ("ddp", "fsdp")

CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
RUN_FILE = "run.json"
FINAL_MODEL = "model"
CHECKPOINT_MODEL = "model"  # inside a checkpoint: an ordinary model directory (bam.formats.model_dir)
TRAINER_STATE = "trainer.json"  # written last inside a checkpoint; its presence marks it complete
OPTIMIZER_TENSORS = "optimizer.safetensors"
RNG_TENSORS = "rng.safetensors"
_STEP_DIR = re.compile(r"^step_(\d{6,})$")


# ---------------------------------------------------------------------------------------------
# Settings


@dataclass
class TrainConfig:
    """Everything `bam train` needs; validated on construction so a bad value fails before any work.

    `data` items are `NAME=PATH[:WEIGHT]` strings, DomainSpecs, in-memory Domains or already
    prepared TokenizedDomains (the pipeline passes those); `data_weights` overrides weights by name.
    """

    model: str | Path
    data: Sequence[str | DomainSpec | Domain | TokenizedDomain]
    out: str | Path
    tokenizer: str | Path | None = None  # default: the tokenizer stored with the model
    cache_dir: str | Path | None = None  # tokenized shards; default $BAM_CACHE or ~/.cache/bam/tokens
    data_weights: dict[str, float] = field(default_factory=dict)
    val_fraction: float = 0.05
    test_fraction: float = 0.0
    max_steps: int = 1000
    batch_size: int = 16  # global sequences per optimizer step (all ranks, all micro-batches)
    seq_len: int = 256
    grad_accum: int = 1
    lr: float = 3e-4
    warmup: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    clip: float = 1.0  # 0 disables clipping (the gradient norm is still measured and logged)
    save_every: int = 500  # the last step always saves too
    eval_every: int = 500  # 0 disables validation; else also at step 0 and at the last step
    eval_tokens: int | None = 65536  # per domain; None evaluates the whole validation split
    eval_batch_size: int | None = None  # default: the per-rank micro-batch
    seed: int = 0
    resume: bool = False
    keep: int = 2
    aux_loss_coef: float | None = None  # None keeps the model config's router_aux_loss_coef
    z_loss_coef: float | None = None  # None keeps the model config's router_z_loss_coef
    train_only: str = "all"
    dist: str = "ddp"
    max_bad_steps: int = 5
    progress: bool = True

    def __post_init__(self):
        def need(ok: bool, name: str, expected: str) -> None:
            if not ok:
                raise BamError(f"--{name.replace('_', '-')}={getattr(self, name)!r}: expected {expected}")

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        for name in ("max_steps", "batch_size", "seq_len", "grad_accum", "keep"):
            need(is_int(getattr(self, name)) and getattr(self, name) > 0, name, "a positive integer")
        for name in ("warmup", "save_every", "eval_every", "seed", "max_bad_steps"):
            need(is_int(getattr(self, name)) and getattr(self, name) >= 0, name, "a non-negative integer")
        need(is_num(self.lr) and self.lr > 0, "lr", "a positive finite number")
        need(is_num(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "a number in [0, 1]")
        need(is_num(self.weight_decay) and self.weight_decay >= 0, "weight_decay", "a non-negative number")
        need(is_num(self.clip) and self.clip >= 0, "clip", "a non-negative number (0 disables clipping)")
        for name in ("aux_loss_coef", "z_loss_coef"):
            value = getattr(self, name)
            need(value is None or (is_num(value) and value >= 0), name, "a non-negative number")
        for name in ("eval_tokens", "eval_batch_size"):
            value = getattr(self, name)
            need(value is None or (is_int(value) and value > 0), name, "a positive integer")
        need(self.dist in DIST_MODES, "dist", f"one of {', '.join(DIST_MODES)}")
        if not self.data:
            raise BamError("--data: expected at least one NAME=PATH[:WEIGHT]")
        select_patterns(self.train_only)  # unknown group names fail here


# ---------------------------------------------------------------------------------------------
# Which parameters train, and which decay
#
# `--train-only` takes a comma-separated list of these groups (or raw fnmatch patterns over
# parameter names, e.g. 'model.layers.0.*'). The patterns follow bam/modeling/model.py's names.

TRAIN_GROUPS: dict[str, tuple[str, ...]] = {
    "all": ("*",),
    # FFN and attention routers, the usual post-mix warm-up; a Nexus router's trainable part is its
    # projection (its domain embeddings stay fixed, see FIXED_PATTERNS).
    "routers": ("*.router.weight", "*.ffn.router.gate_up_proj", "*.ffn.router.down_proj"),
    "ffn_routers": ("*.ffn.router.weight", "*.ffn.router.gate_up_proj", "*.ffn.router.down_proj"),
    "attn_routers": ("*.attn.router.weight",),
    "experts": ("*.ffn.experts.*", "*.ffn.shared_expert.*"),  # the FFN experts' SwiGLU weights
    "attention": ("*.attn.q_proj.*", "*.attn.k_proj.*", "*.attn.v_proj.*", "*.attn.o_proj.*"),
    "embeddings": ("model.embed_tokens.weight", "lm_head.weight"),
    "norms": ("*norm.weight",),
}

# No weight decay on norms and biases (nanoGPT/LLaMA convention) nor on routers: decay pulls
# router weights to zero, i.e. towards uniform routing, which fights the experts' specialisation.
NO_DECAY_PATTERNS = ("*norm.weight", "*.bias", "*.router.weight", "*.ffn.router.gate_up_proj",
                     "*.ffn.router.down_proj")
# Never trained: a Nexus expert's domain embedding is a fixed description of its data (METHOD.md 3.3).
FIXED_PATTERNS = ("*.ffn.router.domain_embeddings",)


def select_patterns(spec: str) -> tuple[str, ...]:
    patterns: list[str] = []
    for item in (part.strip() for part in spec.split(",")):
        if item in TRAIN_GROUPS:
            patterns.extend(TRAIN_GROUPS[item])
        elif any(ch in item for ch in "*?[") or "." in item:
            patterns.append(item)
        else:
            raise BamError(f"--train-only {spec}: unknown group {item!r}, expected groups among "
                           f"{', '.join(TRAIN_GROUPS)} or name patterns like 'model.layers.0.*'")
    return tuple(patterns)


def matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def set_trainable(model, spec: str) -> list[str]:
    """Freeze every parameter outside `spec`; returns the trainable names (refuses an empty set)."""
    patterns = select_patterns(spec)
    trainable = []
    for name, param in model.named_parameters():
        param.requires_grad_(matches(name, patterns) and not matches(name, FIXED_PATTERNS))
        if param.requires_grad:
            trainable.append(name)
    if not trainable:
        hint = " (a dense model has no routers)" if "router" in spec else ""
        raise BamError(f"--train-only {spec}: matches no parameter of this model{hint}")
    return trainable


def param_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups in parameter order: matrices decay; norms, biases and routers do not."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or matches(name, NO_DECAY_PATTERNS) else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay, "group": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "group": "no_decay"}]
    return [g for g in groups if g["params"]]


def make_optimizer(model, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over `param_groups`, with torch's fused kernel where it exists (CPU and CUDA).

    On CPU the default single-tensor implementation loops over the parameters in Python with
    several full passes each; the fused kernel does one pass per parameter: at d=256, vocab
    32000 (bench/train_step.py) the step takes 16 ms instead of 64-80 ms on one thread, and the
    multi-tensor `foreach=True` is slower still (88-103 ms).
    """
    device = next(model.parameters()).device
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS,
                             fused=device.type in ("cpu", "cuda"))


# ---------------------------------------------------------------------------------------------
# Learning rate: linear warmup, then cosine to min_lr_ratio * lr at max_steps


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based); a pure function, so there is no scheduler state."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.max_steps - cfg.warmup))
    min_lr = cfg.lr * cfg.min_lr_ratio
    return min_lr + (cfg.lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------
# Processes: torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; without them we are the only process


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    initialized: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Dist:
        cuda = torch.cuda.is_available()
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            return cls(device=torch.device("cuda" if cuda else "cpu"))
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if cuda:
            torch.cuda.set_device(local_rank)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo")
        device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
        return cls(dist.get_rank(), dist.get_world_size(), device, True)

    def barrier(self) -> None:
        if self.initialized:
            dist.barrier()

    def mean(self, values: list[float]) -> list[float]:
        """Average per-rank numbers across ranks (NaN anywhere stays NaN everywhere)."""
        if not self.initialized:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return (t / self.world_size).tolist()

    def close(self) -> None:
        if self.initialized and dist.is_initialized():
            dist.destroy_process_group()


def wrap_model(model, cfg: TrainConfig, env: Dist):
    """DDP or FSDP2 around `model` under torchrun; the model itself otherwise."""
    if not env.initialized:
        return model
    if cfg.dist == "fsdp":
        from torch.distributed.fsdp import fully_shard  # noqa: PLC0415

        for block in model.model.layers:  # one all-gather per block keeps peak memory at one layer
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel  # noqa: PLC0415

    # Experts that receive no token in a micro-batch take no part in its graph under the loop
    # dispatch; DDP must be told to expect that.
    return DistributedDataParallel(
        model, device_ids=[env.device.index] if env.device.type == "cuda" else None,
        find_unused_parameters=not model.config.is_dense,
    )


def grad_sync(wrapped, cfg: TrainConfig, sync: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of a step."""
    if hasattr(wrapped, "no_sync"):  # DDP
        return contextlib.nullcontext() if sync else wrapped.no_sync()
    if hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2
        wrapped.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------
# Data


def default_cache_dir() -> Path:
    return Path(os.environ.get("BAM_CACHE") or Path.home() / ".cache" / "bam" / "tokens")


def prepare_domains(cfg: TrainConfig, tokenizer, env: Dist) -> tuple[list[TokenizedDomain], list[float]]:
    """Tokenized domains and their mixture weights; rank 0 tokenizes, the others then hit the cache."""
    cache = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    items = [parse_domain_spec(d) if isinstance(d, str) else d for d in cfg.data]
    names = [item.name for item in items]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise BamError(f"--data: domain {duplicate!r} is given twice")
    unknown = sorted(set(cfg.data_weights) - set(names))
    if unknown:
        raise BamError(f"data weight for {unknown[0]!r}: no such domain among {', '.join(names)}")

    def prepare() -> list[TokenizedDomain]:
        if tokenizer is None and not all(isinstance(i, TokenizedDomain) for i in items):
            raise BamError(f"{cfg.model}: no tokenizer files; pass --tokenizer DIR")
        return [i if isinstance(i, TokenizedDomain)
                else prepare_domain(i, tokenizer, cache, cfg.val_fraction, cfg.test_fraction)
                for i in items]

    domains = prepare() if env.is_main else None
    env.barrier()
    if domains is None:
        domains = prepare()
    weights = [float(cfg.data_weights.get(i.name, getattr(i, "weight", 1.0))) for i in items]
    return domains, weights


# ---------------------------------------------------------------------------------------------
# The run fingerprint: what a checkpoint must share with the run that resumes from it


# Settings that change the maths of the run. grad_accum, world size, save/eval cadence and the
# like are left out: they change memory and speed, not the result, so a run may resume on a
# different number of GPUs.
MATH_FIELDS = ("max_steps", "batch_size", "seq_len", "lr", "warmup", "min_lr_ratio", "weight_decay",
               "clip", "seed", "aux_loss_coef", "z_loss_coef", "train_only")


def model_fingerprint(model_dir: Path) -> str:
    """sha256 over config.json and every weight file: the identity of the starting model."""
    digest = hashlib.sha256()
    files = [model_dir / "config.json", model_dir / WEIGHTS_INDEX_NAME,
             *sorted(model_dir.glob("*.safetensors"))]
    for path in files:
        if path.is_file():
            digest.update(f"{path.name}:{sha256_file(path)}\n".encode())
    return digest.hexdigest()


def run_fingerprint(cfg: TrainConfig, domains: list[TokenizedDomain], weights: list[float]) -> dict:
    return {
        "model": model_fingerprint(Path(cfg.model)),
        "data": {d.name: {"weight": w, "content": d.meta.get("key")} for d, w in zip(domains, weights)},
        "train": {name: getattr(cfg, name) for name in MATH_FIELDS},
    }


def first_difference(old, new, path: str = "") -> str | None:
    """A readable description of the first place two fingerprints differ, or None."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(old) + [k for k in new if k not in old]:
            where = f"{path}.{key}" if path else str(key)
            if key not in old:
                return f"{where} is new"
            if key not in new:
                return f"{where} is missing"
            found = first_difference(old[key], new[key], where)
            if found:
                return found
        return None
    if old != new:
        def show(v):
            return f"{v[:12]}..." if isinstance(v, str) and len(v) == 64 else repr(v)
        return f"{path}: {show(old)} in the checkpoint, {show(new)} now"
    return None


# ---------------------------------------------------------------------------------------------
# Checkpoints: OUT/checkpoints/step_XXXXXX/ = model/ (a model directory) + optimizer, RNG and step


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def complete_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first."""
    found = []
    root = out / CHECKPOINTS
    if root.is_dir():
        for path in root.iterdir():
            m = _STEP_DIR.match(path.name)
            if m and (path / TRAINER_STATE).is_file():
                found.append((int(m.group(1)), path))
    return sorted(found)


def clean_stale_temporaries(out: Path) -> None:
    """Remove what a killed process left mid-write: hidden temp dirs of checkpoints and the model."""
    for parent, prefixes in ((out / CHECKPOINTS, (".",)), (out, (f".{FINAL_MODEL}.", f".{METRICS}."))):
        if parent.is_dir():
            for path in parent.iterdir():
                if path.name.startswith(prefixes):
                    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def is_sharded(model) -> bool:
    from torch.distributed.tensor import DTensor  # noqa: PLC0415

    return any(isinstance(p, DTensor) for p in model.parameters())


def gathered_model(model):
    """The model with full weights, on rank 0 (None elsewhere); a collective under FSDP.

    Unsharded models are returned as they are; an FSDP2 model's shards are gathered into a plain
    CPU copy, so whatever writes it (bam.formats.model_dir.save_model) sees an ordinary model.
    """
    if not is_sharded(model):
        return model if not dist.is_initialized() or dist.get_rank() == 0 else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # noqa: PLC0415

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    from bam.modeling.model import BamForCausalLM  # noqa: PLC0415  (fully_shard swapped model's class)

    with torch.device("meta"):
        plain = BamForCausalLM(model.config)
    names = [name for name, _ in plain.named_parameters()]  # a tied lm_head is listed once
    plain.load_state_dict({name: state[name] for name in names}, strict=False, assign=True)
    if model.config.tie_word_embeddings:
        plain.lm_head.weight = plain.model.embed_tokens.weight
    return plain


def full_optimizer_state(model, optimizer) -> dict:
    """AdamW's state keyed by parameter name, unsharded, on CPU (complete on rank 0)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict  # noqa: PLC0415

    return get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def rng_state() -> tuple[dict, dict]:
    """(tensors, json) of every RNG the run could draw from."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(keys.astype(np.int64))
    version, state, gauss = random.getstate()
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(cached)], "python": [version, list(state), gauss]}
    return tensors, meta


def set_rng_state(tensors: dict, meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, state, gauss = meta["python"]
    random.setstate((version, tuple(state), gauss))


def save_checkpoint(run: Run, step: int) -> None:
    """OUT/checkpoints/step_XXXXXX/: model/ (a model directory), optimizer and RNG tensors, trainer.json."""
    model = gathered_model(run.model)  # collectives under FSDP: every rank takes part
    optim_state = full_optimizer_state(run.model, run.optimizer)
    if run.env.is_main:
        rng_tensors, rng_meta = rng_state()
        optim_tensors = {f"state/{name}/{key}": value.contiguous()
                         for name, entries in optim_state["state"].items() for key, value in entries.items()}
        trainer = {
            "step": step,
            "bad_steps": run.bad_steps,
            "fingerprint": run.fingerprint,
            "param_groups": [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
                             for g in optim_state["param_groups"]],
            "rng": rng_meta,
        }
        with atomic_output_dir(run.out / CHECKPOINTS / step_dir_name(step), overwrite=True) as tmp:
            save_model(model, tmp / CHECKPOINT_MODEL, run.tokenizer_dir)
            save_file(optim_tensors, str(tmp / OPTIMIZER_TENSORS))
            save_file(rng_tensors, str(tmp / RNG_TENSORS))
            (tmp / TRAINER_STATE).write_text(json.dumps(trainer) + "\n", encoding="utf-8")
        prune_checkpoints(run.out, run.cfg.keep)
    run.env.barrier()


def prune_checkpoints(out: Path, keep: int) -> None:
    for _, path in complete_checkpoints(out)[:-keep]:
        # Renamed first so that a kill mid-delete never leaves a partial step_* directory visible.
        trash = path.with_name(f".trash-{path.name}")
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)


def last_good_checkpoint(out: Path) -> Path | None:
    """The newest checkpoint not taken in the middle of a run of skipped steps (else the newest)."""
    found = complete_checkpoints(out)
    good = [path for _, path in found if read_trainer_state(path).get("bad_steps") == 0]
    return (good or [path for _, path in found] or [None])[-1]


def verify_checkpoint(path: Path) -> None:
    """Check a checkpoint's files against its manifests before resuming from it.

    The model directory inside is verified when it is loaded; here the trainer state, optimizer
    and RNG files. Checkpoints written before manifests existed have none and are taken as they are.
    """
    try:
        verify_manifest(path, [TRAINER_STATE, OPTIMIZER_TENSORS, RNG_TENSORS])
    except BamError as err:
        raise BamError(f"{err} (delete {path} to resume from the checkpoint before it)") from None


def read_trainer_state(path: Path) -> dict:
    try:
        return json.loads((path / TRAINER_STATE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise BamError(f"{path / TRAINER_STATE}: unreadable checkpoint state ({err})") from None


def load_optimizer_and_rng(run: Run, path: Path, trainer: dict) -> None:
    """Restore AdamW's state (resharded under FSDP) and the RNGs from a checkpoint directory."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict  # noqa: PLC0415

    try:
        state: dict[str, dict] = {}
        with safe_open(str(path / OPTIMIZER_TENSORS), framework="pt") as f:
            for key in f.keys():
                _, name, entry = key.split("/")
                state.setdefault(name, {})[entry] = f.get_tensor(key)
        groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in trainer["param_groups"]]
        set_optimizer_state_dict(run.model, run.optimizer, {"state": state, "param_groups": groups},
                                 options=StateDictOptions(full_state_dict=True))
        with safe_open(str(path / RNG_TENSORS), framework="pt") as f:
            rng_tensors = {key: f.get_tensor(key) for key in f.keys()}
        set_rng_state(rng_tensors, trainer["rng"])
    except (SafetensorError, OSError, KeyError, ValueError, RuntimeError) as err:
        raise BamError(f"{path}: checkpoint state unreadable ({str(err).splitlines()[0] if str(err) else err!r}); "
                       "delete it to resume from an earlier one") from None


# ---------------------------------------------------------------------------------------------
# Metrics: one JSON object per line in OUT/metrics.jsonl, written by rank 0


def _finite_or_none(value):
    """JSON has no NaN or inf: write null (a skipped step also says why)."""
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def trim_metrics(path: Path, last_step: int) -> None:
    """Keep the records of steps <= last_step: what follows the checkpoint is about to be redone.

    A fresh start passes -1 and keeps nothing.
    """
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by a kill
        if isinstance(record, dict) and record.get("step", math.inf) <= last_step:
            kept.append(line)
    tmp = path.with_name(f".{METRICS}.tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)


class MetricsLog:
    def __init__(self, path: Path | None):
        self.file = open(path, "a", encoding="utf-8") if path is not None else None

    def write(self, record: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(_finite_or_none(record)) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


# ---------------------------------------------------------------------------------------------
# The loop


@dataclass
class Run:
    """The live state of a run, shared by the step, eval and checkpoint helpers."""

    cfg: TrainConfig
    env: Dist
    out: Path
    model: object  # the unwrapped model (FSDP2 shards it in place)
    wrapped: object  # what forward is called on: DDP, or the model itself
    optimizer: torch.optim.Optimizer
    domains: list[TokenizedDomain]
    fingerprint: dict
    tokenizer_dir: Path | None
    bad_steps: int = 0


def micro_step_loss(run: Run, tokens: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """The training objective on one micro-batch, and its parts for logging.

    `loss = lm_loss + aux_loss` exactly as BamForCausalLM defines it (aux_loss = α·L_lb + β·L_z),
    but with the LM loss taken over all seq_len targets of a sampler row (input tokens[:, :-1],
    target tokens[:, 1:]): `shift_labels` are those targets as they are, where `labels` would shift
    again and drop the last one. The same windows and targets are what validation scores. The LM
    loss is the fused head + cross-entropy (bam/modeling/loss.py): no [B, T, V] logits are built.
    """
    tokens = tokens.to(run.env.device)
    with autocast_for(run.env.device):
        out = run.wrapped(input_ids=tokens[:, :-1], shift_labels=tokens[:, 1:], return_logits=False, use_cache=False)
    loss, lm_loss = out.loss, out.lm_loss
    parts = [loss, lm_loss, out.load_balancing_loss, out.z_loss]
    return loss, [0.0 if p is None else float(p.detach()) for p in parts]


def train_step(run: Run, sampler: MixtureSampler, step: int) -> dict:
    """One optimizer step (0-based `step`); a non-finite loss or gradient skips the update."""
    cfg, env = run.cfg, run.env
    lr = lr_at(step, cfg)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    rows = sampler.batch(step, env.rank, env.world_size)
    micro_batches = rows.chunk(cfg.grad_accum)
    sums = [0.0, 0.0, 0.0, 0.0]
    for i, tokens in enumerate(micro_batches):
        with grad_sync(run.wrapped, cfg, sync=i == len(micro_batches) - 1):
            loss, parts = micro_step_loss(run, tokens)
            (loss / cfg.grad_accum).backward()  # equal-sized micro-batches: mean of means is the mean
        sums = [s + p for s, p in zip(sums, parts)]
    loss, lm_loss, lb_loss, z_loss = env.mean([s / cfg.grad_accum for s in sums])

    params = [p for p in run.model.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip if cfg.clip > 0 else math.inf)
    if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns a replicated DTensor
        grad_norm = grad_norm.full_tensor()
    grad_norm = float(grad_norm)

    record = {"step": step + 1, "loss": loss, "lm_loss": lm_loss}
    if not run.model.config.is_dense:
        record.update(lb_loss=lb_loss, z_loss=z_loss)
    record.update(lr=lr, grad_norm=grad_norm)
    if math.isfinite(loss) and math.isfinite(grad_norm):
        run.optimizer.step()
        run.bad_steps = 0
    else:
        run.bad_steps += 1
        record.update(skipped=True, reason="non-finite loss" if not math.isfinite(loss) else "non-finite gradient")
    run.optimizer.zero_grad(set_to_none=True)
    return record


def validate(run: Run) -> dict:
    """Per-domain validation numbers; every rank computes them (FSDP needs all ranks in forward)."""
    cfg = run.cfg
    batch = cfg.eval_batch_size or max(1, cfg.batch_size // run.env.world_size // cfg.grad_accum)
    scores = evaluate_domains(run.model, run.domains, "validation", cfg.seq_len, batch, cfg.eval_tokens)
    return {name: {"loss": s.loss, "ppl": s.ppl, "bpb": s.bpb} for name, s in scores.items()}


def check_settings(cfg: TrainConfig, config, env: Dist, tokenizer, tokenizer_dir: Path | None) -> None:
    """What can be checked from the settings and the model's config alone: before any tokenizing."""
    if cfg.seq_len > config.max_position_embeddings:
        raise BamError(f"--seq-len {cfg.seq_len} is beyond the model's context "
                       f"(max_position_embeddings={config.max_position_embeddings})")
    if cfg.batch_size % (env.world_size * cfg.grad_accum):
        raise BamError(f"--batch-size {cfg.batch_size}: must divide evenly into {env.world_size} ranks "
                       f"x {cfg.grad_accum} micro-batches")
    if tokenizer is not None and len(tokenizer) > config.vocab_size:
        # Token ids >= vocab_size would index past the embedding table: refuse before training.
        raise BamError(f"tokenizer {tokenizer_dir} has {len(tokenizer)} tokens, more than the model's "
                       f"vocab_size={config.vocab_size}; its ids would fall outside the embedding table")


def check_domains(cfg: TrainConfig, config, domains: list[TokenizedDomain]) -> None:
    """What the prepared data must satisfy: ids inside the vocabulary, text to validate on."""
    for d in domains:
        if d.vocab_size > config.vocab_size:
            raise BamError(f"domain '{d.name}': tokenized with a {d.vocab_size}-token vocabulary, "
                           f"the model has {config.vocab_size}")
        if cfg.eval_every and d.splits["validation"].tokens == 0:
            raise BamError(f"domain '{d.name}': validation split is empty: {empty_split_reason(d, 'validation')}; "
                           "add text, raise --val-fraction, or pass --eval-every 0")


def _tokenizer_for(cfg: TrainConfig):
    from bam.data.tokenizer import load_tokenizer  # noqa: PLC0415

    directory = Path(cfg.tokenizer) if cfg.tokenizer else Path(cfg.model)
    has_files = any((directory / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json",
                                                        "tokenizer.model", "vocab.json"))
    if cfg.tokenizer is None and not has_files:
        return None, None
    return load_tokenizer(directory), directory


def train(cfg: TrainConfig) -> Path:
    """Run (or resume) training; returns OUT/model. Call it from every rank under torchrun."""
    env = Dist.from_env()
    try:
        return _train(cfg, env)
    finally:
        env.close()


def _train(cfg: TrainConfig, env: Dist) -> Path:
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise BamError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not cfg.resume:
        raise BamError(f"{out}: already exists; pass --resume to continue that run, or choose a new --out")
    env.barrier()  # every rank has looked at OUT before rank 0 creates it

    torch.manual_seed(cfg.seed)  # same seed on every rank: no rank-dependent randomness
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    config = open_model(cfg.model).config  # a missing or broken model fails before any data work
    tokenizer, tokenizer_dir = _tokenizer_for(cfg)
    check_settings(cfg, config, env, tokenizer, tokenizer_dir)
    domains, weights = prepare_domains(cfg, tokenizer, env)
    check_domains(cfg, config, domains)
    fingerprint = run_fingerprint(cfg, domains, weights)

    start, trainer, checkpoint = 0, None, None
    if cfg.resume and complete_checkpoints(out):
        start, checkpoint = complete_checkpoints(out)[-1]
        verify_checkpoint(checkpoint)
        trainer = read_trainer_state(checkpoint)
        diff = first_difference(trainer.get("fingerprint"), fingerprint)
        if diff:
            raise BamError(f"--resume: {checkpoint} belongs to a different run ({diff}); "
                           "use the original settings or a new --out")
    env.barrier()  # all ranks have decided before rank 0 touches OUT

    model = load_model(checkpoint / CHECKPOINT_MODEL if checkpoint else cfg.model)
    if cfg.aux_loss_coef is not None:
        model.config.router_aux_loss_coef = cfg.aux_loss_coef
    if cfg.z_loss_coef is not None:
        model.config.router_z_loss_coef = cfg.z_loss_coef
    set_trainable(model, cfg.train_only)
    model.to(env.device).train()
    wrapped = wrap_model(model, cfg, env)
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
    run = Run(cfg, env, out, model, wrapped, optimizer, domains, fingerprint, tokenizer_dir)
    if checkpoint is not None:
        load_optimizer_and_rng(run, checkpoint, trainer)
        run.bad_steps = trainer["bad_steps"]

    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        clean_stale_temporaries(out)
        trim_metrics(out / METRICS, start if checkpoint is not None else -1)
        run_info = {"model": str(cfg.model), "data": [d.meta.get("source", d.name) for d in domains],
                    "fingerprint": fingerprint, "world_size": env.world_size, "dist": cfg.dist,
                    "grad_accum": cfg.grad_accum, "resumed_from": start}
        (out / RUN_FILE).write_text(json.dumps(run_info, indent=2) + "\n", encoding="utf-8")
    log = MetricsLog(out / METRICS if env.is_main else None)
    try:
        _loop(run, MixtureSampler(domains, weights, cfg.seq_len, cfg.batch_size, cfg.seed), start, log)
    finally:
        log.close()

    final = gathered_model(model)
    if env.is_main:
        save_model(final, out / FINAL_MODEL, tokenizer_dir, overwrite=True)
    env.barrier()
    return out / FINAL_MODEL


def _loop(run: Run, sampler: MixtureSampler, start: int, log: MetricsLog) -> None:
    cfg, env = run.cfg, run.env
    tokens_per_step = cfg.batch_size * cfg.seq_len
    if start == 0 and cfg.eval_every:
        log.write({"step": 0, "val": validate(run)})
    bar = tqdm(total=cfg.max_steps, initial=start, desc="train", unit="step", dynamic_ncols=True,
               disable=not (env.is_main and cfg.progress))
    with bar:
        for step in range(start, cfg.max_steps):
            t0 = time.perf_counter()
            record = train_step(run, sampler, step)
            elapsed = time.perf_counter() - t0
            done = step + 1
            record.update(tokens=done * tokens_per_step, tokens_per_s=tokens_per_step / elapsed)
            if cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.max_steps):
                record["val"] = validate(run)
            log.write(record)
            if record.get("skipped") and env.is_main:
                bar.write(f"bam train: step {done} skipped ({record['reason']}); "
                          f"{run.bad_steps} in a row, at most {cfg.max_bad_steps} allowed", file=sys.stderr)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
            if run.bad_steps > cfg.max_bad_steps:
                good = last_good_checkpoint(run.out)
                last = f"last good checkpoint: {good}" if good else "no checkpoint was written yet"
                raise BamError(f"{run.bad_steps} consecutive steps with a non-finite loss or gradient "
                               f"(steps {done - run.bad_steps + 1}-{done}); stopping, {last}")
            if (cfg.save_every and done % cfg.save_every == 0) or done == cfg.max_steps:
                save_checkpoint(run, done)


