"""Domains: named streams of documents, read from the sources a user names on the command line.

A domain is a named stream of documents read from a source: a text file, a directory of text files, a
glob, a JSONL or Parquet file, a `datasets` dataset, or an in-memory list. The CLI names one as
`NAME=PATH[:WEIGHT]` (see `parse_domain_spec`). A file of a directory or glob is one document, a
JSONL/Parquet/`datasets` record is one; a text file named on its own is a whole corpus and is cut into
documents of 1-2 KB at blank lines (see TEXT_DOCUMENT_MIN).

A domain's content fingerprint (`documents_sha256`) is a sha256 over its documents with their
boundaries: bam.data.shards keys its cache by it, and the built-in corpus (bam.data.corpus) reports it.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bam.errors import BamError, first_duplicate, first_line

# Plain-text files a directory source picks up; files without a suffix (README, LICENSE) count too.
TEXT_SUFFIXES = frozenset({".txt", ".md", ".rst", ".py"})

# A text file named on its own (nanoGPT's input.txt) is a corpus, not one document: held out by a hash
# of its whole text, it would be all train or all validation. It is cut into documents instead: one
# ends at the first blank line once it holds TEXT_DOCUMENT_MIN characters, so paragraphs stay whole,
# or at the first line end once it holds TEXT_DOCUMENT_MAX (text without blank lines; a longer line
# is cut every TEXT_DOCUMENT_MAX characters). For ASCII text characters are bytes: 1-2 KB is a few
# hundred tokens, about one training window, costs one EOS per document (well under 1% of tokens),
# and cuts a few-hundred-KB file into a few hundred documents, enough for the hashed split fractions
# to come out near the configured ones.
TEXT_DOCUMENT_MIN = 1000
TEXT_DOCUMENT_MAX = 2000

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# ----------------------------------------------------------------------------------------------------
# Domain specs and sources


@dataclass(frozen=True)
class DomainSpec:
    """One domain as named on the command line: `NAME=PATH[:WEIGHT]`.

    `path` is a file, directory, glob, or `hf:DATASET[:SPLIT]`; a trailing `#FIELD` on PATH (already
    removed from `path`, kept in `field`) selects the text field of JSONL/Parquet/`datasets` sources,
    which default to `text`. `weight` is the domain's unnormalized share of the training mixture.
    """

    name: str
    path: str
    weight: float = 1.0
    field: str | None = None


def check_unique_names(names: Iterable[str]) -> None:
    """Refuse a domain named twice among the --data items, before any of them is read."""
    duplicate = first_duplicate(names)
    if duplicate:
        raise BamError(f"--data: domain {duplicate!r} is given twice")


def parse_domain_spec(spec: str) -> DomainSpec:
    """Parse `NAME=PATH[:WEIGHT]`, where PATH may end in `#FIELD`.

    A trailing `:x` is the weight whenever x parses as a number, so `code=hf:org/data:train` has no
    weight (split "train") and `code=hf:org/data:train:0.5` has weight 0.5. Paths are POSIX paths.
    """
    name, sep, rest = spec.partition("=")
    name = name.strip()
    if not sep or not rest:
        raise BamError(f"domain spec {spec!r}: expected NAME=PATH[:WEIGHT]")
    _check_domain_name(name, f"domain spec {spec!r}")

    weight = 1.0
    head, colon, tail = rest.rpartition(":")
    if colon and head and _is_number(tail):
        weight = float(tail)
        rest = head
        if not (math.isfinite(weight) and weight > 0):
            raise BamError(f"domain spec {spec!r}: weight must be a positive number, got {tail}")

    path, hash_sign, fld = rest.rpartition("#")
    if hash_sign and path and fld and "/" not in fld:
        rest = path
    else:
        fld = None
    return DomainSpec(name=name, path=rest, weight=weight, field=fld)


@dataclass(frozen=True)
class Domain:
    """A named, re-readable stream of documents.

    `read` is called once per pass (prepare_domain reads twice: hash, then tokenize) and must yield the
    same documents each time. Empty and whitespace-only documents are skipped: they carry no text.
    """

    name: str
    source: str  # human-readable origin, for error messages and meta.json
    read: Callable[[], Iterable[str]] = field(repr=False, compare=False)

    def documents(self) -> Iterator[str]:
        for text in self.read():
            if text.strip():
                yield text

    @classmethod
    def from_documents(cls, name: str, docs: Iterable[str]) -> Domain:
        """A domain from documents already in memory (the demo builds its corpora this way)."""
        _check_domain_name(name, f"domain {name!r}")
        docs = tuple(docs)  # a generator could only be read once
        for i, doc in enumerate(docs):
            if not isinstance(doc, str):
                raise BamError(f"domain {name!r}: document {i} is {type(doc).__name__}, expected str")
        return cls(name=name, source=f"<{len(docs)} in-memory documents>", read=lambda: iter(docs))

    @classmethod
    def from_spec(cls, spec: DomainSpec | str) -> Domain:
        """A domain read from disk or `datasets`. Missing paths and empty globs fail here, not later."""
        if isinstance(spec, str):
            spec = parse_domain_spec(spec)
        source = spec.path + (f"#{spec.field}" if spec.field else "")
        return cls(name=spec.name, source=source, read=_source_reader(spec))


def _check_domain_name(name: str, where: str) -> None:
    # Names become cache directory names and report labels, so keep them to a portable alphabet.
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise BamError(f"{where}: domain name must match [A-Za-z0-9][A-Za-z0-9_.-]*, got {name!r}")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _source_reader(spec: DomainSpec) -> Callable[[], Iterator[str]]:
    if spec.path.startswith("hf:"):
        dataset, _, split = spec.path[len("hf:"):].partition(":")
        if not dataset:
            raise BamError(f"domain '{spec.name}': expected hf:DATASET[:SPLIT], got {spec.path!r}")
        return lambda: _read_hf_dataset(dataset, split or "train", spec.field or "text")

    pattern = os.path.expanduser(spec.path)
    if glob.has_magic(pattern):
        # A glob selects files; directories it happens to match are ignored (use a directory path).
        matches = [Path(p) for p in sorted(glob.glob(pattern, recursive=True)) if os.path.isfile(p)]
        if not matches:
            raise BamError(f"domain '{spec.name}': {spec.path} matches no files")
        readers = [_path_reader(p, spec) for p in matches]
        return lambda: itertools.chain.from_iterable(read() for read in readers)

    path = Path(pattern)
    if not path.exists():
        raise BamError(f"domain '{spec.name}': {spec.path} does not exist")
    if is_text_file(path):
        _reject_field(spec, path)
        return lambda: _read_text_file_documents(path)
    return _path_reader(path, spec)


def is_text_file(path: Path) -> bool:
    """Whether a path named on its own is a plain-text corpus, cut into documents (not the files a
    directory or glob yields: each of those stays one document)."""
    return path.is_file() and path.suffix.lower() not in (".jsonl", ".parquet")


def _path_reader(path: Path, spec: DomainSpec) -> Callable[[], Iterator[str]]:
    if path.is_dir():
        if _is_saved_dataset(path):
            return lambda: _read_saved_dataset(path, spec.field or "text")
        _reject_field(spec, path)
        return lambda: map(_read_text_file, _text_files(path))
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return lambda: _read_jsonl(path, spec.field or "text")
    if suffix == ".parquet":
        return lambda: _read_parquet(path, spec.field or "text")
    _reject_field(spec, path)
    return lambda: iter([_read_text_file(path)])


def _reject_field(spec: DomainSpec, path: Path) -> None:
    if spec.field is not None:
        raise BamError(
            f"domain '{spec.name}': #{spec.field} selects a field, but {path} is plain text "
            "(fields apply to .jsonl, .parquet and datasets sources)"
        )


def _text_files(root: Path) -> Iterator[Path]:
    """Text files under `root`, recursively, in a fixed (sorted) order; hidden entries are skipped."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if name.startswith(".") or not path.is_file():
                continue
            if path.suffix.lower() in TEXT_SUFFIXES or path.suffix == "":
                yield path


def _read_text_file(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8-sig")  # -sig: drop a byte-order mark, keep the rest
    except UnicodeDecodeError as exc:
        raise BamError(f"{path}: not UTF-8 text (invalid byte at offset {exc.start})") from None
    except OSError as exc:
        raise BamError(f"{path}: cannot be read ({exc.strerror})") from None


def _read_text_file_documents(path: Path) -> Iterator[str]:
    """A text file named on its own, read line by line and cut into documents (see TEXT_DOCUMENT_MIN)."""
    try:
        # newline="": lines end at \n, \r\n or \r and keep their ending, so the documents add up to the
        # file's exact text (bits per byte counts every byte); the limit cuts a longer line.
        with path.open(encoding="utf-8-sig", newline="") as fh:
            yield from _text_documents(iter(lambda: fh.readline(TEXT_DOCUMENT_MAX), ""))
    except UnicodeDecodeError:
        _read_text_file(path)  # reads the file whole, to name the invalid byte's offset
        raise
    except OSError as exc:
        raise BamError(f"{path}: cannot be read ({exc.strerror})") from None


def _text_documents(lines: Iterable[str]) -> Iterator[str]:
    """Consecutive lines joined into documents; the rule depends on the text alone, so it is stable."""
    document: list[str] = []
    size = 0
    for line in lines:
        document.append(line)
        size += len(line)
        if size >= TEXT_DOCUMENT_MAX or (size >= TEXT_DOCUMENT_MIN and not line.strip()):
            yield "".join(document)
            document, size = [], 0
    if document:
        yield "".join(document)


def _read_jsonl(path: Path, fld: str) -> Iterator[str]:
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise BamError(f"{path}:{lineno}: not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BamError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or fld not in record:
                raise BamError(f"{path}:{lineno}: no field '{fld}' (select another field with PATH#FIELD)")
            yield _text_value(record[fld], f"{path}:{lineno}: field '{fld}'")


def _read_parquet(path: Path, fld: str) -> Iterator[str]:
    parquet = _import_optional("pyarrow.parquet", path)
    try:
        table = parquet.ParquetFile(path)
    except Exception as exc:  # pyarrow raises its own error types for corrupt files
        raise BamError(f"{path}: not a readable Parquet file ({first_line(exc)})") from None
    columns = table.schema_arrow.names
    if fld not in columns:
        raise BamError(f"{path}: no column '{fld}' (columns: {', '.join(columns)}; select one with PATH#FIELD)")
    row = 0
    for batch in table.iter_batches(columns=[fld], batch_size=1024):
        for value in batch.column(0).to_pylist():
            yield _text_value(value, f"{path}: row {row}, column '{fld}'")
            row += 1


def _is_saved_dataset(path: Path) -> bool:
    # What datasets.Dataset.save_to_disk / DatasetDict.save_to_disk leave behind.
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file()
    )


def _read_saved_dataset(path: Path, fld: str) -> Iterator[str]:
    datasets = _import_optional("datasets", path)
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises several types (FileNotFoundError, its own errors)
        raise BamError(f"{path}: cannot load the saved dataset ({first_line(exc)})") from None
    if isinstance(loaded, datasets.DatasetDict):
        # A saved DatasetDict holds one sub-directory per split; point PATH at one to choose another.
        if "train" in loaded:
            loaded = loaded["train"]
        elif len(loaded) == 1:
            loaded = next(iter(loaded.values()))
        else:
            raise BamError(f"{path}: dataset has splits {', '.join(loaded)} and no 'train'; use PATH/SPLIT")
    yield from _iter_dataset(loaded, fld, str(path))


def _read_hf_dataset(name: str, split: str, fld: str) -> Iterator[str]:
    datasets = _import_optional("datasets", f"hf:{name}")
    try:
        # Not streaming: the download lands in the Hugging Face cache once, and our two passes
        # (hash, tokenize) then read the memory-mapped Arrow files instead of the network.
        loaded = datasets.load_dataset(name, split=split)
    except Exception as exc:  # network, auth and not-found errors all surface here
        raise BamError(f"hf:{name}: cannot load split '{split}' ({first_line(exc)})") from None
    yield from _iter_dataset(loaded, fld, f"hf:{name}:{split}")


def _iter_dataset(dataset, fld: str, where: str) -> Iterator[str]:
    if fld not in dataset.column_names:
        raise BamError(
            f"{where}: no column '{fld}' (columns: {', '.join(dataset.column_names)}; select one with PATH#FIELD)"
        )
    row = 0
    for batch in dataset.select_columns([fld]).iter(batch_size=1024):
        for value in batch[fld]:
            yield _text_value(value, f"{where}: row {row}, column '{fld}'")
            row += 1


def _text_value(value, where: str) -> str:
    if value is None:  # a null cell is an empty document, skipped like any other
        return ""
    if not isinstance(value, str):
        raise BamError(f"{where} is {type(value).__name__}, expected a string")
    return value


def _import_optional(module: str, needed_for):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0]
        raise BamError(f"{needed_for}: reading it needs {package}; pip install bam[data]") from None


# ----------------------------------------------------------------------------------------------------
# Content fingerprint


def documents_sha256(documents: Iterable[str]) -> str:
    """sha256 over the documents in order, each length-prefixed: a prepared domain's content_sha256."""
    digest = hashlib.sha256()
    for text in documents:
        hash_document(digest, text.encode("utf-8"))
    return digest.hexdigest()


def hash_document(digest, data: bytes) -> None:
    """Add one document's UTF-8 bytes to a running sha256 (`hashlib.sha256()`) of a document stream."""
    # Length-prefixed so that document boundaries are part of the content: ["ab"] != ["a", "b"].
    digest.update(len(data).to_bytes(8, "little"))
    digest.update(data)
