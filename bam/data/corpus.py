"""The demo's built-in corpus: four domains of real text that bam's own pinned install brings.

Nothing is downloaded or copied into the repository; the text is read at run time, and only from
sources whose text is fixed by the Python version and by requirements/default.txt (the lock file of
`pip install -e .`), never from whatever else happens to be installed:
  general  prose: the Python documentation topics shipped in `pydoc_data`, and the docstrings of
           the standard library's modules, classes and functions (one document per module)
  code     the standard library's own `.py` files, tests excluded (one document per file)
  math     docstrings of sympy and mpmath (torch brings sympy, sympy mpmath; one document per module)
  legal    the licence files in the metadata (`.dist-info`) of LICENSE_DISTRIBUTIONS, a fixed list of
           distributions bam's default install brings, and CPython's LICENSE (one document per file)
The standard library is the top-level modules of `sys.stdlib_module_names` found in the stdlib
directory, so build files (`_sysconfigdata_*.py`, `config-*/`) and site-packages stay out; its text,
`pydoc_data` and CPython's LICENSE change with the Python version. /usr/share/common-licenses is not
read: its files come with the OS image (Debian's base-files), which no bam lock file fixes.

Documents are deduplicated by content (the same MIT licence ships with several packages, and a
duplicate across train and test would flatter the held-out perplexity). A domain's fingerprint is
the sha256 of its documents (bam.data.sources.documents_sha256), the digest bam.data.shards records as
a prepared domain's `content_sha256`; the corpus fingerprint combines the four.
`python -m bam.data.corpus` prints them for this machine.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import platform
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

from packaging.utils import canonicalize_name  # packaging comes with transformers
from packaging.version import InvalidVersion, Version

from bam.data.sources import documents_sha256

DOMAINS = ("general", "code", "math", "legal")
TEST_DIRS = {"test", "tests", "idle_test", "testing"}
LICENSE_PREFIXES = ("LICENSE", "LICENCE", "COPYING", "NOTICE", "COPYRIGHT")
MIN_DOC_CHARS = 200
MATH_DISTRIBUTIONS = ("sympy", "mpmath")
# Every one is a dependency of bam, torch, transformers or matplotlib, so the default install brings
# it and the lock file pins it. Left out: tokenizers, which ships no licence file, and the HTTP stack
# under huggingface-hub (httpx2, anyio, ...), huggingface-hub's own choice, changed between releases.
LICENSE_DISTRIBUTIONS = (
    "contourpy", "cycler", "filelock", "fonttools", "fsspec", "huggingface-hub", "jinja2", "kiwisolver",
    "markupsafe", "matplotlib", "mpmath", "networkx", "numpy", "packaging", "pillow", "pyparsing",
    "python-dateutil", "pyyaml", "regex", "safetensors", "six", "sympy", "torch", "tqdm", "transformers",
    "typing-extensions",
)
LOCK_FILE = Path(__file__).resolve().parents[2] / "requirements" / "default.txt"  # bam/data/ -> the repository

# The corpus behind the README's demo numbers: `bam demo` with its default preset (at most
# REFERENCE_MAX_CHARS characters per domain) on Python REFERENCE_PYTHON with the lock file's versions.
# The README quotes the fingerprint and tests/test_corpus.py checks that it does.
REFERENCE_MAX_CHARS = 2_000_000
REFERENCE_PYTHON = "3.11.7"
REFERENCE_FINGERPRINT = "4dd92b9566de07ba54e08daa543e5180e15a247669baa30529c9225afd911487"


@dataclass
class CorpusDomain:
    name: str
    documents: list[str]
    sources: list[str]  # what the text was read from, machine-independent, for the report

    @property
    def n_chars(self) -> int:
        return sum(len(d) for d in self.documents)

    @property
    def fingerprint(self) -> str:
        return documents_sha256(self.documents)

    def summary(self) -> dict:
        return {"sha256": self.fingerprint, "documents": len(self.documents), "characters": self.n_chars,
                "sources": self.sources}


def corpus_fingerprint(domain_sha256: dict[str, str]) -> str:
    """One digest for the corpus: sha256 of `NAME SHA256` lines in DOMAINS order."""
    lines = "".join(f"{name} {domain_sha256[name]}\n" for name in DOMAINS)
    return hashlib.sha256(lines.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Where the text is


def _stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _is_test(parts: tuple[str, ...]) -> bool:
    return bool(set(parts) & TEST_DIRS) or parts[-1].startswith("test_")


def stdlib_files() -> list[Path]:
    """The standard library's `.py` files, tests excluded, in a fixed order."""
    root = _stdlib()
    files = []
    for top in sorted(root.iterdir()):
        if top.name.removesuffix(".py") not in sys.stdlib_module_names:
            continue
        candidates = [top] if top.suffix == ".py" else sorted(top.rglob("*.py")) if top.is_dir() else []
        files += [p for p in candidates if not _is_test(p.relative_to(root).parts)]
    return files


def _distribution(name: str) -> importlib.metadata.Distribution | None:
    try:
        return importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def distribution_files(name: str, licences: bool) -> list[Path]:
    """A distribution's licence files (in its .dist-info) or its package's non-test `.py` files."""
    dist = _distribution(name)
    if dist is None or dist.files is None:
        return []
    files = []
    for entry in dist.files:
        parts = entry.parts
        if licences:
            keep = parts[0].endswith(".dist-info") and entry.name.upper().startswith(LICENSE_PREFIXES)
        else:
            keep = entry.suffix == ".py" and not parts[0].endswith(".dist-info") and not _is_test(parts)
        if keep:
            files.append(Path(entry.locate()))
    return sorted(files)


def cpython_license() -> Path:
    return _stdlib() / "LICENSE.txt"


def source_files() -> dict[str, list[Path]]:
    """Every file the corpus reads, by domain (pydoc_data's topics module counts for general)."""
    import pydoc_data.topics

    stdlib = stdlib_files()
    return {
        "general": [Path(pydoc_data.topics.__file__), *stdlib],
        "code": stdlib,
        "math": [p for name in MATH_DISTRIBUTIONS for p in distribution_files(name, licences=False)],
        "legal": [p for name in LICENSE_DISTRIBUTIONS for p in distribution_files(name, licences=True)]
                 + [p for p in (cpython_license(),) if p.is_file()],
    }


def files_digest(files: dict[str, list[Path]]) -> str:
    """A cheap key of what the corpus would read: every file's path, size and modification time."""
    digest = hashlib.sha256()
    for name, paths in files.items():
        for path in paths:
            stat = path.stat()
            digest.update(f"{name}\0{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def source_versions() -> dict:
    """What fixes the corpus text: the Python version, and each named distribution's (None: missing)."""
    versions = {"python": platform.python_version(), "python_implementation": platform.python_implementation()}
    for name in sorted({*LICENSE_DISTRIBUTIONS, *MATH_DISTRIBUTIONS}):
        dist = _distribution(name)
        versions[name] = dist.version if dist is not None else None
    return versions


def locked_versions(lock_file: Path = LOCK_FILE) -> dict[str, str] | None:
    """`name==version` pins of the lock file (names normalized), or None where there is no lock file."""
    try:
        text = lock_file.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    pins = {}
    for line in text.splitlines():
        requirement = line.split("#", 1)[0].split(";", 1)[0].strip().rstrip("\\").strip()
        name, sep, version = requirement.partition("==")
        if sep and name.strip():
            pins[canonicalize_name(name.split("[", 1)[0].strip())] = version.strip()
    return pins


def _matches_pin(installed: str, pinned: str) -> bool:
    try:  # a local build tag (torch's +cpu) is the same release as the pin without it
        return Version(installed).public == Version(pinned).public
    except InvalidVersion:
        return installed == pinned


def source_warnings(versions: dict, lock_file: Path = LOCK_FILE) -> list[str]:
    """Why this machine's corpus may differ from the reference's, one line per cause."""
    warnings = []
    if versions["python"] != REFERENCE_PYTHON:
        warnings.append(f"Python {versions['python']} here, the reference corpus was read with Python "
                        f"{REFERENCE_PYTHON}: the general and code domains (standard library) differ")
    if not cpython_license().is_file():
        warnings.append(f"{cpython_license()} not found (this Python build does not ship CPython's LICENSE): "
                        "the legal domain differs")
    pins = locked_versions(lock_file)
    if pins is None:
        warnings.append(f"{lock_file} not found: the corpus distributions' versions are not checked")
        pins = {}
    for name in sorted({*LICENSE_DISTRIBUTIONS, *MATH_DISTRIBUTIONS}):
        installed, pinned = versions.get(name), pins.get(name)
        if installed is None:
            warnings.append(f"{name} is not installed: its text is missing from the corpus")
        elif pinned is not None and not _matches_pin(installed, pinned):
            warnings.append(f"{name} {installed} installed, {lock_file.name} pins {pinned}: its text may differ")
        elif pinned is None and pins:
            warnings.append(f"{name} is not pinned by {lock_file}: its version {installed} is not checked")
        if installed is not None and (dist := _distribution(name)) is not None and dist.files is None:
            warnings.append(f"{name} is installed without a file list (RECORD): its text is missing from the corpus")
    return warnings


# ---------------------------------------------------------------------------------------------
# The text


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


def _describe(name: str, versions: dict) -> list[str]:
    python = f"Python {versions['python']}"
    if name == "general":
        return [f"{python} pydoc_data topics", f"docstrings of the {python} standard library"]
    if name == "code":
        return [f"the {python} standard library's .py files (tests excluded)"]
    if name == "math":
        return [f"docstrings of {d} {versions[d]}" for d in MATH_DISTRIBUTIONS]
    return [f"licence files of {len(LICENSE_DISTRIBUTIONS)} distributions (bam.data.corpus.LICENSE_DISTRIBUTIONS)",
            f"CPython {versions['python']} LICENSE.txt"]


def read_documents(files: dict[str, list[Path]] | None = None) -> dict[str, list[str]]:
    """Every domain's documents, deduplicated, at least MIN_DOC_CHARS long, ordered by content hash.

    The order does not depend on file-system order, so the documents and the fingerprint are the
    same wherever the same sources are installed.
    """
    import pydoc_data.topics

    files = source_files() if files is None else files
    texts = {path: text for path in dict.fromkeys(p for paths in files.values() for p in paths)
             if (text := _read_text(path)) is not None}
    docstrings: dict[Path, str] = {}

    def docstrings_of(path: Path) -> str:  # general and code share the stdlib: parse each file once
        if path not in docstrings:
            docstrings[path] = _docstrings(texts[path])
        return docstrings[path]

    topics = Path(pydoc_data.topics.__file__)
    raw = {
        "general": list(pydoc_data.topics.topics.values())
                   + [docstrings_of(p) for p in files["general"] if p != topics and p in texts],
        "code": [texts[p] for p in files["code"] if p in texts],
        "math": [docstrings_of(p) for p in files["math"] if p in texts],
        "legal": [texts[p] for p in files["legal"] if p in texts],
    }
    documents = {}
    for name in DOMAINS:
        unique = {}
        for doc in raw[name]:
            doc = doc.strip()
            if len(doc) >= MIN_DOC_CHARS:
                unique.setdefault(hashlib.sha256(doc.encode()).hexdigest(), doc)
        documents[name] = [unique[key] for key in sorted(unique)]
    return documents


def cap_documents(documents: list[str], max_chars: int | None) -> list[str]:
    """A deterministic subset: documents in their (content-hash) order until the budget is spent."""
    if max_chars is None:
        return list(documents)
    kept, total = [], 0
    for doc in documents:
        if total >= max_chars:
            break
        kept.append(doc[: max_chars - total] if total + len(doc) > max_chars else doc)
        total += len(kept[-1])
    return kept


@dataclass
class Corpus:
    domains: dict[str, CorpusDomain]
    versions: dict = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        return corpus_fingerprint({name: d.fingerprint for name, d in self.domains.items()})


def build_corpus(max_chars_per_domain: int | None = None,
                 documents: dict[str, list[str]] | None = None) -> Corpus:
    """Every domain's documents (read now unless given), optionally capped at a size per domain."""
    documents = read_documents() if documents is None else documents
    versions = source_versions()
    domains = {name: CorpusDomain(name, cap_documents(documents[name], max_chars_per_domain),
                                  _describe(name, versions)) for name in DOMAINS}
    return Corpus(domains, versions)


def reference_line(fingerprint: str) -> str:
    """Whether a corpus at REFERENCE_MAX_CHARS is the README's, in one line."""
    if fingerprint == REFERENCE_FINGERPRINT:
        return (f"corpus {fingerprint[:12]}: the same as the README's, so the default demo reproduces "
                f"its numbers with the same torch build and CPU kernels (README: the same corpus)")
    return (f"corpus {fingerprint[:12]} DIFFERS from the README's {REFERENCE_FINGERPRINT[:12]}: "
            f"this machine's numbers are not comparable with the README's")


def main() -> None:
    corpus = build_corpus(REFERENCE_MAX_CHARS)
    print(reference_line(corpus.fingerprint))
    for warning in source_warnings(corpus.versions):
        print(f"warning: {warning}")
    for name, domain in corpus.domains.items():
        print(f"{name:8s} {domain.fingerprint}  {len(domain.documents)} documents, {domain.n_chars:,} characters")
    print(f"corpus   {corpus.fingerprint}")


if __name__ == "__main__":
    main()
