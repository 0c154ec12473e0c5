"""bam against the releases of its dependencies: the lock files, the newest releases, the lower bounds.

    python scripts/releases.py lock     refresh requirements/*.txt from the newest releases and run
                                        the whole suite in exactly that environment; the files are
                                        rewritten only if it passes (a version bump is this command)
    python scripts/releases.py newest   the newest release of every dependency, in a fresh
                                        virtualenv: run the model, mix, export and demo tests; when
                                        any fails, say which upgraded package breaks which test
    python scripts/releases.py oldest   every direct dependency at the lower bound pyproject.toml
                                        declares: run the whole suite (the bounds must be honest)

torch stays at the CPU pin of requirements/test.txt in every environment (`lock --torch VERSION`
moves the pin: update README's commands and .ci/run to match): a newer torch, or a torch
resolved with nothing installed first, would be a multi-GB CUDA build. Every environment is
a new virtualenv under a temporary directory (`--keep` keeps it and prints its path), with this
checkout installed editable, so what is tested is what a user's `pip install` gives that day.
Exit status 0 when every test ran and passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
LOCKS = {"default": ROOT / "requirements" / "default.txt", "test": ROOT / "requirements" / "test.txt"}
EXTRAS = {"default": "", "test": "[test]"}
# What `newest` runs: the tests an upstream release breaks first (model and generation, mixing,
# Hugging Face import/export, GGUF through transformers' loader, PEFT adapters and adapter experts,
# SnapKV on transformers' cache, the demo end to end).
NEWEST_TESTS = ["tests/test_model.py", "tests/test_generate.py", "tests/test_mix.py", "tests/test_hf_import.py",
                "tests/test_export.py", "tests/test_gguf.py", "tests/test_adapters.py", "tests/test_adapter_mix.py",
                "tests/test_kv_compression.py", "tests/test_pipeline.py"]


def log(message: str) -> None:
    print(f"[releases] {message}", flush=True)


def read_lock(path: Path) -> dict[str, str]:
    """{canonical name: version} of a lock file (`name==version` lines, # comments)."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version
    return pins


TORCH: str | None = None  # --torch; else the lock's pin


def torch_pin() -> str:
    return TORCH or read_lock(LOCKS["test"])["torch"]


class Venv:
    """A fresh virtualenv with this checkout installed editable."""

    def __init__(self, parent: Path, name: str):
        self.path = parent / name
        log(f"creating {self.path}")
        subprocess.run([sys.executable, "-m", "venv", str(self.path)], check=True)
        self.python = str(self.path / "bin" / "python")
        self.env = {**os.environ, "VIRTUAL_ENV": str(self.path), "PATH": f"{self.path / 'bin'}:{os.environ['PATH']}"}
        self.env.pop("PYTHONPATH", None)

    def pip(self, *args: str) -> None:
        subprocess.run([self.python, "-m", "pip", "install", "--quiet", *args], check=True, env=self.env, cwd=ROOT)

    def install(self, extra: str, constraints: Path | None = None) -> None:
        """The pinned torch first (never a CUDA build), then bam with `extra` (under `constraints`)."""
        self.pip(f"torch=={torch_pin()}")
        self.pip(*(["-c", str(constraints)] if constraints else []), "-e", f".{extra}")

    def freeze(self) -> dict[str, str]:
        out = subprocess.run([self.python, "-m", "pip", "freeze", "--exclude-editable"], check=True,
                             capture_output=True, text=True, env=self.env).stdout
        pins = {}
        for line in out.splitlines():
            name, sep, version = line.partition("==")
            if sep and canonicalize_name(name) != "bam":
                # torch's local label (+cpu) names the wheel's index, not a version: `==2.13.0`
                # admits the CPU wheel here and whichever build a user's index serves.
                pins[canonicalize_name(name)] = version.split("+")[0]
        return pins

    def unreachable(self, names: set[str]) -> dict[str, tuple[str, str]]:
        """Each of `names` whose latest release on the index is not the installed one: that release,
        and pip's reason it cannot be installed with the rest (e.g. a dependency not yet published)."""
        installed, found = self.freeze(), {}
        for name in sorted(names):
            listing = subprocess.run([self.python, "-m", "pip", "index", "versions", name], capture_output=True,
                                     text=True, env=self.env).stdout
            latest = listing.partition("(")[2].partition(")")[0]
            if not latest or latest == installed.get(name):
                continue
            trial = subprocess.run([self.python, "-m", "pip", "install", "--dry-run", f"{name}=={latest}"],
                                   capture_output=True, text=True, env=self.env, cwd=ROOT)
            errors = [line for line in trial.stderr.splitlines() if line.startswith("ERROR")]
            found[name] = latest, (errors[-1] if errors else "pip would install it: rerun")
        return found

    def pytest(self, *args: str) -> int:
        log(f"pytest {' '.join(args) or '(whole suite)'}")
        return subprocess.run([self.python, "-m", "pytest", "-q", *args], env=self.env, cwd=ROOT).returncode


def write_lock(path: Path, pins: dict[str, str], command: str, made: str | None = None) -> None:
    made = made or f"{datetime.date.today()}, CPython {platform.python_version()}, {platform.system()} {platform.machine()}"
    header = (f"# Every package `{command}` installs, pinned: the set the whole test suite passed on\n"
              f"# ({made}). Made by `python scripts/releases.py lock`. A pip constraints\n"
              f"# file (-c), as README.md and .ci/run use it; torch is the CPU wheel, installed first.\n")
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_suffix(".txt.tmp")
    tmp.write_text(header + "".join(f"{name}=={version}\n" for name, version in sorted(pins.items())))
    tmp.replace(path)


def lock(work: Path) -> int:
    test_env = Venv(work, "test")
    test_env.install(EXTRAS["test"])
    test_pins = test_env.freeze()
    before = {path: path.read_text() if path.exists() else None for path in LOCKS.values()}
    write_lock(LOCKS["test"], test_pins, 'pip install -e ".[test]"')
    default_env = Venv(work, "default")  # the default install, at the versions of the test lock
    default_env.install(EXTRAS["default"], constraints=LOCKS["test"])
    write_lock(LOCKS["default"], default_env.freeze(), "pip install -e .")
    if test_env.pytest() != 0:  # the suite checks the lock files too (tests/test_install.py)
        for path, text in before.items():
            if text is None:
                path.unlink()
            else:
                path.write_text(text)
        log("the suite fails on the newest releases: lock files left as they were; "
            "`python scripts/releases.py newest` says which package breaks what")
        return 1
    changed = subprocess.run(["git", "diff", "--stat", "--", "requirements"], cwd=ROOT, capture_output=True,
                             text=True).stdout.strip()
    log(f"suite passed; requirements/ rewritten\n{changed or '(new files, or no version changed)'}")
    return 0


def newest(work: Path, tests: list[str]) -> int:
    env = Venv(work, "newest")
    env.install(EXTRAS["test"])
    locked, now = read_lock(LOCKS["test"]), env.freeze()
    drift = {name: (locked.get(name), version) for name, version in now.items() if locked.get(name) != version}
    for name, (old, new) in sorted(drift.items()):
        log(f"  {name}: {old or '(not in the lock)'} -> {new}")
    for name, (latest, reason) in sorted(env.unreachable(_direct_dependencies() - {"torch"}).items()):
        log(f"  {name} {latest} is released but not installed, so not tested: {reason}")
    cache = work / "pytest-cache"
    if env.pytest("-o", f"cache_dir={cache}", *tests) == 0:
        log(f"newest releases: the tests pass ({len(drift)} packages newer than the lock)")
        return 0
    failed = _last_failed(cache)
    log(f"newest releases: {len(failed)} tests fail; finding which upgrade breaks them")
    base = Venv(work, "attribution")
    base.install(EXTRAS["test"], constraints=LOCKS["test"])
    if base.pytest("-o", f"cache_dir={cache}", "--lf") != 0:
        log("they fail on the locked versions too: not an upstream release, the checkout itself")
        return 1
    verdicts = {}
    for name, (old, new) in sorted(drift.items(), key=lambda item: item[0] not in _direct_dependencies()):
        base.pip(f"{name}=={new}")
        verdicts[name] = base.pytest("-o", f"cache_dir={cache}", *failed) != 0
        base.pip("-r", str(LOCKS["test"]))  # back to the lock for the next suspect
    log("what each upgrade does to the failing tests, alone on top of the lock:")
    for name, breaks in verdicts.items():
        old, new = drift[name]
        log(f"  {name} {old} -> {new}: {'BREAKS them' if breaks else 'fine'}")
    if not any(verdicts.values()):
        log("  no single upgrade breaks them: it takes a combination (see the list of upgrades above)")
    log("failing tests:\n  " + "\n  ".join(failed))
    return 1


def _last_failed(cache: Path) -> list[str]:
    import json  # noqa: PLC0415

    path = cache / "v" / "cache" / "lastfailed"
    return sorted(json.loads(path.read_text())) if path.exists() else []


def _requirements() -> list[Requirement]:
    """bam's requirements, the `[test]` extra expanded (including its `bam[...]` self-references)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    requirements, pending = [Requirement(r) for r in project["dependencies"]], ["test"]
    while pending:
        for text in extras[pending.pop()]:
            requirement = Requirement(text)
            if canonicalize_name(requirement.name) == "bam":
                pending += sorted(requirement.extras)
            else:
                requirements.append(requirement)
    return requirements


def _direct_dependencies() -> set[str]:
    return {canonicalize_name(r.name) for r in _requirements()}


def oldest(work: Path) -> int:
    pins = {}
    for requirement in _requirements():
        name = canonicalize_name(requirement.name)
        lower = [s.version for s in requirement.specifier if s.operator in (">=", "==", "~=")]
        if name == "torch":
            continue  # the CPU pin (see the docstring)
        if not lower:
            log(f"{requirement}: no lower bound declared")
            return 1
        pins[name] = lower[0]
    constraints = work / "oldest.txt"
    constraints.write_text("".join(f"{name}=={version}\n" for name, version in sorted(pins.items())))
    log("lower bounds: " + ", ".join(f"{name}=={version}" for name, version in sorted(pins.items())))
    env = Venv(work, "oldest")
    env.install(EXTRAS["test"], constraints=constraints)
    return env.pytest()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["lock", "newest", "oldest"])
    parser.add_argument("tests", nargs="*", help="`newest` only: test paths to run instead of its default set")
    parser.add_argument("--keep", action="store_true", help="keep the virtualenvs (their path is printed)")
    parser.add_argument("--torch", help="the torch version to pin (default: requirements/test.txt's)")
    args = parser.parse_args()
    global TORCH
    TORCH = args.torch
    work = Path(tempfile.mkdtemp(prefix=f"bam-{args.what}-"))
    try:
        if args.what == "lock":
            return lock(work)
        if args.what == "newest":
            return newest(work, args.tests or NEWEST_TESTS)
        return oldest(work)
    finally:
        if args.keep:
            log(f"virtualenvs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
