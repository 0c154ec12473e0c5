"""Data pipeline on real text from this machine: sources, cached shards, mixture sampling, eval windows."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

import bam.data.shards as data
import bam.data.sources as sources
from bam.data.batches import MixtureSampler, iter_eval_batches
from bam.data.shards import TokenizedDomain, prepare_domain
from bam.data.sources import Domain, DomainSpec, parse_domain_spec
from bam.errors import BamError
from bam.data.tokenizer import load_tokenizer, train_tokenizer

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def stdlib_docs(*patterns: str, max_file_bytes: int = 12_000) -> list[str]:
    """The standard library's small .py files matching `patterns`, in a fixed (sorted) order."""
    docs = []
    for pattern in patterns:
        for path in sorted(STDLIB.glob(pattern)):
            if path.stat().st_size <= max_file_bytes:
                text = path.read_text(encoding="utf-8")
                if text.strip():
                    docs.append(text)
    return docs


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_tokenizer(stdlib_docs("*.py", max_file_bytes=20_000)[:60], vocab_size=512, out_dir=out)
    return load_tokenizer(out)


@pytest.fixture(scope="module")
def code_docs():
    return stdlib_docs("*.py")  # ~70 documents, ~450 KB


@pytest.fixture(scope="module")
def other_docs():
    return stdlib_docs("asyncio/*.py", "email/*.py")  # ~30 documents, ~150 KB


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def code(code_docs, tokenizer, cache):
    return prepare_domain(Domain.from_documents("code", code_docs), tokenizer, cache, val_fraction=0.15, test_fraction=0.1)


@pytest.fixture(scope="module")
def other(other_docs, tokenizer, cache):
    return prepare_domain(Domain.from_documents("other", other_docs), tokenizer, cache, val_fraction=0.15)


@pytest.fixture(scope="module")
def input_txt(tmp_path_factory):
    """A newcomer's corpus: one plain text file of ~300 KB (the pydoc help topics, paragraphs and all)."""
    import pydoc_data.topics as topics

    text = "\n\n".join(topics.topics[key] for key in sorted(topics.topics))[:300_000]
    path = tmp_path_factory.mktemp("newcomer") / "input.txt"
    path.write_bytes(text.encode("utf-8"))
    return path


def encode(tokenizer, text: str) -> tuple[int, ...]:
    return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])


def documents_of(domain: TokenizedDomain, split: str) -> list[tuple[int, ...]]:
    """Cut a split's flat array at EOS back into per-document token tuples."""
    tokens = np.asarray(domain.tokens(split)).tolist()
    docs, current = [], []
    for t in tokens:
        if t == domain.eos_id:
            docs.append(tuple(current))
            current = []
        else:
            current.append(t)
    assert current == []  # every document ends with EOS
    return docs


# ----------------------------------------------------------------------------------------------------
# Domain specs


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("code=data/code", DomainSpec("code", "data/code", 1.0, None)),
        ("code=data/code.txt:0.25", DomainSpec("code", "data/code.txt", 0.25, None)),
        ("web=data/*.jsonl#content:2", DomainSpec("web", "data/*.jsonl", 2.0, "content")),
        ("wiki=hf:org/wiki:train", DomainSpec("wiki", "hf:org/wiki:train", 1.0, None)),
        ("wiki=hf:org/wiki:validation:3", DomainSpec("wiki", "hf:org/wiki:validation", 3.0, None)),
        ("m.ath_1=/abs/x.parquet#body", DomainSpec("m.ath_1", "/abs/x.parquet", 1.0, "body")),
    ],
)
def test_parse_domain_spec(spec, expected):
    assert parse_domain_spec(spec) == expected


@pytest.mark.parametrize(
    "spec, message",
    [
        ("data/code", "expected NAME=PATH"),
        ("code=", "expected NAME=PATH"),
        ("=data", "domain name"),
        ("my code=data", "domain name"),
        ("code=data:0", "weight must be a positive number"),
        ("code=data:-1", "weight must be a positive number"),
        ("code=data:nan", "weight must be a positive number"),
    ],
)
def test_parse_domain_spec_errors(spec, message):
    with pytest.raises(BamError, match=message):
        parse_domain_spec(spec)


# ----------------------------------------------------------------------------------------------------
# Sources


def test_directory_reads_text_files_recursively(tmp_path):
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / ".git").mkdir()
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "README").write_text("no suffix")
    (tmp_path / "sub" / "b.md").write_text("beta")
    (tmp_path / "sub" / "deeper" / "c.py").write_text("gamma = 1")
    (tmp_path / "sub" / "d.rst").write_text("\ufeffdelta")  # the byte-order mark is dropped
    (tmp_path / "sub" / "skip.bin").write_bytes(b"\xff\xfe")  # not a text suffix: ignored
    (tmp_path / ".git" / "HEAD").write_text("hidden")
    (tmp_path / "empty.txt").write_text("  \n")  # whitespace only: not a document
    docs = list(Domain.from_spec(f"d={tmp_path}").documents())
    assert docs == ["no suffix", "alpha", "beta", "delta", "gamma = 1"]


def test_glob_and_single_file(tmp_path):
    for i in range(3):
        (tmp_path / f"part{i}.txt").write_text(f"document {i}")
    (tmp_path / "notes.md").write_text("not matched")
    assert list(Domain.from_spec(f"d={tmp_path}/part*.txt").documents()) == [f"document {i}" for i in range(3)]
    assert list(Domain.from_spec(f"d={tmp_path / 'notes.md'}:0.5").documents()) == ["not matched"]


def test_text_file_is_cut_into_documents_that_add_up_to_it(tmp_path, input_txt):
    path = tmp_path / "x.txt"

    def documents(text: str) -> list[str]:
        path.write_bytes(text.encode("utf-8"))
        docs = list(Domain.from_spec(f"d={path}").documents())
        assert "".join(docs) == text.removeprefix("\ufeff")  # every byte kept, in order (the BOM dropped)
        return docs

    # Paragraphs stay whole: a document ends at the first blank line once it holds 1,000 characters.
    prose = input_txt.read_text(encoding="utf-8")
    docs = documents(prose)
    assert 150 <= len(docs) <= 300
    for doc in docs[:-1]:
        assert sources.TEXT_DOCUMENT_MIN <= len(doc) < 2 * sources.TEXT_DOCUMENT_MAX
        assert doc.endswith("\n\n") or len(doc) >= sources.TEXT_DOCUMENT_MAX
    # No blank lines: cut at a line end once 2,000 characters are in (CRLF endings kept as they are).
    lines = "".join(f"sentence {i} of a file with one sentence per line.\r\n" for i in range(2000))
    docs = documents("\ufeff" + lines)
    assert all(doc.endswith("\r\n") and 2000 <= len(doc) < 2100 for doc in docs[:-1]) and len(docs) > 40
    # No line ends at all: cut every 2,000 characters.
    assert [len(doc) for doc in documents("word " * 1000)] == [2000, 2000, 1000]
    # A small file is one document, as it always was.
    assert documents("just one short paragraph\n\nand another\n") == ["just one short paragraph\n\nand another\n"]


def test_directory_and_glob_keep_one_document_per_file(tmp_path, input_txt):
    (tmp_path / "dir").mkdir()
    shutil.copy(input_txt, tmp_path / "dir" / "input.txt")
    text = input_txt.read_text(encoding="utf-8")
    assert list(Domain.from_spec(f"d={tmp_path / 'dir'}").documents()) == [text]
    assert list(Domain.from_spec(f"d={tmp_path / 'dir'}/*.txt").documents()) == [text]


def test_content_hashes_of_other_sources_are_unchanged(tmp_path):
    # Pinned: these hashes name existing cache entries, which must keep matching. A text file named
    # alone that is small enough for one document keeps its hash too.
    long = "".join(f"line {i} of a long file\n" + ("\n" if i % 7 == 0 else "") for i in range(400))
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "a.txt").write_text(long)
    (tmp_path / "dir" / "b.md").write_text("beta\n\nparagraph two\n")
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in [long, "second record"]) + "\n")
    expected = {
        "dir": "e97f6b44b12f126d173c092838d1de933f3a077693c7f8d6ea763cd1e8151e58",
        "dir/*.txt": "0e9c75d1b903ce0c1f25ebceeb82446809b3d8f60c15b20c35b6850476f596b4",
        "docs.jsonl": "b1356864aa80211ab3cdc647a0813d96fc407392572347e2ad6f81690da1d076",
        "dir/b.md": "0eaf17196e9f746954430f259817cf406bc18cbd928e3a4f6942057a3406ec40",
    }
    for source, sha in expected.items():
        assert data._census(Domain.from_spec(f"d={tmp_path}/{source}")).content_sha == sha, source
    # The same text named alone is cut into documents: a new content hash, so a new cache entry.
    census = data._census(Domain.from_spec(f"d={tmp_path}/dir/a.txt"))
    assert census.documents > 1 and census.content_sha != expected["dir/*.txt"]


def test_jsonl_default_and_selected_field(tmp_path):
    path = tmp_path / "docs.jsonl"
    rows = [{"text": "first", "body": "uno"}, {"text": "sécond ☃", "body": "dos"}, {"text": None, "body": "tres"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert list(Domain.from_spec(f"d={path}").documents()) == ["first", "sécond ☃"]
    assert list(Domain.from_spec(f"d={path}#body").documents()) == ["uno", "dos", "tres"]


def test_jsonl_missing_field_names_file_line_and_field(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "ok"}\n\n{"content": "no text field"}\n')
    with pytest.raises(BamError) as err:
        list(Domain.from_spec(f"d={path}").documents())
    assert f"{path}:3" in str(err.value) and "'text'" in str(err.value)

    path.write_text('{"text": "ok"}\n{"text": 5}\n')
    with pytest.raises(BamError, match=r":2: field 'text' is int"):
        list(Domain.from_spec(f"d={path}").documents())
    path.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(BamError, match=r":2: invalid JSON"):
        list(Domain.from_spec(f"d={path}").documents())


def test_non_utf8_file_is_named(tmp_path, tokenizer):
    (tmp_path / "good.txt").write_text("fine text")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café crème".encode("latin-1"))
    with pytest.raises(BamError, match=f"{bad}: not UTF-8"):
        prepare_domain(f"d={tmp_path}", tokenizer, tmp_path / "cache")
    with pytest.raises(BamError, match=f"{bad}: not UTF-8 text \\(invalid byte at offset 3\\)"):
        prepare_domain(f"d={bad}", tokenizer, tmp_path / "cache")  # a text file named alone, read line by line
    assert not (tmp_path / "cache").exists() or list((tmp_path / "cache").iterdir()) == []


def test_empty_input_names_domain_and_path(tmp_path, tokenizer):
    (tmp_path / "blank.txt").write_text("\n\n   \n")
    with pytest.raises(BamError) as err:
        prepare_domain(f"blanks={tmp_path}", tokenizer, tmp_path / "cache")
    assert "'blanks'" in str(err.value) and str(tmp_path) in str(err.value)
    with pytest.raises(BamError, match="'none': no documents"):
        prepare_domain(Domain.from_documents("none", []), tokenizer, tmp_path / "cache")


def test_missing_path_and_empty_glob(tmp_path):
    with pytest.raises(BamError, match=f"'d': {tmp_path}/nope does not exist"):
        Domain.from_spec(f"d={tmp_path}/nope")
    with pytest.raises(BamError, match="matches no files"):
        Domain.from_spec(f"d={tmp_path}/*.jsonl")


def test_field_on_plain_text_is_rejected(tmp_path):
    (tmp_path / "a.txt").write_text("text")
    with pytest.raises(BamError, match="#body selects a field"):
        Domain.from_spec(f"d={tmp_path / 'a.txt'}#body")


def test_optional_dependencies_missing(tmp_path, monkeypatch):
    # sys.modules[name] = None makes `import name` raise ImportError, as if it were not installed.
    for name in ("pyarrow", "pyarrow.parquet", "datasets"):
        monkeypatch.setitem(sys.modules, name, None)
    parquet = tmp_path / "x.parquet"
    parquet.write_bytes(b"PAR1")
    with pytest.raises(BamError, match=r"x.parquet: reading it needs pyarrow; pip install bam\[data\]"):
        list(Domain.from_spec(f"d={parquet}").documents())
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "dataset_dict.json").write_text('{"splits": ["train"]}')
    with pytest.raises(BamError, match=r"needs datasets; pip install bam\[data\]"):
        list(Domain.from_spec(f"d={saved}").documents())
    with pytest.raises(BamError, match=r"hf:org/set: reading it needs datasets"):
        list(Domain.from_spec("d=hf:org/set:train").documents())


def test_parquet_source(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": ["one", None, "three"], "body": ["a", "b", "c"]}), path)
    assert list(Domain.from_spec(f"d={path}").documents()) == ["one", "three"]
    assert list(Domain.from_spec(f"d={path}#body").documents()) == ["a", "b", "c"]
    with pytest.raises(BamError, match=r"no column 'nope' \(columns: text, body"):
        list(Domain.from_spec(f"d={path}#nope").documents())


def test_saved_dataset_source(tmp_path):
    import datasets
    splits = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": ["t1", "t2"]}),
            "validation": datasets.Dataset.from_dict({"text": ["v1"]}),
        }
    )
    splits.save_to_disk(str(tmp_path / "dict"))
    splits["validation"].save_to_disk(str(tmp_path / "single"))
    assert list(Domain.from_spec(f"d={tmp_path / 'dict'}").documents()) == ["t1", "t2"]
    assert list(Domain.from_spec(f"d={tmp_path / 'dict' / 'validation'}").documents()) == ["v1"]
    assert list(Domain.from_spec(f"d={tmp_path / 'single'}").documents()) == ["v1"]
    with pytest.raises(BamError, match="no column 'body'"):
        list(Domain.from_spec(f"d={tmp_path / 'single'}#body").documents())


# ----------------------------------------------------------------------------------------------------
# Tokenized shards


def test_shards_hold_every_document_once_followed_by_eos(code, code_docs, tokenizer):
    assert code.dtype == np.uint16 and code.eos_id == tokenizer.eos_token_id
    expected = sorted(encode(tokenizer, d) for d in code_docs)
    got = {split: documents_of(code, split) for split in data.SPLITS}
    assert sorted(got["train"] + got["validation"] + got["test"]) == expected
    for split in data.SPLITS:
        stats = code.splits[split]
        assert stats.documents == len(got[split])
        assert stats.tokens == len(code.tokens(split)) == sum(len(d) + 1 for d in got[split])
    assert sum(s.bytes for s in code.splits.values()) == sum(len(d.encode("utf-8")) for d in code_docs)
    meta = json.loads((code.path / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["splits"]["train"]["documents"] == code.splits["train"].documents


def test_splits_are_disjoint_by_document(code):
    train = set(documents_of(code, "train"))
    validation = set(documents_of(code, "validation"))
    test = set(documents_of(code, "test"))
    assert validation and test and len(train) > len(validation)  # fractions 0.15 / 0.1 of ~70 documents
    assert not train & validation and not train & test and not validation & test


def test_adding_documents_keeps_existing_assignments(code, code_docs, tokenizer, cache):
    more = prepare_domain(
        Domain.from_documents("code", code_docs + stdlib_docs("importlib/*.py", "json/*.py")),
        tokenizer,
        cache,
        val_fraction=0.15,
        test_fraction=0.1,
    )
    assert more.path != code.path
    for split in data.SPLITS:
        assert set(documents_of(code, split)) <= set(documents_of(more, split))


def test_text_file_holds_out_validation_and_test(input_txt, tokenizer, tmp_path):
    domain = prepare_domain(f"prose={input_txt}", tokenizer, tmp_path, val_fraction=0.1, test_fraction=0.1)
    n_bytes = input_txt.stat().st_size
    n_documents = sum(stats.documents for stats in domain.splits.values())
    assert sum(stats.bytes for stats in domain.splits.values()) == n_bytes
    for split, fraction in (("train", 0.8), ("validation", 0.1), ("test", 0.1)):
        stats = domain.splits[split]
        assert abs(stats.bytes / n_bytes - fraction) < 0.05, (split, stats)
        assert abs(stats.documents / n_documents - fraction) < 0.05, (split, stats)
    held_out = set(documents_of(domain, "validation")) | set(documents_of(domain, "test"))
    assert held_out and not held_out & set(documents_of(domain, "train"))


def test_text_file_split_is_the_same_every_time(input_txt, tokenizer, tmp_path):
    first = prepare_domain(f"prose={input_txt}", tokenizer, tmp_path / "a", val_fraction=0.1, test_fraction=0.1)
    # The same text under another name, with another mtime, into another cache: the same split.
    copy = tmp_path / "elsewhere" / "corpus.txt"
    copy.parent.mkdir()
    shutil.copyfile(input_txt, copy)
    os.utime(copy, (1_000_000_000, 1_000_000_000))
    second = prepare_domain(f"prose={copy}", tokenizer, tmp_path / "b", val_fraction=0.1, test_fraction=0.1)
    assert second.meta["key"] == first.meta["key"] and second.splits == first.splits
    for split in data.SPLITS:
        np.testing.assert_array_equal(second.tokens(split), first.tokens(split))
    # Another process, with another string-hash seed: the same cache key and the same tokens.
    script = (
        "import hashlib, json, sys; import numpy as np; from bam.data.shards import prepare_domain; "
        "d = prepare_domain(sys.argv[1], sys.argv[2], sys.argv[3], val_fraction=0.1, test_fraction=0.1); "
        "print(json.dumps([d.meta['key']] + [hashlib.sha256(np.asarray(d.tokens(s)).tobytes()).hexdigest() "
        "for s in ('train', 'validation', 'test')]))"
    )
    tokenizer_dir = tmp_path / "tok"
    tokenizer.save_pretrained(tokenizer_dir)
    run = subprocess.run([sys.executable, "-c", script, f"prose={copy}", str(tokenizer_dir), str(tmp_path / "c")],
                         capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "12345"})
    assert run.returncode == 0, run.stderr
    expected = [first.meta["key"]] + [hashlib.sha256(np.asarray(first.tokens(s)).tobytes()).hexdigest()
                                      for s in data.SPLITS]
    assert json.loads(run.stdout) == expected


def tiny_train_document() -> str:
    """One short document whose hash puts it in train at fractions 0.05/0.1: the held-out splits stay empty."""
    texts = (f"Too little text, take {i}.\n" for i in range(100))
    return next(text for text in texts if data.document_split(text, 0.05, 0.1) == "train")


def test_too_small_text_file_names_its_size_and_what_it_needs(tokenizer, tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text(tiny_train_document())
    domain = prepare_domain(f"tiny={path}", tokenizer, tmp_path / "cache", val_fraction=0.05, test_fraction=0.1)
    size = f"{path} is {path.stat().st_size} bytes in 1 document"
    needs = {"validation": "5% needs ~59 documents (~88 KB", "test": "10% needs ~29 documents (~43 KB"}
    for split, needed in needs.items():
        with pytest.raises(BamError) as err:
            iter_eval_batches(domain, split, seq_len=16, batch_size=2)
        assert str(err.value) == (f"domain 'tiny': {split} split is empty: {size}; holding out {needed} of text: "
                                  "a text file is cut into one per 1-2 KB); raise its fraction or add text")


def test_literal_special_token_in_text_is_not_a_boundary(tokenizer, tmp_path):
    doc = 'EOS = "<|endoftext|>"  # marks the end of a document\n'
    domain = prepare_domain(Domain.from_documents("lit", [doc]), tokenizer, tmp_path, val_fraction=0.0)
    tokens = np.asarray(domain.tokens("train"))
    assert (tokens == domain.eos_id).sum() == 1 and tokens[-1] == domain.eos_id
    assert tokenizer.decode(tokens[:-1].tolist()) == doc


def test_cache_hit_does_not_retokenize(code_docs, tokenizer, tmp_path, monkeypatch):
    calls = []
    make_encoder = data._make_encoder

    def counting(tok):
        encode_batch = make_encoder(tok)

        def counted(texts):
            calls.append(len(texts))
            return encode_batch(texts)

        return counted

    monkeypatch.setattr(data, "_make_encoder", counting)
    first = prepare_domain(Domain.from_documents("code", code_docs), tokenizer, tmp_path)
    assert calls
    mtimes = {p.name: p.stat().st_mtime_ns for p in first.path.iterdir()}
    calls.clear()

    second = prepare_domain(Domain.from_documents("code", code_docs), tokenizer, tmp_path)
    assert calls == []
    assert second.path == first.path
    assert {p.name: p.stat().st_mtime_ns for p in second.path.iterdir()} == mtimes
    assert [p.name for p in tmp_path.iterdir()] == [first.path.name]  # no temporary directories left

    # Any input that changes the tokens or the split makes a new entry.
    prepare_domain(Domain.from_documents("code", code_docs), tokenizer, tmp_path, seed=1)
    prepare_domain(Domain.from_documents("code", code_docs[1:]), tokenizer, tmp_path)
    prepare_domain(Domain.from_documents("code", code_docs), tokenizer, tmp_path, val_fraction=0.2)
    assert len(list(tmp_path.iterdir())) == 4


def test_interrupted_tokenization_leaves_no_entry(code_docs, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "BATCH_DOCS", 4)
    make_encoder = data._make_encoder

    def interrupted(tok):
        encode_batch = make_encoder(tok)
        batches = []

        def encode(texts):
            batches.append(texts)
            if len(batches) == 3:  # some shards are partly written by now
                raise KeyboardInterrupt
            return encode_batch(texts)

        return encode

    monkeypatch.setattr(data, "_make_encoder", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_domain(Domain.from_documents("code", code_docs), tokenizer, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_corrupt_cache_entry_is_reported(code_docs, tokenizer, tmp_path):
    domain = prepare_domain(Domain.from_documents("code", code_docs), tokenizer, tmp_path)
    with open(domain.path / "train.bin", "r+b") as fh:
        fh.truncate(10)
    with pytest.raises(BamError, match="train.bin: 10 bytes, meta.json says"):
        prepare_domain(Domain.from_documents("code", code_docs), tokenizer, tmp_path)


def test_prepare_from_spec_string_and_tokenizer_path(tmp_path, tokenizer):
    (tmp_path / "src").mkdir()
    for path in sorted(STDLIB.glob("[a-c]*.py"))[:5]:
        (tmp_path / "src" / path.name).write_text(path.read_text(encoding="utf-8"))
    tokenizer.save_pretrained(tmp_path / "tok")
    domain = prepare_domain(f"src={tmp_path / 'src'}:0.5", tmp_path / "tok", tmp_path / "cache", val_fraction=0.0)
    assert domain.name == "src" and domain.splits["train"].documents == 5
    assert TokenizedDomain.load(domain.path).splits == domain.splits
    # The same tokenizer, loaded again and with a truncation left switched on, is the same cache key.
    reloaded = load_tokenizer(tmp_path / "tok")
    reloaded.backend_tokenizer.enable_truncation(max_length=8)
    again = prepare_domain(f"src={tmp_path / 'src'}", reloaded, tmp_path / "cache", val_fraction=0.0)
    assert again.path == domain.path
    assert len(list((tmp_path / "cache").iterdir())) == 1


def test_truncation_on_the_callers_tokenizer_does_not_cut_documents(tokenizer, tmp_path):
    doc = stdlib_docs("*.py")[0]
    truncating = load_tokenizer(tokenizer.name_or_path)
    truncating.backend_tokenizer.enable_truncation(max_length=8)
    domain = prepare_domain(Domain.from_documents("long", [doc]), truncating, tmp_path, val_fraction=0.0)
    assert domain.splits["train"].tokens == len(encode(tokenizer, doc)) + 1 > 9


def test_atomic_cache_entry(tmp_path):
    from bam.io.atomic import atomic_output_dir

    final = tmp_path / "entry"
    with atomic_output_dir(final, keep_existing=True) as tmp:
        (tmp / "a").write_text("first")
    with atomic_output_dir(final, keep_existing=True) as tmp:  # an identical entry already won the race
        (tmp / "a").write_text("second")
    assert (final / "a").read_text() == "first"
    with atomic_output_dir(final, overwrite=True) as tmp:
        (tmp / "b").write_text("replacement")
    assert [p.name for p in final.iterdir()] == ["b"]
    with pytest.raises(RuntimeError):
        with atomic_output_dir(final, overwrite=True) as tmp:
            (tmp / "c").write_text("half written")
            raise RuntimeError("interrupted")
    assert [p.name for p in tmp_path.iterdir()] == ["entry"] and [p.name for p in final.iterdir()] == ["b"]


# ----------------------------------------------------------------------------------------------------
# Mixture sampling


def test_batches_are_deterministic_and_seeded(code, other):
    a = MixtureSampler([code, other], [1, 1], seq_len=32, batch_size=8, seed=0)
    b = MixtureSampler([code, other], [1, 1], seq_len=32, batch_size=8, seed=0)
    c = MixtureSampler([code, other], [1, 1], seq_len=32, batch_size=8, seed=1)
    x = a.batch(7)
    assert x.shape == (8, 33) and x.dtype == torch.long
    assert torch.equal(x, b.batch(7))
    assert not torch.equal(x, c.batch(7))
    assert not torch.equal(x, a.batch(8))


def test_batch_depends_only_on_step(code, other):
    fresh = MixtureSampler([code, other], [0.5, 0.5], seq_len=16, batch_size=4, seed=3)
    used = MixtureSampler([code, other], [0.5, 0.5], seq_len=16, batch_size=4, seed=3)
    for step in range(10):
        used.batch(step)
    assert torch.equal(fresh.batch(10), used.batch(10))  # as a resumed run would ask for it
    assert torch.equal(used.batch(3), fresh.batch(3))


def test_ranks_reassemble_the_global_batch(code, other):
    sampler = MixtureSampler([code, other], [2, 1], seq_len=16, batch_size=12, seed=5)
    whole = sampler.batch(4)
    for world in (2, 3, 4):
        parts = [sampler.batch(4, rank=r, world_size=world) for r in range(world)]
        rebuilt = torch.empty_like(whole)
        for r, part in enumerate(parts):
            assert part.shape == (12 // world, 17)
            rebuilt[r::world] = part
        assert torch.equal(rebuilt, whole)
    with pytest.raises(BamError, match="not divisible by world_size 5"):
        sampler.batch(0, rank=0, world_size=5)
    with pytest.raises(BamError, match="rank"):
        sampler.batch(0, rank=2, world_size=2)


def test_mixture_weights_are_respected(code, other):
    sampler = MixtureSampler([code, other], [0.8, 0.2], seq_len=16, batch_size=1000, seed=0)
    domains = sampler.row_domains(0)
    assert abs((domains == 0).mean() - 0.8) < 0.04
    # Each row really is a window of the train split of the domain it was drawn from.
    rows = sampler.batch(0).numpy()
    windows = [np.lib.stride_tricks.sliding_window_view(np.asarray(d.tokens("train")), 17) for d in (code, other)]
    for i in range(0, 1000, 25):
        assert (windows[domains[i]] == rows[i]).all(axis=1).any()
        assert not (windows[1 - domains[i]] == rows[i]).all(axis=1).any()


def test_zero_weight_domain_is_never_drawn(code, other):
    sampler = MixtureSampler([code, other], [1, 0], seq_len=16, batch_size=64, seed=0)
    assert (sampler.row_domains(2) == 0).all()


def test_too_short_domain_is_named(code, tokenizer, tmp_path):
    tiny = prepare_domain(Domain.from_documents("tiny", ["x = 1\n"]), tokenizer, tmp_path, val_fraction=0.0)
    with pytest.raises(BamError, match=r"domain 'tiny': train split has \d+ tokens, fewer than seq_len \+ 1 = 65"):
        MixtureSampler([code, tiny], [1, 1], seq_len=64, batch_size=2, seed=0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(weights=[1]), "one per domain"),
        (dict(weights=[1, -1]), "non-negative"),
        (dict(weights=[0, 0]), "positive sum"),
        (dict(seq_len=0), "seq_len"),
        (dict(batch_size=0), "batch_size"),
        (dict(seed=-1), "seed"),
    ],
)
def test_sampler_arguments_are_validated(code, other, kwargs, message):
    args = dict(weights=[1, 1], seq_len=8, batch_size=2, seed=0) | kwargs
    with pytest.raises(BamError, match=message):
        MixtureSampler([code, other], **args)


# ----------------------------------------------------------------------------------------------------
# Evaluation windows


@pytest.mark.parametrize("split, seq_len, batch_size", [("validation", 64, 5), ("test", 100, 3), ("validation", 7, 64)])
def test_eval_windows_predict_every_token_once(code, split, seq_len, batch_size):
    evals = iter_eval_batches(code, split, seq_len=seq_len, batch_size=batch_size)
    tokens = np.asarray(code.tokens(split))
    assert evals.n_targets == len(tokens)
    assert evals.n_bytes == code.splits[split].bytes

    inputs, targets, n_batches = [], [], 0
    for x, mask in evals:
        n_batches += 1
        assert x.shape[1] == seq_len + 1 and mask.shape == (x.shape[0], seq_len)
        assert x.shape[0] <= batch_size
        inputs.append(x[:, :-1][mask])
        targets.append(x[:, 1:][mask])
    assert n_batches == len(evals)
    targets = torch.cat(targets).numpy()
    inputs = torch.cat(inputs).numpy()
    np.testing.assert_array_equal(targets, tokens)  # each token predicted exactly once, in order
    np.testing.assert_array_equal(inputs[1:], tokens[:-1])  # from its true predecessor
    assert inputs[0] == code.eos_id  # the first token's context is a document boundary


def test_eval_prefix_and_metrics(code):
    evals = iter_eval_batches(code, "validation", seq_len=32, batch_size=4, max_tokens=100)
    assert evals.n_targets == 100 and len(evals) == 1
    masks = [mask for _, mask in evals]
    assert sum(int(m.sum()) for m in masks) == 100
    assert masks[-1][-1].tolist() == [True] * 4 + [False] * 28
    expected_bytes = code.splits["validation"].bytes * 100 / code.splits["validation"].tokens
    assert evals.n_bytes == pytest.approx(expected_bytes)
    nll = 100 * np.log(2.0)  # one bit per token
    assert evals.perplexity(nll) == pytest.approx(2.0)
    assert evals.bits_per_byte(nll) == pytest.approx(100 / expected_bytes)


def test_eval_on_empty_split_is_an_error(other):
    assert other.splits["test"].tokens == 0
    with pytest.raises(BamError, match="'other': test split is empty: .* documents, and its test fraction is 0"):
        iter_eval_batches(other, "test", seq_len=16, batch_size=2)
    with pytest.raises(BamError, match="unknown split 'dev'"):
        iter_eval_batches(other, "dev", seq_len=16, batch_size=2)


# ----------------------------------------------------------------------------------------------------
# `bam train SEED --data prose=input.txt`: one text file is enough


def test_bam_train_on_one_text_file_validates(input_txt, tmp_path, capsys):
    from _train_assets import build_assets, read_metrics

    from bam.cli import main

    assets = build_assets()
    out = tmp_path / "run"
    argv = ["train", str(assets.seed), "--data", f"prose={input_txt}", "--out", str(out), "--cache-dir",
            str(tmp_path / "cache"), "--max-steps", "4", "--batch-size", "4", "--seq-len", "32", "--warmup", "1",
            "--eval-every", "2", "--eval-tokens", "512", "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err
    validated = [r for r in read_metrics(out) if "val" in r]
    assert [r["step"] for r in validated] == [0, 2, 4]
    assert all(np.isfinite(r["val"]["prose"]["loss"]) for r in validated)


def test_bam_train_on_a_too_small_text_file_says_how_small(tmp_path, capsys):
    from _train_assets import build_assets

    from bam.cli import main

    assets = build_assets()
    path = tmp_path / "tiny.txt"
    text = tiny_train_document()  # in train, so validation is what comes out empty
    path.write_text(text)
    argv = ["train", str(assets.seed), "--data", f"tiny={path}", "--out", str(tmp_path / "run"), "--cache-dir",
            str(tmp_path / "cache"), "--max-steps", "2", "--seq-len", "8", "--no-progress"]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"bam train: error: domain 'tiny': validation split is empty: {path} is {len(text)} bytes "
                          "in 1 document; holding out 5% needs ~59 documents (~88 KB of text"), err
    assert err.rstrip().endswith("add text, raise val_fraction, or set eval_every to 0"), err
    assert not (tmp_path / "run" / "model").exists()


def test_a_domain_named_twice_is_refused_before_any_is_read(tmp_path):
    from bam.data.sources import check_unique_names, parse_domain_spec

    specs = [parse_domain_spec(f"a={tmp_path / 'missing-1.txt'}"), parse_domain_spec(f"b={tmp_path / 'x.txt'}"),
             parse_domain_spec(f"a={tmp_path / 'missing-2.txt'}")]
    check_unique_names(s.name for s in specs[:2])
    with pytest.raises(BamError, match=r"^--data: domain 'a' is given twice$"):
        check_unique_names(s.name for s in specs)
