"""Shared machinery of the benchmarks: sizes, devices, interleaved timing, subprocess peak RSS, results.

Timing rule: every benchmark compares implementations *inside one run*. `compare` times them
interleaved (one call of each per round, the order rotated every round), so a burst of load from
another process on this shared machine lands on all of them alike; each gets warmup calls first and
the reported figure is the median over the rounds. Ratios are ratios of those medians.

A benchmark module exposes `run(opts: Options) -> dict` returning the result schema below; the
`__main__` driver writes it to bench/results/<name>.json and renders results.md from all of them.

Result schema (every key present; `check_result` enforces it):
    name, title, peer       what is measured and against what (a peer implementation or a limit)
    size, device, dtype     "full" | "quick" | "tiny"; "cpu" | "cuda"; "float32" | "bfloat16"
    config                  the shapes and settings used (JSON values)
    tables                  list of {title, columns, rows}: each row a dict keyed by column
    checks                  list of {name, value, target, pass}: the targets of the issue; pass is
                            True/False, or None when the value could not be measured (see note)
    notes                   list of strings (what is counted how, anything that did not run)
    env                     versions, threads, CPU, load average before/after, wall seconds
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

SIZES = ("full", "quick", "tiny")
BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
CACHE_DIR = BENCH_DIR / ".cache"


@dataclass
class Options:
    """What the driver passes to every benchmark."""

    size: str = "quick"  # full | quick | tiny (tiny: smoke tests, one repeat, no peers to install)
    device: str = "cpu"
    repeats: int | None = None  # None: the benchmark's default for the size
    warmup: int | None = None
    install: bool = True  # mixing: may create bench/.venv-mergekit
    peers: bool = True  # mixing: run mergekit-moe at all
    context: dict = field(default_factory=dict)  # results of earlier benchmarks in this run (matmul peak)
    study: Path | None = None  # kv_compression: measure this study's seed and trained mixtures (bam run OUT)

    def __post_init__(self):
        if self.size not in SIZES:
            raise ValueError(f"size {self.size!r}: expected one of {SIZES}")

    def pick(self, full, quick, tiny):
        return {"full": full, "quick": quick, "tiny": tiny}[self.size]

    def n_repeats(self, full: int = 7, quick: int = 5) -> int:
        return self.repeats if self.repeats is not None else self.pick(full, quick, 1)

    def n_warmup(self, full: int = 2, quick: int = 1) -> int:
        return self.warmup if self.warmup is not None else self.pick(full, quick, 0)

    @property
    def dtype(self) -> torch.dtype:
        """fp32 on CPU (bf16 matmul is far slower than fp32 on this CPU), bf16 on CUDA."""
        return torch.bfloat16 if self.device.startswith("cuda") else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------------------------
# Timing


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@dataclass
class Timing:
    times: list[float]
    paged_in: list[int] = field(default_factory=list)  # bytes newly paged in during each timed call

    @property
    def paged_in_median(self) -> float | None:
        """Memory the kernel newly mapped and zero-filled per call (minor page faults x page size).

        On CPU glibc maps every block over 32 MiB afresh and unmaps it on free, so the kernel
        zero-fills it page by page on first touch, on every call: this shows how much of a
        call's time can go there. None where it is not measured (no getrusage).
        """
        return statistics.median(self.paged_in) if self.paged_in else None

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def best(self) -> float:
        return min(self.times)

    @property
    def spread(self) -> float:
        """(max - min) / median: how noisy the repeats were."""
        return (max(self.times) - min(self.times)) / self.median if self.median > 0 else 0.0

    def as_dict(self) -> dict:
        return {"median_s": self.median, "min_s": self.best, "spread": self.spread, "times_s": self.times}


def _paged_in_so_far() -> int | None:
    """Bytes this process has newly paged in (minor faults x page size); None without getrusage."""
    try:
        import resource
    except ImportError:  # not a Unix
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt * resource.getpagesize()


def compare(fns: dict[str, Callable[[], object]], *, repeats: int, warmup: int, device: str = "cpu") -> dict[str, Timing]:
    """Time each callable `repeats` times, interleaved round-robin with a rotating order.

    Every callable is called `warmup` times first (also interleaved). The garbage collector is run
    before and disabled during each round so a collection does not land inside one implementation.
    The memory each timed call pages in is counted too, under the same interleaving.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    synchronize(device)
    timings = {name: Timing([]) for name in names}
    for r in range(max(repeats, 1)):
        order = names[r % len(names):] + names[:r % len(names)]
        gc.collect()
        gc.disable()
        try:
            for name in order:
                synchronize(device)
                paged_before = _paged_in_so_far()
                start = time.perf_counter()
                fns[name]()
                synchronize(device)
                timings[name].times.append(time.perf_counter() - start)
                if paged_before is not None:
                    timings[name].paged_in.append(_paged_in_so_far() - paged_before)
        finally:
            gc.enable()
    return timings


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def check(name: str, value: float | None, op: str, limit: float, note: str = "") -> dict:
    """One target: `value op limit` with op in <=, <, >=, >; pass None when value is None."""
    ops = {"<=": lambda v: v <= limit, "<": lambda v: v < limit, ">=": lambda v: v >= limit, ">": lambda v: v > limit,
           "==": lambda v: v == limit}
    result = {"name": name, "value": value, "target": f"{op} {limit:g}",
              "pass": None if value is None else bool(ops[op](value))}
    if note:
        result["note"] = note
    return result


# ---------------------------------------------------------------------------------------------
# Subprocesses: wall time and peak RSS


# A small launcher between us and the measured command. Linux keeps a process's peak RSS across
# exec (the pre-exec image counts), and a child forked from this benchmark process would start with
# our own multi-GB RSS; the launcher is a fresh, small interpreter, so the command it forks starts
# small and wait4's ru_maxrss is the command's own peak (and its waited-for descendants').
_LAUNCHER = r"""
import json, os, subprocess, sys, time
out, cmd = sys.argv[1], sys.argv[2:]
start = time.perf_counter()
proc = subprocess.Popen(cmd)
_, status, usage = os.wait4(proc.pid, 0)
wall = time.perf_counter() - start
with open(out, "w") as f:
    json.dump({"wall_s": wall, "maxrss_kb": usage.ru_maxrss, "returncode": os.waitstatus_to_exitcode(status)}, f)
"""


def run_measured(cmd: list[str], *, log: Path, env: dict | None = None, cwd: str | Path | None = None,
                 timeout: float | None = None) -> dict:
    """Run `cmd` with its output in `log`; return wall seconds, peak RSS in bytes (wait4's
    ru_maxrss of the command: no sampling, so no peak is missed), return code and output tail."""
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    stats = log.with_suffix(".rss.json")
    stats.unlink(missing_ok=True)
    timed_out = False
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-S", "-c", _LAUNCHER, str(stats), *map(str, cmd)],
                                env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, 9)  # the launcher's session: the launcher and the command it started
            proc.wait()
    measured = json.loads(stats.read_text()) if stats.exists() else {}
    stats.unlink(missing_ok=True)
    return {
        "wall_s": measured.get("wall_s"),
        "peak_rss_bytes": measured["maxrss_kb"] * 1024 if "maxrss_kb" in measured else None,  # Linux: kB
        "returncode": measured.get("returncode", proc.returncode if not timed_out else -9),
        "timed_out": timed_out,
        "output_tail": log.read_bytes()[-2000:].decode("utf-8", "replace"),
    }


# ---------------------------------------------------------------------------------------------
# Environment and results


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str) -> dict:
    import transformers

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "loadavg_start": os.getloadavg()[0],
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


def new_result(name: str, title: str, peer: str, opts: Options, config: dict) -> dict:
    return {
        "name": name, "title": title, "peer": peer, "size": opts.size, "device": opts.device,
        "dtype": dtype_name(opts.dtype), "config": config, "tables": [], "checks": [], "notes": [],
        "env": {**environment(opts.device), "started": time.time()},
    }


def finish(result: dict) -> dict:
    env = result["env"]
    env["loadavg_end"] = os.getloadavg()[0]
    env["wall_s"] = time.time() - env.pop("started")
    return result


RESULT_KEYS = ("name", "title", "peer", "size", "device", "dtype", "config", "tables", "checks", "notes", "env")


def check_result(result: dict) -> None:
    """Raise ValueError when `result` does not follow the schema in this module's docstring."""
    missing = [k for k in RESULT_KEYS if k not in result]
    if missing:
        raise ValueError(f"result misses keys {missing}")
    for table in result["tables"]:
        if set(table) != {"title", "columns", "rows"} or not table["rows"]:
            raise ValueError(f"bad table {table.get('title')!r}: needs title, columns, non-empty rows")
        for row in table["rows"]:
            if set(row) - set(table["columns"]):
                raise ValueError(f"row keys {sorted(set(row) - set(table['columns']))} not in columns of {table['title']!r}")
    for c in result["checks"]:
        if not {"name", "value", "target", "pass"} <= set(c) or c["pass"] not in (True, False, None):
            raise ValueError(f"bad check {c}")
    json.dumps(result)  # must be JSON-serializable


def write_json(result: dict, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{result['name']}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def _fmt(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "pass" if value else "**FAIL**"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value).replace("|", "\\|")


def render_markdown(result: dict) -> str:
    lines = [f"## {result['title']}", "",
             (f"Peer / limit: {result['peer']}. Size `{result['size']}`, {result['device']}, {result['dtype']}; "
              f"torch {result['env'].get('torch')}, {result['env'].get('threads')} threads, "
              f"load average {result['env'].get('loadavg_start', 0):.1f} -> {result['env'].get('loadavg_end', 0):.1f}."),
             ""]
    env = result["env"]
    busy = max(env.get("loadavg_start", 0), env.get("loadavg_end", 0))
    # The benchmark's own threads keep up to `cpus` runnable; more than that (with some margin for
    # the load average's lag) means other processes were competing for the cores.
    if env.get("cpus") and busy > env["cpus"] + 0.5:
        lines += [(f"> Machine busy during this run (load average up to {busy:.1f} on {env['cpus']} CPUs, "
                   f"this benchmark's own threads included): timings and ratios are unreliable; rerun on a "
                   f"quiet machine."), ""]
    for table in result["tables"]:
        cols = table["columns"]
        lines += [f"**{table['title']}**", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for row in table["rows"]:
            lines.append("| " + " | ".join(_fmt(row.get(c)) for c in cols) + " |")
        lines.append("")
    if result["checks"]:
        lines += ["| target | value | required | result |", "|---|---|---|---|"]
        for c in result["checks"]:
            verdict = "not measured" if c["pass"] is None else _fmt(c["pass"])
            lines.append(f"| {_fmt(c['name'])} | {_fmt(c['value'])} | {c['target']} | {verdict} |")
        lines.append("")
    for note in result["notes"]:
        lines.append(f"- {note}")
    if result["notes"]:
        lines.append("")
    return "\n".join(lines)


def write_markdown(out_dir: Path, order: list[str]) -> Path:
    """results.md from every <name>.json in out_dir (benchmarks in `order` first)."""
    results = {}
    for path in sorted(out_dir.glob("*.json")):
        try:
            results[path.stem] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
    names = [n for n in order if n in results] + [n for n in results if n not in order]
    body = ["# Benchmark results", "",
            ("Reproduce: `python -m bench` (full) or `python -m bench --quick`; see bench/README.md. "
             "Times are medians of interleaved repeats; ratios are taken within one run."), ""]
    body += [render_markdown(results[n]) for n in names]
    path = out_dir / "results.md"
    tmp = out_dir / "results.md.tmp"
    tmp.write_text("\n".join(body), encoding="utf-8")
    os.replace(tmp, path)
    return path


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
