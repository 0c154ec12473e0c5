"""Processes and sharding: the process group torchrun asks for, DDP or FSDP2 around the model,
and gathering a sharded model and its optimizer state back into full tensors on rank 0.

torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; without them we are the only process and every helper
here is a no-op.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from bam.train.config import TrainConfig


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


def grad_sync(wrapped, sync: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of a step."""
    if hasattr(wrapped, "no_sync"):  # DDP
        return contextlib.nullcontext() if sync else wrapped.no_sync()
    if hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2
        wrapped.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


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
