"""Tokenizer training on real text from this machine: Hugging Face round trip, sizes, errors, atomicity."""

import json
import sysconfig
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from bam.errors import BamError
from bam.data.tokenizer import ENDOFTEXT, MIN_VOCAB_SIZE, load_tokenizer, train_tokenizer

# Covers 2- to 4-byte UTF-8, spacing that "clean up tokenization spaces" would rewrite, tabs, newlines.
UNICODE_SAMPLE = "naïve café, Grüße — 日本語のテキスト 🦀🐍 x  =  1 .\n\tdon't , stop ; ∑(α²)\r\n"


def stdlib_texts(max_bytes: int) -> list[str]:
    """The standard library's own .py files, in a fixed order, up to about max_bytes of text."""
    texts, total = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text = path.read_text(encoding="utf-8")
        texts.append(text)
        total += len(text.encode("utf-8"))
        if total >= max_bytes:
            break
    return texts


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_tokenizer(stdlib_texts(400_000), vocab_size=1000, out_dir=out)
    return out


def test_trained_tokenizer_loads_with_autotokenizer(trained):
    assert sorted(p.name for p in trained.iterdir()) == [
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    tok = AutoTokenizer.from_pretrained(trained, local_files_only=True)
    assert len(tok) == 1000  # enough text for every merge: exactly the requested size
    assert tok.eos_token == tok.bos_token == tok.pad_token == ENDOFTEXT
    assert tok.eos_token_id == tok.convert_tokens_to_ids(ENDOFTEXT)
    config = json.loads((trained / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_roundtrip_is_exact_and_adds_no_special_tokens(trained):
    tok = load_tokenizer(trained)
    ids = tok(UNICODE_SAMPLE)["input_ids"]
    assert tok.decode(ids) == UNICODE_SAMPLE
    assert ids == tok(UNICODE_SAMPLE, add_special_tokens=False)["input_ids"]
    assert tok.eos_token_id not in ids
    # Merges learned from Python source compress it well below one token per byte.
    code = "def __init__(self, name):\n        self.name = name\n        return None\n"
    assert len(tok(code)["input_ids"]) < len(code.encode("utf-8")) / 2


def test_tiny_text_gives_smaller_vocab_than_asked(tmp_path):
    # Too little text to find 5000 - 257 pairs seen twice: training stops early, vocab is smaller.
    out = tmp_path / "tiny"
    train_tokenizer(["hello world, hello tokenizer"] * 3, vocab_size=5000, out_dir=out)
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert MIN_VOCAB_SIZE < len(tok) < 5000
    assert tok.decode(tok(UNICODE_SAMPLE)["input_ids"]) == UNICODE_SAMPLE  # every byte still encodable


@pytest.mark.parametrize("bad", [0, 256, MIN_VOCAB_SIZE - 1, "1000", 1000.0, True])
def test_vocab_size_is_validated(tmp_path, bad):
    with pytest.raises(BamError, match="vocab_size"):
        train_tokenizer(["some text"], vocab_size=bad, out_dir=tmp_path / "tok")
    assert list(tmp_path.iterdir()) == []


def test_failed_training_leaves_nothing(tmp_path):
    def texts():
        yield "first document"
        yield b"bytes are not text"

    with pytest.raises(BamError, match=r"texts\[1\]"):
        train_tokenizer(texts(), vocab_size=300, out_dir=tmp_path / "tok")
    assert list(tmp_path.iterdir()) == []

    with pytest.raises(BamError, match="no text"):
        train_tokenizer(["", ""], vocab_size=300, out_dir=tmp_path / "tok")
    assert list(tmp_path.iterdir()) == []


def test_retraining_replaces_a_tokenizer_directory(tmp_path, trained):
    out = tmp_path / "tok"
    train_tokenizer(stdlib_texts(50_000), vocab_size=300, out_dir=out)
    train_tokenizer(stdlib_texts(50_000), vocab_size=400, out_dir=out)
    assert len(load_tokenizer(out)) == 400
    assert [p.name for p in tmp_path.iterdir()] == ["tok"]  # no temporary or old copies left


def test_refuses_to_replace_a_directory_with_other_files(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(BamError, match="model.safetensors"):
        train_tokenizer(["some text"], vocab_size=300, out_dir=out)
    assert (out / "model.safetensors").read_bytes() == b"weights"


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(BamError, match="not a directory"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(BamError, match="no tokenizer files"):
        load_tokenizer(tmp_path)
