"""Downstream tasks through lm-evaluation-harness (the optional extra `bam[eval]`).

lm-eval's `HFLM` accepts an already-loaded transformers model, so we load ours with bam (no
`trust_remote_code` anywhere) and hand it over with the directory's tokenizer. Tasks are lm-eval's
own names, or tasks defined by YAML files in `include_path` (e.g. over local JSONL files, which
runs offline; see docs/huggingface.md for an example).
"""

from __future__ import annotations

from pathlib import Path

from bam.errors import BamError
from bam.eval.generate import load_for_generation


def _lm_eval():
    try:
        import lm_eval  # noqa: PLC0415
        from lm_eval.models.huggingface import HFLM  # noqa: PLC0415
        from lm_eval.tasks import TaskManager  # noqa: PLC0415
    except ImportError as err:
        raise BamError(f"lm-evaluation-harness is not installed ({err.name} missing): "
                       f"pip install 'bam[eval]'") from err
    return lm_eval, HFLM, TaskManager


def task_manager(TaskManager, tasks: list[str], include_path: str | Path | None):
    """lm-eval's registry of tasks. Indexing its thousands of built-in YAMLs takes seconds, so when
    every requested task is defined under `include_path` only those files are indexed."""
    if include_path is not None:
        include_path = Path(include_path)
        if not include_path.exists():
            raise BamError(f"--include-path {include_path}: no such file or directory")
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(task in local.all_tasks for task in tasks):
            return local
        return TaskManager(include_path=str(include_path))
    return TaskManager()


def run_lm_eval(model_dir: str | Path, tasks: list[str] | str, include_path: str | Path | None = None,
                limit: int | float | None = None, batch_size: int = 1, device: str | None = None,
                log_samples: bool = False) -> dict:
    """Evaluate a model directory on lm-eval tasks; returns lm-eval's results dict.

    `results["results"][task]` maps metric names (e.g. "acc,none") to values; `format_results`
    renders lm-eval's usual table. `limit` caps the documents per task (an int, or a fraction);
    `log_samples` keeps every request and the model's answer under `results["samples"]`.
    """
    lm_eval, HFLM, TaskManager = _lm_eval()
    tasks = [t for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t]
    if not tasks:
        raise BamError("no lm-eval tasks given (e.g. --tasks hellaswag,arc_easy)")
    manager = task_manager(TaskManager, tasks, include_path)
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        where = f" or in {include_path}" if include_path is not None else ""
        raise BamError(f"lm-eval task {unknown[0]!r} not found among lm-eval's tasks{where}")
    model, tokenizer = load_for_generation(model_dir, device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, backend="causal")
    results = lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=limit, task_manager=manager,
                                      log_samples=log_samples)
    if results is None:  # only non-zero ranks of a distributed run get None
        raise BamError("lm-eval returned no results")
    return results


def format_results(results: dict) -> str:
    """lm-eval's markdown table of a `run_lm_eval` result."""
    from lm_eval.utils import make_table  # noqa: PLC0415

    return make_table(results)
