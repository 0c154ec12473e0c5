"""mergekit in its own virtualenv (bench/.venv-mergekit, gitignored), for the mixing benchmark.

mergekit pulls in accelerate, peft, datasets and more, and may pin other transformers versions than
ours, so it never goes into the project's environment. The install is: create the venv, then
`pip install torch==<our torch version>` first (so pip does not pick some other torch for
mergekit), then `pip install mergekit`. Before installing, mergekit's metadata (`pip download
mergekit --no-deps`) is read and its torch / transformers requirements are recorded; an older
transformers pinned by mergekit is fine inside its venv. If anything fails, `ensure` returns the
reason instead of raising, and the mixing benchmark records it and still measures `bam mix`.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from bench.common import BENCH_DIR, CACHE_DIR, log

VENV = BENCH_DIR / ".venv-mergekit"
INSTALL_LOG = CACHE_DIR / "mergekit-install.log"


def _bin(name: str) -> Path:
    return VENV / ("Scripts" if sys.platform == "win32" else "bin") / name


def torch_requirement() -> str:
    """The torch we run, without its local label (2.13.0+cpu -> torch==2.13.0)."""
    return f"torch=={torch.__version__.split('+')[0]}"


def _run(cmd: list[str], timeout: float = 1800) -> None:
    INSTALL_LOG.parent.mkdir(parents=True, exist_ok=True)
    with open(INSTALL_LOG, "ab") as out:
        out.write(f"\n$ {' '.join(map(str, cmd))}\n".encode())
        out.flush()
        subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=True, timeout=timeout)


def _log_tail(n: int = 1500) -> str:
    try:
        return INSTALL_LOG.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def mergekit_requirements(python: str = sys.executable) -> dict:
    """mergekit's version and its torch/transformers requirements, from `pip download --no-deps`."""
    with tempfile.TemporaryDirectory() as tmp:
        _run([python, "-m", "pip", "download", "mergekit", "--no-deps", "-d", tmp], timeout=600)
        wheels = list(Path(tmp).glob("mergekit-*.whl"))
        if not wheels:
            return {"error": "pip download produced no wheel (sdist only?)"}
        with zipfile.ZipFile(wheels[0]) as zf:
            meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
            text = zf.read(meta).decode("utf-8", "replace")
    version = re.search(r"^Version: (.+)$", text, re.MULTILINE)
    requires = re.findall(r"^Requires-Dist: (.+)$", text, re.MULTILINE)
    pick = lambda pkg: [r for r in requires if re.match(rf"{pkg}\b", r) and "extra ==" not in r]
    return {"version": version.group(1).strip() if version else None, "wheel": wheels[0].name,
            "requires_torch": pick("torch"), "requires_transformers": pick("transformers")}


def installed_versions() -> dict:
    code = ("import importlib.metadata as m, json; "
            "print(json.dumps({p: m.version(p) for p in ('mergekit', 'torch', 'transformers')}))")
    out = subprocess.run([str(_bin("python")), "-c", code], capture_output=True, text=True, timeout=120, check=False)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-500:])
    import json

    return json.loads(out.stdout.strip().splitlines()[-1])


def ensure(install: bool = True) -> dict:
    """{"exe": path-to-mergekit-moe, "versions": ..., "requirements": ...} or {"error": reason}."""
    exe = _bin("mergekit-moe")
    info: dict = {"venv": str(VENV)}
    if exe.exists():
        try:
            info["versions"] = installed_versions()
            info["exe"] = str(exe)
            return info
        except (RuntimeError, subprocess.SubprocessError) as err:
            info["warning"] = f"existing venv unusable ({err}); reinstalling"
    if not install:
        return {**info, "error": f"mergekit is not installed in {VENV} (run `python -m bench --only mixing` to "
                                 f"install it)"}
    try:
        log(f"[mixing] installing mergekit into {VENV} (log: {INSTALL_LOG})")
        INSTALL_LOG.parent.mkdir(parents=True, exist_ok=True)
        INSTALL_LOG.write_text("")
        info["requirements"] = mergekit_requirements()
        if not _bin("python").exists():
            _run([sys.executable, "-m", "venv", str(VENV)])
        _run([str(_bin("python")), "-m", "pip", "install", torch_requirement()])
        _run([str(_bin("python")), "-m", "pip", "install", "mergekit"])
        info["versions"] = installed_versions()
        if not exe.exists():
            raise RuntimeError(f"pip installed mergekit but {exe} is missing")
        info["exe"] = str(exe)
    except (subprocess.SubprocessError, RuntimeError, OSError, StopIteration) as err:
        info["error"] = f"mergekit could not be installed: {err}; pip log tail: {_log_tail()}"
    return info


if __name__ == "__main__":
    import json

    print(json.dumps(ensure(install=True), indent=2))
