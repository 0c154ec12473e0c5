"""The training loop: one process, or `torchrun` with DDP or FSDP2; crash-safe, bit-exact resume.

Read top to bottom: the live state of a run, one optimizer step, validation, the checks made
before any work, and finally `train()` itself. What the loop uses lives beside it in bam/train/:
the run's settings (config.py), which parameters train and how they decay (optim.py), the
learning-rate schedule (schedule.py), the process group and sharding (distributed.py), the data
(data.py), the run fingerprint that guards `--resume` (fingerprint.py), the training state on disk
(state.py) and the metrics log (metrics.py).

Invariants the design keeps:
- **One loss curve whatever the hardware.** `batch_size` is the global batch of one optimizer step.
  Rank r of K takes rows r::K of it (MixtureSampler) and splits those into `grad_accum` equal
  micro-batches, so world size and accumulation are memory knobs: every row holds seq_len targets,
  hence the mean of the micro-batch means is the global mean and DDP's gradient average is the
  one-process gradient (up to float summation order). The load-balancing loss is the exception:
  it is nonlinear in the batch and is computed per micro-batch.
- **Bit-identical resume.** Data is a pure function of the step (MixtureSampler.batch), the
  learning rate a pure function of the step (`lr_at`), and a training state holds the weights,
  AdamW's moments and step counts, the RNG states and the consecutive-bad-step counter. Resuming
  from step k therefore replays exactly what the uninterrupted run did after step k.
- **Nothing half-written is ever visible.** Training states and the final model are built in a
  temporary directory and renamed into place; old training states are moved aside before deletion.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from bam.data.batches import MixtureSampler
from bam.data.shards import TokenizedDomain, empty_split_reason
from bam.errors import BamError
from bam.eval.perplexity import autocast_for, evaluate_domains
from bam.formats.model_dir import load_model, open_model, save_model
from bam.formats.peft import adapter_family, save_adapter
from bam.io.atomic import remove_stale_temporaries
from bam.modeling.config import config_from_dict
from bam.train.config import TrainConfig
from bam.train.data import prepare_domains, tokenizer_for
from bam.train.distributed import Dist, gathered_model, grad_sync, wrap_model
from bam.train.fingerprint import first_difference, run_fingerprint
from bam.train.metrics import METRICS, MetricsLog, trim_metrics
from bam.train.optim import ADAPTER_MIXTURE_TRAINS, make_optimizer, set_trainable
from bam.train.schedule import lr_at
from bam.train.state import (
    STATE_MODEL,
    STATES_DIR,
    complete_training_states,
    last_good_training_state,
    load_optimizer_and_rng,
    read_trainer_state,
    save_training_state,
    verify_training_state,
)

RUN_FILE = "run.json"
FINAL_MODEL = "model"


@dataclass
class Run:
    """The live state of a run, shared by the step, eval and save helpers."""

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
        with grad_sync(run.wrapped, sync=i == len(micro_batches) - 1):
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
        raise BamError(f"seq_len={cfg.seq_len} is beyond the model's context "
                       f"(max_position_embeddings={config.max_position_embeddings})")
    if cfg.batch_size % (env.world_size * cfg.grad_accum):
        raise BamError(f"batch_size={cfg.batch_size}: must divide evenly into {env.world_size} ranks "
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
                           "add text, raise val_fraction, or set eval_every to 0")


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
    source = open_model(cfg.model)  # a missing or broken model fails before any data work
    config = source.config
    if cfg.adapter is not None:  # and so does an adapter the model cannot take
        if config.adapter is not None:
            raise BamError(f"{cfg.model}: already has an adapter ({config.adapter}); train a new one on its base")
        config = config_from_dict({**config.to_dict(), **cfg.adapter_fields()}, f"--adapter {cfg.adapter}")
        adapter_family(source)
    if cfg.train_only is None:  # (resolved before the fingerprint, which records it)
        cfg = replace(cfg, train_only=ADAPTER_MIXTURE_TRAINS if config.adapter_experts else "all")
    tokenizer, tokenizer_dir = tokenizer_for(cfg)
    check_settings(cfg, config, env, tokenizer, tokenizer_dir)
    domains, weights = prepare_domains(cfg, tokenizer, env)
    check_domains(cfg, config, domains)
    fingerprint = run_fingerprint(cfg, domains, weights)

    start, trainer, resume_from = 0, None, None
    states = complete_training_states(out) if cfg.resume else []
    if states:
        start, resume_from = states[-1]
        verify_training_state(resume_from)
        trainer = read_trainer_state(resume_from)
        diff = first_difference(trainer.get("fingerprint"), fingerprint)
        if diff:
            raise BamError(f"--resume: {resume_from} belongs to a different run ({diff}); "
                           "use the original settings or a new --out")
    env.barrier()  # all ranks have decided before rank 0 touches OUT

    if resume_from is not None:
        model = load_model(resume_from / STATE_MODEL)
    else:  # with --adapter, a new one on the seed, as PEFT initialises it
        model = load_model(cfg.model, adapter=cfg.adapter_fields())
    if cfg.aux_loss_coef is not None:
        model.config.router_aux_loss_coef = cfg.aux_loss_coef
    if cfg.z_loss_coef is not None:
        model.config.router_z_loss_coef = cfg.z_loss_coef
    set_trainable(model, "adapter" if cfg.adapter else cfg.train_only)  # an adapter trains alone
    model.to(env.device).train()
    wrapped = wrap_model(model, cfg, env)
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
    run = Run(cfg, env, out, model, wrapped, optimizer, domains, fingerprint, tokenizer_dir)
    if resume_from is not None:
        load_optimizer_and_rng(model, optimizer, resume_from, trainer)
        run.bad_steps = trainer["bad_steps"]

    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        # What a killed run left mid-write (the final model's or a training state's temporary
        # directory, a state moved aside to be deleted), by bam.io.atomic's one rule: only
        # temporaries whose writer is dead.
        for directory in (out, out / STATES_DIR):
            remove_stale_temporaries(directory)
        trim_metrics(out / METRICS, start if resume_from is not None else -1)
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
    if env.is_main and cfg.adapter is not None:  # a PEFT adapter directory for the base
        save_adapter(final, out / FINAL_MODEL, source, fingerprint["model"], overwrite=True)
    elif env.is_main:
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
                good = last_good_training_state(run.out)
                last = f"last good checkpoint: {good}" if good else "no checkpoint was written yet"
                raise BamError(f"{run.bad_steps} consecutive steps with a non-finite loss or gradient "
                               f"(steps {done - run.bad_steps + 1}-{done}); stopping, {last}")
            if (cfg.save_every and done % cfg.save_every == 0) or done == cfg.max_steps:
                save_training_state(run.out, done, run.model, run.optimizer, env, run.bad_steps, run.fingerprint,
                                    run.tokenizer_dir, cfg.keep)
