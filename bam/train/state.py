"""The training state on disk: what `--resume` continues from, bit-identically.

OUT/checkpoints/step_XXXXXX/ holds model/ (an ordinary model directory, bam.formats.model_dir),
AdamW's moments and step counts (optimizer.safetensors), the state of every RNG the run could draw
from (rng.safetensors, with their scalar parts in trainer.json) and trainer.json itself: the step,
the consecutive-bad-step counter, the run fingerprint and the optimizer's groups. trainer.json is
written last, so its presence marks a training state complete. (The directory and file names are
those of earlier versions, which called these "checkpoints": old runs resume.)

Nothing half-written is ever visible: a state is built in a temporary directory and renamed into
place (bam.io.atomic), and an old one is moved aside before it is deleted.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from bam.errors import BamError, first_line
from bam.formats.model_dir import save_model
from bam.io.atomic import atomic_output_dir, remove_dir, remove_stale_temporaries
from bam.io.manifest import verify_manifest
from bam.train.distributed import Dist, full_optimizer_state, gathered_model

STATES_DIR = "checkpoints"  # OUT/checkpoints/: the run's training states
STATE_MODEL = "model"  # inside a training state: an ordinary model directory (bam.formats.model_dir)
TRAINER_STATE = "trainer.json"  # written last inside a training state; its presence marks it complete
OPTIMIZER_TENSORS = "optimizer.safetensors"
RNG_TENSORS = "rng.safetensors"
_STEP_DIR = re.compile(r"^step_(\d{6,})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def complete_training_states(out: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete training state of run OUT, oldest first."""
    found = []
    root = out / STATES_DIR
    if root.is_dir():
        for path in root.iterdir():
            m = _STEP_DIR.match(path.name)
            if m and (path / TRAINER_STATE).is_file():
                found.append((int(m.group(1)), path))
    return sorted(found)


# ---------------------------------------------------------------------------------------------
# Writing


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


def save_training_state(out: Path, step: int, model, optimizer, env: Dist, bad_steps: int, fingerprint: dict,
                        tokenizer_dir: Path | None, keep: int) -> None:
    """OUT/checkpoints/step_XXXXXX/ after optimizer step `step`; then only the `keep` newest stay.

    Call it from every rank: under FSDP, gathering the weights and AdamW's state are collectives.
    """
    full_model = gathered_model(model)
    optim_state = full_optimizer_state(model, optimizer)
    if env.is_main:
        rng_tensors, rng_meta = rng_state()
        optim_tensors = {f"state/{name}/{key}": value.contiguous()
                         for name, entries in optim_state["state"].items() for key, value in entries.items()}
        trainer = {
            "step": step,
            "bad_steps": bad_steps,
            "fingerprint": fingerprint,
            "param_groups": [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
                             for g in optim_state["param_groups"]],
            "rng": rng_meta,
        }
        with atomic_output_dir(out / STATES_DIR / step_dir_name(step), overwrite=True) as tmp:
            save_model(full_model, tmp / STATE_MODEL, tokenizer_dir)
            save_file(optim_tensors, str(tmp / OPTIMIZER_TENSORS))
            save_file(rng_tensors, str(tmp / RNG_TENSORS))
            (tmp / TRAINER_STATE).write_text(json.dumps(trainer) + "\n", encoding="utf-8")
        prune_training_states(out, keep)
    env.barrier()


def prune_training_states(out: Path, keep: int) -> None:
    """Remove all but the `keep` newest training states of run OUT (keep=0: every one), and what a
    killed pruning left moved aside."""
    states = complete_training_states(out)
    for _, path in states[:max(0, len(states) - keep)]:
        remove_dir(path)  # moved aside first: a kill mid-delete never leaves a partial step_* visible
    remove_stale_temporaries(out / STATES_DIR)


# ---------------------------------------------------------------------------------------------
# Reading


def last_good_training_state(out: Path) -> Path | None:
    """The newest training state not taken in the middle of a run of skipped steps (else the newest)."""
    found = complete_training_states(out)
    good = [path for _, path in found if read_trainer_state(path).get("bad_steps") == 0]
    return (good or [path for _, path in found] or [None])[-1]


def verify_training_state(path: Path) -> None:
    """Check a training state's files against its manifests before resuming from it.

    The model directory inside is verified when it is loaded; here the trainer state, optimizer
    and RNG files. States written before manifests existed have none and are taken as they are.
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


def set_rng_state(tensors: dict, meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, state, gauss = meta["python"]
    random.setstate((version, tuple(state), gauss))


def load_optimizer_and_rng(model, optimizer, path: Path, trainer: dict) -> None:
    """Restore AdamW's state (resharded under FSDP) and the RNGs from the training state at `path`."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict  # noqa: PLC0415

    try:
        state: dict[str, dict] = {}
        with safe_open(str(path / OPTIMIZER_TENSORS), framework="pt") as f:
            for key in f.keys():
                _, name, entry = key.split("/")
                state.setdefault(name, {})[entry] = f.get_tensor(key)
        groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in trainer["param_groups"]]
        set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups},
                                 options=StateDictOptions(full_state_dict=True))
        with safe_open(str(path / RNG_TENSORS), framework="pt") as f:
            rng_tensors = {key: f.get_tensor(key) for key in f.keys()}
        set_rng_state(rng_tensors, trainer["rng"])
    except (SafetensorError, OSError, KeyError, ValueError, RuntimeError) as err:
        raise BamError(f"{path}: checkpoint state unreadable ({first_line(err)}); "
                       "delete it to resume from an earlier one") from None
