"""The demo's built-in corpus: four domains of real text found on any machine with Python and torch.

Nothing is downloaded or copied into the repository; the text is read at run time:
  general  prose: the Python documentation topics shipped in `pydoc_data`, and the docstrings of
           the standard library's modules, classes and functions (one document per module)
  code     the standard library's own `.py` files, tests excluded (one document per file)
  math     docstrings of sympy and mpmath (installed with torch; one document per module)
  legal    licence texts: LICENSE/COPYING/NOTICE files of installed distributions,
           /usr/share/common-licenses, CPython's LICENSE (one document per file)
Documents are deduplicated by content (the same MIT licence ships with dozens of packages, and a
duplicate across train and test would flatter the held-out perplexity).
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

DOMAINS = ("general", "code", "math", "legal")
TEST_DIRS = {"test", "tests", "idle_test", "testing"}
LICENSE_PREFIXES = ("LICENSE", "LICENCE", "COPYING", "NOTICE", "COPYRIGHT")
MIN_DOC_CHARS = 200


@dataclass
class CorpusDomain:
    name: str
    documents: list[str]
    sources: list[str]  # where the text was found, for the report

    @property
    def n_chars(self) -> int:
        return sum(len(d) for d in self.documents)


def _stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    return Path(spec.origin).parent if spec and spec.origin else None


def _python_files(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*.py")):
        parts = set(path.relative_to(root).parts)
        if "site-packages" in parts or parts & TEST_DIRS or path.name.startswith("test_"):
            continue
        yield path


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None  # a machine's files are not ours to vouch for: skip what is not UTF-8 text


def _docstrings(source: str) -> str:
    """All module, class and function docstrings of one source file, in file order."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return ""
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    docs = [ast.get_docstring(node) for node in ast.walk(tree) if isinstance(node, kinds)]
    return "\n\n".join(d for d in docs if d)


def general_documents() -> tuple[list[str], list[str]]:
    import pydoc_data.topics

    docs = list(pydoc_data.topics.topics.values())
    for path in _python_files(_stdlib()):
        text = _read_text(path)
        if text:
            docs.append(_docstrings(text))
    return docs, [pydoc_data.topics.__file__, f"docstrings of {_stdlib()}"]


def code_documents() -> tuple[list[str], list[str]]:
    docs = [text for path in _python_files(_stdlib()) if (text := _read_text(path))]
    return docs, [f"{_stdlib()}/**/*.py (tests excluded)"]


def math_documents() -> tuple[list[str], list[str]]:
    docs, sources = [], []
    for package in ("sympy", "mpmath"):
        root = _package_dir(package)
        if root is None:
            continue
        sources.append(f"docstrings of {root}")
        for path in _python_files(root):
            text = _read_text(path)
            if text:
                docs.append(_docstrings(text))
    return docs, sources


def legal_documents() -> tuple[list[str], list[str]]:
    candidates: list[Path] = []
    site = Path(sysconfig.get_paths()["purelib"])
    candidates += [p for p in sorted(site.glob("*.dist-info/**/*"))
                   if p.is_file() and p.name.upper().startswith(LICENSE_PREFIXES)]
    common = Path("/usr/share/common-licenses")
    if common.is_dir():
        candidates += [p for p in sorted(common.iterdir()) if p.is_file()]
    candidates += [p for p in (_stdlib() / "LICENSE.txt", _stdlib() / "LICENSE") if p.is_file()]
    docs = [text for path in candidates if (text := _read_text(path))]
    sources = [f"{site}/*.dist-info LICENSE files", str(common), str(_stdlib() / "LICENSE.txt")]
    return docs, sources


BUILDERS = {"general": general_documents, "code": code_documents,
            "math": math_documents, "legal": legal_documents}


def build_corpus(max_chars_per_domain: int | None = None) -> dict[str, CorpusDomain]:
    """Every domain's deduplicated documents, optionally capped in size.

    The cap keeps a deterministic subset: documents ordered by content hash, taken until the budget
    is spent, so the choice does not depend on file-system order and is stable across runs.
    """
    corpus = {}
    for name in DOMAINS:
        raw, sources = BUILDERS[name]()
        unique = {}
        for doc in raw:
            doc = doc.strip()
            if len(doc) >= MIN_DOC_CHARS:
                unique.setdefault(hashlib.sha256(doc.encode()).hexdigest(), doc)
        docs = [unique[key] for key in sorted(unique)]
        if max_chars_per_domain is not None:
            kept, total = [], 0
            for doc in docs:
                if total >= max_chars_per_domain:
                    break
                kept.append(doc[: max_chars_per_domain - total] if total + len(doc) > max_chars_per_domain else doc)
                total += len(kept[-1])
            docs = kept
        corpus[name] = CorpusDomain(name, docs, sources)
    return corpus
