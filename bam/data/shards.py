"""Corpora -> tokenized memory-mapped shards -> deterministic, resumable mixture batches.

Three stages, top to bottom in this file:

1. Domains. A domain is a named stream of documents read from a source: a text file, a directory of
   text files, a glob, a JSONL or Parquet file, a `datasets` dataset, or an in-memory list. The CLI
   names one as `NAME=PATH[:WEIGHT]` (see `parse_domain_spec`). A file of a directory or glob is one
   document, a JSONL/Parquet/`datasets` record is one; a text file named on its own is a whole corpus
   and is cut into documents of 1-2 KB at blank lines (see TEXT_DOCUMENT_MIN).
2. Tokenized shards. `prepare_domain` splits the documents into train/validation/test by hashing each
   document (so adding documents never moves the others), tokenizes them, puts EOS after each, and
   writes one flat token array per split (`<split>.bin`, read back with `numpy.memmap`) plus
   `meta.json`. The cache directory is named by a sha256 of the content, tokenizer, fractions and seed,
   so a second call with the same inputs only re-reads and re-hashes the text; it never re-tokenizes.
3. Batches. `MixtureSampler.batch(step)` is a pure function of (seed, step): resuming at step k gives
   exactly the batch the interrupted run got, and data-parallel ranks take interleaved rows of the same
   global batch. `iter_eval_batches` cuts a held-out split into non-overlapping windows in which every
   token is predicted exactly once, for perplexity and bits per byte.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from bam.io.atomic import atomic_output_dir
from bam.errors import BamError

SPLITS = ("train", "validation", "test")
# Plain-text files a directory source picks up; files without a suffix (README, LICENSE) count too.
TEXT_SUFFIXES = frozenset({".txt", ".md", ".rst", ".py"})
META_NAME = "meta.json"
# Bump when the shard layout or the split/tokenization rule changes: old cache entries stop matching.
# How a source is cut into documents needs no bump: the content hash covers document boundaries.
FORMAT_VERSION = 1

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

# Tokenization batches: large enough for the Rust tokenizer to use every core, small enough that a
# batch's token lists stay a few hundred MB at most.
BATCH_DOCS = 1024
BATCH_CHARS = 4_000_000
# Below this much text the progress bar is noise (tests, the demo's small domains).
PROGRESS_MIN_BYTES = 32_000_000

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
    if _is_text_file(path):
        _reject_field(spec, path)
        return lambda: _read_text_file_documents(path)
    return _path_reader(path, spec)


def _is_text_file(path: Path) -> bool:
    # Whether a path named on its own is a plain-text corpus, cut into documents (not the files a
    # directory or glob yields: each of those stays one document).
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
        raise BamError(f"{path}: not a readable Parquet file ({_first_line(exc)})") from None
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
        raise BamError(f"{path}: cannot load the saved dataset ({_first_line(exc)})") from None
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
        raise BamError(f"hf:{name}: cannot load split '{split}' ({_first_line(exc)})") from None
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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ----------------------------------------------------------------------------------------------------
# Tokenized shards


@dataclass(frozen=True)
class SplitStats:
    tokens: int  # including one EOS per document
    documents: int
    bytes: int  # UTF-8 bytes of the documents' text, the denominator of bits per byte


@dataclass
class TokenizedDomain:
    """A prepared domain: one memory-mapped token array per split, described by meta.json."""

    name: str
    path: Path
    dtype: np.dtype
    eos_id: int
    vocab_size: int
    splits: dict[str, SplitStats]
    meta: dict = field(repr=False)
    _arrays: dict[str, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def load(cls, path: str | Path) -> TokenizedDomain:
        path = Path(path)
        meta_path = path / META_NAME
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise BamError(f"{meta_path}: missing; {path} is not a prepared domain") from None
        except json.JSONDecodeError as exc:
            raise BamError(f"{meta_path}: invalid JSON ({exc.msg})") from None
        if meta.get("format") != FORMAT_VERSION:
            raise BamError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT_VERSION}; re-prepare it")
        domain = cls(
            name=meta["name"],
            path=path,
            dtype=np.dtype(meta["dtype"]),
            eos_id=meta["eos_id"],
            vocab_size=meta["vocab_size"],
            splits={s: SplitStats(**meta["splits"][s]) for s in SPLITS},
            meta=meta,
        )
        domain._check_files()
        return domain

    def tokens(self, split: str) -> np.ndarray:
        """The split's flat token array (read-only memmap; an empty array for an empty split)."""
        stats = self._stats(split)
        if split not in self._arrays:
            if stats.tokens == 0:
                self._arrays[split] = np.empty(0, dtype=self.dtype)  # mmap cannot map an empty file
            else:
                self._arrays[split] = np.memmap(self.path / f"{split}.bin", dtype=self.dtype, mode="r")
        return self._arrays[split]

    def _stats(self, split: str) -> SplitStats:
        if split not in self.splits:
            raise BamError(f"domain '{self.name}': unknown split {split!r}, expected one of {', '.join(SPLITS)}")
        return self.splits[split]

    def _check_files(self) -> None:
        for split, stats in self.splits.items():
            path = self.path / f"{split}.bin"
            expected = stats.tokens * self.dtype.itemsize
            actual = path.stat().st_size if path.is_file() else None
            if actual != expected:
                raise BamError(f"{path}: {actual} bytes, meta.json says {expected}; delete {self.path} and re-prepare")

    def __getstate__(self):
        # Memmaps would pickle as full in-memory copies; workers reopen them lazily instead.
        state = dict(self.__dict__)
        state["_arrays"] = {}
        return state


def prepare_domain(
    source: Domain | DomainSpec | str,
    tokenizer,
    cache_dir: str | Path,
    val_fraction: float = 0.05,
    test_fraction: float = 0.0,
    seed: int = 0,
) -> TokenizedDomain:
    """Tokenize a domain into train/validation/test shards under `cache_dir`, or reuse a cached entry.

    `source` is a Domain (e.g. `Domain.from_documents`), a DomainSpec or a `NAME=PATH` string;
    `tokenizer` a Hugging Face tokenizer or a path to one. A document goes to test if its hash (with
    `seed`) falls in the first `test_fraction` of the hash range, to validation if in the next
    `val_fraction`, else to train: the assignment depends on that document alone, and exact duplicates
    always share a split, so duplicated text cannot leak from train into validation.
    """
    domain = source if isinstance(source, Domain) else Domain.from_spec(source)
    tokenizer = _as_tokenizer(tokenizer)
    settings = _SplitSettings(val_fraction, test_fraction, seed)
    eos_id = _eos_id(tokenizer)
    dtype = np.dtype(np.uint16) if len(tokenizer) <= 2**16 else np.dtype(np.uint32)

    # Pass 1: hash every document. The cache key needs the full content before we know whether to work.
    census = _census(domain)
    tokenizer_sha = _tokenizer_sha256(tokenizer)
    key = _sha256_json(
        {
            "format": FORMAT_VERSION,
            "content": census.content_sha,
            "tokenizer": tokenizer_sha,
            "val_fraction": float(settings.val_fraction),  # float: 0 and 0.0 are the same split
            "test_fraction": float(settings.test_fraction),
            "seed": settings.seed,
        }
    )
    entry = Path(cache_dir) / f"{domain.name}-{key[:16]}"
    if (entry / META_NAME).is_file():
        return TokenizedDomain.load(entry)

    # Pass 2: tokenize into a temporary directory that becomes the cache entry in one rename.
    with atomic_output_dir(entry, keep_existing=True) as tmp:
        splits = _tokenize_splits(domain, tokenizer, tmp, dtype, eos_id, settings, census)
        meta = {
            "format": FORMAT_VERSION,
            "name": domain.name,
            "source": domain.source,
            "key": key,
            "content_sha256": census.content_sha,
            "tokenizer_sha256": tokenizer_sha,
            "val_fraction": settings.val_fraction,
            "test_fraction": settings.test_fraction,
            "seed": settings.seed,
            "dtype": dtype.name,
            "eos_id": eos_id,
            "vocab_size": len(tokenizer),
            "splits": {s: vars(stats) for s, stats in splits.items()},
        }
        (tmp / META_NAME).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return TokenizedDomain.load(entry)


@dataclass(frozen=True)
class _SplitSettings:
    val_fraction: float
    test_fraction: float
    seed: int

    def __post_init__(self):
        for name in ("val_fraction", "test_fraction"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
                raise BamError(f"{name}: expected a number in [0, 1), got {value!r}")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise BamError(
                f"val_fraction + test_fraction: expected < 1 so train keeps documents, "
                f"got {self.val_fraction} + {self.test_fraction}"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise BamError(f"seed: expected an integer, got {self.seed!r}")

    def split_of(self, data: bytes) -> str:
        digest = hashlib.sha256(b"%d\0" % self.seed + data).digest()
        u = int.from_bytes(digest[:8], "little") / 2.0**64  # uniform in [0, 1)
        if u < self.test_fraction:
            return "test"
        if u < self.test_fraction + self.val_fraction:
            return "validation"
        return "train"


def document_split(text: str, val_fraction: float, test_fraction: float, seed: int = 0) -> str:
    """The split ("train", "validation" or "test") `prepare_domain` assigns to this document."""
    return _SplitSettings(val_fraction, test_fraction, seed).split_of(text.encode("utf-8"))


def empty_split_reason(domain: TokenizedDomain, split: str) -> str:
    """Why `split` of a prepared domain holds nothing: the corpus's size and what a split needs (one line)."""
    n_bytes = sum(stats.bytes for stats in domain.splits.values())
    n_documents = sum(stats.documents for stats in domain.splits.values())
    source = domain.meta.get("source", domain.name)
    size = f"{source} is {n_bytes:,} bytes in {n_documents:,} document{'' if n_documents == 1 else 's'}"
    val, test = domain.meta["val_fraction"], domain.meta["test_fraction"]
    fraction = {"train": 1.0 - val - test, "validation": val, "test": test}[split]
    if fraction <= 0:
        return f"{size}, and its {split} fraction is 0"
    # Each document lands in the split with probability `fraction`; with this many documents the
    # split stays empty less than 5% of the time.
    needed = math.ceil(math.log(0.05) / math.log(1.0 - fraction))
    text = ""
    if _is_text_file(Path(os.path.expanduser(source))):
        kb = needed * (TEXT_DOCUMENT_MIN + TEXT_DOCUMENT_MAX) // 2 // 1000
        text = f" (~{kb} KB of text: a text file is cut into one per 1-2 KB)"
    return f"{size}; holding out {fraction * 100:g}% needs ~{needed} documents{text}"


@dataclass(frozen=True)
class _Census:
    content_sha: str
    documents: int
    bytes: int


def _census(domain: Domain) -> _Census:
    content = hashlib.sha256()
    documents = n_bytes = 0
    for text in domain.documents():
        data = text.encode("utf-8")
        _hash_document(content, data)
        documents += 1
        n_bytes += len(data)
    if documents == 0:
        raise BamError(f"domain '{domain.name}': no documents in {domain.source} (nothing found, or all empty)")
    return _Census(content.hexdigest(), documents, n_bytes)


def _hash_document(content, data: bytes) -> None:
    # Length-prefixed so that document boundaries are part of the content: ["ab"] != ["a", "b"].
    content.update(len(data).to_bytes(8, "little"))
    content.update(data)


def _tokenize_splits(
    domain: Domain,
    tokenizer,
    out_dir: Path,
    dtype: np.dtype,
    eos_id: int,
    settings: _SplitSettings,
    census: _Census,
) -> dict[str, SplitStats]:
    encode = _make_encoder(tokenizer)
    content = hashlib.sha256()  # recomputed to catch sources that change between the two passes
    progress = tqdm(
        total=census.bytes,
        unit="B",
        unit_scale=True,
        desc=f"tokenizing {domain.name}",
        disable=census.bytes < PROGRESS_MIN_BYTES,
    )
    with ExitStack() as stack:
        stack.enter_context(progress)
        writers = {s: stack.enter_context(_SplitWriter(out_dir / f"{s}.bin", dtype)) for s in SPLITS}
        for batch in _batches(domain.documents()):
            pending: dict[str, list[int]] = {split: [] for split in SPLITS}
            for text, ids in zip(batch, encode(batch)):
                data = text.encode("utf-8")
                _hash_document(content, data)
                split = settings.split_of(data)
                pending[split].extend(ids)
                pending[split].append(eos_id)
                writers[split].count_document(len(data))
                progress.update(len(data))
            for split, ids in pending.items():
                writers[split].write(ids)
    if content.hexdigest() != census.content_sha:
        raise BamError(f"domain '{domain.name}': {domain.source} changed while it was being read; run again")
    return {split: writer.stats() for split, writer in writers.items()}


class _SplitWriter:
    """Appends token ids to one split's .bin file and counts what went in."""

    def __init__(self, path: Path, dtype: np.dtype):
        self.path = path
        self.dtype = dtype
        self.limit = np.iinfo(dtype).max
        self.file = path.open("wb")
        self.tokens = self.documents = self.bytes = 0

    def count_document(self, n_bytes: int) -> None:
        self.documents += 1
        self.bytes += n_bytes

    def write(self, ids: list[int]) -> None:
        if not ids:
            return
        array = np.asarray(ids, dtype=np.int64)
        if array.max() > self.limit:
            raise BamError(f"{self.path}: token id {int(array.max())} does not fit {self.dtype.name}")
        array.astype(self.dtype).tofile(self.file)
        self.tokens += array.size

    def __enter__(self) -> _SplitWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()

    def stats(self) -> SplitStats:
        return SplitStats(tokens=self.tokens, documents=self.documents, bytes=self.bytes)


def _batches(documents: Iterator[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    chars = 0
    for text in documents:
        batch.append(text)
        chars += len(text)
        if len(batch) >= BATCH_DOCS or chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _make_encoder(tokenizer) -> Callable[[list[str]], list[list[int]]]:
    """A batch encoder giving each text's token ids with no special tokens added or recognized.

    Our EOS after each document is the only document boundary: a literal "<|endoftext|>" inside a
    document (source code that handles tokenizers has them) is encoded as ordinary text, like
    nanoGPT's encode_ordinary. Documents longer than the model's context are expected here.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a Python ("slow") tokenizer
        def encode_slow(texts: list[str]) -> list[list[int]]:
            out = tokenizer(texts, add_special_tokens=False, split_special_tokens=True, return_attention_mask=False)
            return out["input_ids"]

        return encode_slow

    # A private copy of the Rust tokenizer, so the flag below does not change the caller's tokenizer.
    from tokenizers import Tokenizer

    ordinary = Tokenizer.from_str(backend.to_str())
    ordinary.encode_special_tokens = True
    ordinary.no_truncation()  # a truncation left set on the caller's tokenizer would cut documents
    ordinary.no_padding()
    encode = getattr(ordinary, "encode_batch_fast", ordinary.encode_batch)  # _fast: no offsets

    def encode_fast(texts: list[str]) -> list[list[int]]:
        return [encoding.ids for encoding in encode(texts, add_special_tokens=False)]

    return encode_fast


def _as_tokenizer(tokenizer):
    if isinstance(tokenizer, (str, Path)):
        from bam.data.tokenizer import load_tokenizer

        return load_tokenizer(tokenizer)
    return tokenizer


def _eos_id(tokenizer) -> int:
    eos_id = getattr(tokenizer, "eos_token_id", None)
    if eos_id is None:
        raise BamError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r}: no eos_token to separate documents")
    return int(eos_id)


def _tokenizer_sha256(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # The serialized tokenizer.json (model, merges, normalizer, pre-tokenizer, added tokens) minus
        # the call-time truncation/padding state, which does not affect how we encode.
        description = json.loads(backend.to_str())
        description.pop("truncation", None)
        description.pop("padding", None)
    else:
        description = json.dumps(sorted(tokenizer.get_vocab().items()))
    return _sha256_json({"class": type(tokenizer).__name__, "tokenizer": description, "eos": _eos_id(tokenizer)})


def _sha256_json(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------------------------------
# Training batches: a deterministic, resumable mixture


class MixtureSampler:
    """Training batches drawn from a weighted mixture of domains, as a pure function of (seed, step).

    `batch(step)` returns one LongTensor `tokens` of shape [rows, seq_len + 1]; the model input is
    `tokens[:, :-1]` and the target `tokens[:, 1:]`. Each row picks a domain with probability
    proportional to its weight, then a uniformly random window of that domain's train split (windows
    may cross document boundaries, which are marked by EOS).

    `batch_size` is the global batch. With data parallelism each rank asks for
    `batch(step, rank, world_size)` and gets rows rank::world_size of the same global batch, so K
    processes together see exactly what one process would.
    """

    def __init__(
        self,
        domains: Sequence[TokenizedDomain],
        weights: Sequence[float],
        seq_len: int,
        batch_size: int,
        seed: int,
    ):
        if not domains:
            raise BamError("mixture: expected at least one domain")
        if len(weights) != len(domains):
            raise BamError(f"mixture weights: expected {len(domains)} (one per domain), got {len(weights)}")
        probs = np.asarray(weights, dtype=np.float64)
        if not np.all(np.isfinite(probs)) or np.any(probs < 0) or probs.sum() <= 0:
            raise BamError(f"mixture weights: expected non-negative numbers with a positive sum, got {list(weights)}")
        _check_positive_int(seq_len, "seq_len")
        _check_positive_int(batch_size, "batch_size")
        _check_seed(seed, "seed")
        for domain, p in zip(domains, probs):
            n = domain.splits["train"].tokens
            if p > 0 and n < seq_len + 1:
                raise BamError(
                    f"domain '{domain.name}': train split has {n} tokens, fewer than seq_len + 1 = {seq_len + 1}"
                )

        self.domains = list(domains)
        self.probs = probs / probs.sum()
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        # Number of valid window starts per domain; 1 for an unused (zero-weight) tiny domain so that
        # the vectorized draw below stays well defined.
        self._n_starts = np.array(
            [max(d.splits["train"].tokens - seq_len, 1) for d in self.domains], dtype=np.int64
        )

    def batch(self, step: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        """Rows rank::world_size of the global batch of `step`: LongTensor [batch_size/world_size, seq_len+1]."""
        domain_ids, starts = self._draw(step)
        rows = self._rows(rank, world_size)
        out = np.empty((len(rows), self.seq_len + 1), dtype=np.int64)
        for j, i in enumerate(rows):
            tokens = self.domains[domain_ids[i]].tokens("train")
            out[j] = tokens[starts[i] : starts[i] + self.seq_len + 1]
        return torch.from_numpy(out)

    def row_domains(self, step: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
        """Index (into `domains`) of the domain each row of `batch(step, rank, world_size)` came from."""
        domain_ids, _ = self._draw(step)
        return domain_ids[self._rows(rank, world_size)]

    def _draw(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        # A fresh generator seeded by (seed, step): no state carries over from earlier steps, which is
        # what makes any step reproducible on its own.
        _check_seed(step, "step")
        rng = np.random.default_rng([self.seed, step])
        domain_ids = rng.choice(len(self.domains), size=self.batch_size, p=self.probs)
        starts = rng.integers(0, self._n_starts[domain_ids])
        return domain_ids, starts

    def _rows(self, rank: int, world_size: int) -> range:
        _check_positive_int(world_size, "world_size")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise BamError(f"rank: expected an integer in [0, {world_size}), got {rank!r}")
        if self.batch_size % world_size:
            raise BamError(f"batch_size: {self.batch_size} is not divisible by world_size {world_size}")
        return range(rank, self.batch_size, world_size)


def _check_positive_int(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BamError(f"{name}: expected a positive integer, got {value!r}")


def _check_seed(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise BamError(f"{name}: expected a non-negative integer, got {value!r}")


# ----------------------------------------------------------------------------------------------------
# Evaluation batches: every held-out token predicted exactly once


@dataclass
class EvalBatches:
    """Non-overlapping windows over one split, for perplexity and bits per byte.

    Iterating yields `(tokens, mask)`: tokens LongTensor [rows, seq_len + 1] (input `tokens[:, :-1]`,
    target `tokens[:, 1:]`) and mask BoolTensor [rows, seq_len] marking real targets. Window k predicts
    split tokens k*seq_len .. (k+1)*seq_len - 1; the first window's context starts with EOS, so the
    split's first token is predicted like every other document start. The last window is padded with
    EOS and masked. Sum the masked token losses (nats) and pass the total to `perplexity` and
    `bits_per_byte`.
    """

    domain: str
    split: str
    seq_len: int
    batch_size: int
    n_targets: int  # target tokens evaluated (the split, or its first max_tokens tokens)
    split_tokens: int
    split_bytes: int
    eos_id: int
    _tokens: np.ndarray = field(repr=False)

    @property
    def n_windows(self) -> int:
        return -(-self.n_targets // self.seq_len)

    @property
    def n_bytes(self) -> float:
        """Text bytes behind the evaluated targets: exact for a whole split, proportional for a prefix."""
        return self.split_bytes * self.n_targets / self.split_tokens

    def __len__(self) -> int:
        return -(-self.n_windows // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for first in range(0, self.n_windows, self.batch_size):
            windows = range(first, min(first + self.batch_size, self.n_windows))
            tokens = np.full((len(windows), self.seq_len + 1), self.eos_id, dtype=np.int64)
            mask = np.zeros((len(windows), self.seq_len), dtype=bool)
            for row, k in enumerate(windows):
                n = self._fill(tokens[row], k)
                mask[row, :n] = True
            yield torch.from_numpy(tokens), torch.from_numpy(mask)

    def _fill(self, row: np.ndarray, k: int) -> int:
        """Write window k into `row`; return its number of targets."""
        lo, hi = k * self.seq_len, min((k + 1) * self.seq_len, self.n_targets)  # targets lo..hi-1
        if k == 0:
            row[1 : hi + 1] = self._tokens[:hi]  # row[0] stays EOS: the context of the first token
        else:
            row[: hi - lo + 1] = self._tokens[lo - 1 : hi]
        return hi - lo

    def perplexity(self, total_nll: float) -> float:
        return math.exp(total_nll / self.n_targets)

    def bits_per_byte(self, total_nll: float) -> float:
        # EOS targets are in the loss but not in the bytes: the standard per-document accounting.
        return total_nll / (math.log(2) * self.n_bytes)


def iter_eval_batches(
    domain: TokenizedDomain,
    split: str,
    seq_len: int,
    batch_size: int,
    max_tokens: int | None = None,
) -> EvalBatches:
    """Deterministic evaluation windows over `split` ("validation" or "test"); see EvalBatches."""
    _check_positive_int(seq_len, "seq_len")
    _check_positive_int(batch_size, "batch_size")
    if max_tokens is not None:
        _check_positive_int(max_tokens, "max_tokens")
    tokens = domain.tokens(split)
    stats = domain.splits[split]
    if stats.tokens == 0:
        raise BamError(
            f"domain '{domain.name}': {split} split is empty: {empty_split_reason(domain, split)}; "
            "raise its fraction or add text"
        )
    n_targets = stats.tokens if max_tokens is None else min(max_tokens, stats.tokens)
    return EvalBatches(
        domain=domain.name,
        split=split,
        seq_len=seq_len,
        batch_size=batch_size,
        n_targets=n_targets,
        split_tokens=stats.tokens,
        split_bytes=stats.bytes,
        eos_id=domain.eos_id,
        _tokens=tokens,
    )
