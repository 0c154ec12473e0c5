"""Tokenized shards: a domain's documents split into train/validation/test, tokenized, cached on disk.

`prepare_domain` splits the documents into train/validation/test by hashing each document (so adding
documents never moves the others), tokenizes them, puts EOS after each, and writes one flat token array
per split (`<split>.bin`, read back with `numpy.memmap`) plus `meta.json`. The cache directory is named
by a sha256 of the content, tokenizer, fractions and seed, so a second call with the same inputs only
re-reads and re-hashes the text; it never re-tokenizes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from bam.data.sources import (
    TEXT_DOCUMENT_MAX,
    TEXT_DOCUMENT_MIN,
    Domain,
    DomainSpec,
    hash_document,
    is_text_file,
)
from bam.errors import BamError
from bam.io.atomic import atomic_output_dir

SPLITS = ("train", "validation", "test")
META_NAME = "meta.json"
# Bump when the shard layout or the split/tokenization rule changes: old cache entries stop matching.
# How a source is cut into documents needs no bump: the content hash covers document boundaries.
FORMAT_VERSION = 1

# Tokenization batches: large enough for the Rust tokenizer to use every core, small enough that a
# batch's token lists stay a few hundred MB at most.
BATCH_DOCS = 1024
BATCH_CHARS = 4_000_000
# Below this much text the progress bar is noise (tests, the demo's small domains).
PROGRESS_MIN_BYTES = 32_000_000


def default_cache_dir() -> Path:
    """Where tokenized shards are kept unless a command is given --cache-dir: $BAM_CACHE or
    ~/.cache/bam/tokens. Shards are keyed by their content, so every run can share one cache."""
    return Path(os.environ.get("BAM_CACHE") or Path.home() / ".cache" / "bam" / "tokens")


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
    if is_text_file(Path(os.path.expanduser(source))):
        kb = needed * (TEXT_DOCUMENT_MIN + TEXT_DOCUMENT_MAX) // 2 // 1000
        text = f" (~{kb} KB of text: a text file is cut into one per 1-2 KB)"
    return f"{size}; holding out {fraction * 100:g}% needs ~{needed} documents{text}"


@dataclass(frozen=True)
class _Census:
    content_sha: str
    documents: int
    bytes: int


def _census(domain: Domain) -> _Census:
    """Pass 1: the domain's content sha256 (as sources.documents_sha256 computes it), documents, bytes."""
    content = hashlib.sha256()
    documents = n_bytes = 0
    for text in domain.documents():
        data = text.encode("utf-8")
        hash_document(content, data)
        documents += 1
        n_bytes += len(data)
    if documents == 0:
        raise BamError(f"domain '{domain.name}': no documents in {domain.source} (nothing found, or all empty)")
    return _Census(content.hexdigest(), documents, n_bytes)


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
                hash_document(content, data)
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
