"""Byte-level BPE tokenizers: train one on the user's text, save it as a Hugging Face directory, load it.

The saved directory is an ordinary `PreTrainedTokenizerFast` (tokenizer.json, tokenizer_config.json,
special_tokens_map.json), so `transformers.AutoTokenizer.from_pretrained(out_dir)` loads it offline and
the models we export carry a tokenizer every Hugging Face consumer understands.

Byte-level means every string is representable (no unknown tokens) and decode(encode(s)) == s exactly.
One special token, `<|endoftext|>`, plays bos/eos/pad/unk like GPT-2's: the data pipeline puts it after
every document, and it is never added by the tokenizer itself.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from bam.errors import BamError, first_line
from bam.io.atomic import atomic_output_dir

ENDOFTEXT = "<|endoftext|>"
SPECIAL_TOKENS = [ENDOFTEXT]
N_BYTES = 256  # the byte-level alphabet: every tokenizer we train contains all 256 bytes
MIN_VOCAB_SIZE = N_BYTES + len(SPECIAL_TOKENS)

# The files a tokenizer directory may contain. Training refuses to replace a directory holding anything
# else, so a wrong --out never deletes a model checkpoint or the user's data.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: Path) -> None:
    """Train a byte-level BPE of at most `vocab_size` entries on `texts` and save it to `out_dir`.

    The vocabulary is exactly `vocab_size` (256 bytes + 1 special token + merges) unless the text runs
    out of pairs seen at least twice first; then it is smaller, which is the honest result for tiny text.
    The directory appears in one rename when complete; on error nothing is left behind.
    """
    out_dir = Path(out_dir)
    _check_vocab_size(vocab_size)
    _check_replaceable(out_dir)

    tokenizer = _train_bpe(_checked_texts(texts), vocab_size)
    with atomic_output_dir(out_dir, overwrite=True) as tmp:
        _save_pretrained(tokenizer, tmp)


def load_tokenizer(path: str | Path):
    """Load a tokenizer directory (ours or any Hugging Face one) as a `PreTrainedTokenizerBase`."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise BamError(f"tokenizer {path}: not a directory (expected a directory with tokenizer.json)")
    # tokenizer.model / vocab.json cover sentencepiece and slow BPE checkpoints imported from the hub.
    known = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
    if not any((path / name).is_file() for name in known):
        raise BamError(f"tokenizer {path}: no tokenizer files (expected tokenizer.json or tokenizer_config.json)")
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise BamError(f"tokenizer {path}: could not be loaded ({first_line(exc)})") from exc


def _check_vocab_size(vocab_size: int) -> None:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise BamError(f"vocab_size: expected an integer, got {vocab_size!r}")
    if vocab_size < MIN_VOCAB_SIZE:
        raise BamError(
            f"vocab_size: expected >= {MIN_VOCAB_SIZE} (256 bytes + {len(SPECIAL_TOKENS)} special token), "
            f"got {vocab_size}"
        )


def _check_replaceable(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise BamError(f"tokenizer output {out_dir}: exists and is not a directory")
    if out_dir.is_dir():
        foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in TOKENIZER_FILES)
        if foreign:
            raise BamError(
                f"tokenizer output {out_dir}: exists and holds non-tokenizer files ({', '.join(foreign[:3])}); "
                "choose an empty or new directory"
            )


def _checked_texts(texts: Iterable[str]) -> Iterator[str]:
    """Pass the texts through, failing on non-strings and on an input with no text at all."""
    if isinstance(texts, str):
        raise BamError("texts: expected an iterable of documents, got a single string")
    n_chars = 0
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise BamError(f"texts[{i}]: expected str, got {type(text).__name__}")
        n_chars += len(text)
        yield text
    if n_chars == 0:
        raise BamError("texts: no text to train the tokenizer on (the input is empty)")


def _train_bpe(texts: Iterator[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    # add_prefix_space=False: the first word of a document is encoded as written, so decode is exact.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    # trim_offsets=False keeps offsets byte-exact; the post-processor adds no special tokens.
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        # A pair seen once is noise; requiring two is what stops merging early on tiny text.
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        # All 256 bytes, even those absent from the text, so any string stays encodable.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def _save_pretrained(tokenizer, out_dir: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    special = {"bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT, "unk_token": ENDOFTEXT, "pad_token": ENDOFTEXT}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        # Byte-level decoding is already exact; the "clean up" pass would rewrite " ." into ".".
        clean_up_tokenization_spaces=False,
        **special,
    )
    fast.save_pretrained(out_dir)

    # transformers 5 names its own backend class here; older transformers, vLLM and lm-eval only know
    # PreTrainedTokenizerFast, which transformers 5 maps back to the same backend.
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    # Written for readers that predate tokenizer_config.json carrying the special tokens.
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
