"""GGUF seeds (bam/formats/gguf.py), on a real pretrained model: SmolLM2-135M-Instruct as llama.cpp
ships it (Q4_1, the `smollm2_gguf` fixture in conftest.py), against transformers' own GGUF loading.

Both sides dequantize through transformers (`load_gguf_checkpoint`), so the weights are the same
numbers and any difference is ours: the config translation, the tensor map, the model's maths.
"""

import json
import shutil
import sys

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bam.cli import main
from bam.data.tokenizer import load_tokenizer
from bam.errors import BamError
from bam.formats.model_dir import load_model, open_model

# Real text: a standard-library module's documentation (prose, code and JSON), the same on every machine
# with this Python.
TEXT = json.__doc__


def max_relative_difference(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute difference, relative to the largest logit."""
    return ((actual - expected).abs().max() / expected.abs().max()).item()


@pytest.fixture(scope="module")
def theirs(smollm2_gguf):
    """transformers' own model and tokenizer, loaded from the file in fp32."""
    model = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                                 dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    return model, tokenizer


@pytest.fixture(scope="module")
def smollm2_source(smollm2_gguf):
    """The file opened once for the whole module: while a source is open, every open of the file
    shares its dequantized tensors (bam/formats/gguf.py), so the mixes and the export below do not
    dequantize it again."""
    return open_model(smollm2_gguf)


@pytest.fixture(scope="module")
def ours(smollm2_source, smollm2_gguf):
    return load_model(smollm2_gguf)


@pytest.fixture(scope="module")
def text_ids(theirs):
    """The first 96 tokens of TEXT (a short sequence keeps the 135M-parameter forwards cheap)."""
    ids = theirs[1](TEXT, return_tensors="pt").input_ids[:, :96]
    assert ids.shape[1] == 96
    return ids


def test_gguf_seed_is_the_real_smollm2(ours):
    config = ours.config
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.num_key_value_heads) \
        == (30, 576, 9, 3)
    assert config.tie_word_embeddings and config.vocab_size == 49152


def test_gguf_import_matches_transformers_on_real_text(ours, theirs, text_ids):
    with torch.no_grad():
        expected = theirs[0](text_ids).logits
        actual = ours(text_ids).logits
    assert max_relative_difference(actual, expected) <= 1e-4
    # and the model is a language model of this text, not noise that happens to agree
    predicted = actual[0, :-1].argmax(-1)
    assert (predicted == text_ids[0, 1:]).float().mean().item() > 0.3


def test_gguf_greedy_generation_matches_transformers(ours, theirs, text_ids):
    prompt = text_ids[:, :24]
    kwargs = dict(max_new_tokens=16, do_sample=False, pad_token_id=theirs[1].eos_token_id)
    assert ours.generate(prompt, **kwargs).tolist() == theirs[0].generate(prompt, **kwargs).tolist()


def test_gguf_tokenizer_encodes_like_transformers(smollm2_gguf, smollm2_source, theirs):
    source = open_model(smollm2_gguf)
    assert source.family == "llama"
    tokenizer = load_tokenizer(source.tokenizer_dir)
    for text in (TEXT, "  Unicode: naïve café, 東京, emoji 🙂\n\ttabs"):
        assert tokenizer(text).input_ids == theirs[1](text).input_ids
    chat = [{"role": "user", "content": "Hello"}]
    assert tokenizer.apply_chat_template(chat, tokenize=False) == theirs[1].apply_chat_template(chat, tokenize=False)


def test_training_takes_tokenizer_and_identity_from_the_file(smollm2_gguf, smollm2_source, theirs, tmp_path):
    """`bam train --model F.gguf`: the tokenizer is the file's, the resume fingerprint its content."""
    from bam.train.config import TrainConfig
    from bam.train.data import tokenizer_for
    from bam.train.fingerprint import model_fingerprint

    tokenizer, directory = tokenizer_for(TrainConfig(model=smollm2_gguf, data=["text=unused.txt"], out=tmp_path))
    assert directory == smollm2_source.tokenizer_dir and tokenizer(TEXT).input_ids == theirs[1](TEXT).input_ids
    (tmp_path / "other.gguf").write_bytes(b"GGUF")
    assert model_fingerprint(smollm2_gguf) != model_fingerprint(tmp_path / "other.gguf")


def test_directory_holding_one_gguf_is_accepted(smollm2_gguf, smollm2_source, tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / smollm2_gguf.name).symlink_to(smollm2_gguf)
    assert open_model(tmp_path / "one").config.to_dict() == open_model(smollm2_gguf).config.to_dict()
    (tmp_path / "one" / "second.gguf").symlink_to(smollm2_gguf)
    with pytest.raises(BamError, match=r"one: holds 2 GGUF files \(.*second.gguf\); pass the one to use"):
        open_model(tmp_path / "one")


@pytest.mark.parametrize("method", ["btx", "bam"])
def test_mix_of_gguf_copies_keeps_the_function(method, smollm2_gguf, smollm2_source, ours, text_ids, tmp_path):
    """METHOD.md section 4 on a real model: two identical experts, renormalized top-2."""
    out = tmp_path / "moe"
    assert main(["mix", "--method", method, "--top-k", "2", "--renormalize", "--out", str(out),
                 str(smollm2_gguf), str(smollm2_gguf)]) == 0
    moe = load_model(out)
    assert moe.config.n_ffn_experts == 2 and moe.config.ffn_top_k == 2
    ids = text_ids[:, :32]
    with torch.no_grad():
        assert max_relative_difference(moe(ids).logits, ours(ids).logits) <= 1e-4
    shutil.rmtree(out)  # about 1 GB in fp32


def test_gguf_exports_to_llama_for_vanilla_transformers(smollm2_gguf, smollm2_source, ours, text_ids, tmp_path):
    from transformers import LlamaForCausalLM

    assert main(["export", str(smollm2_gguf), "--format", "llama", "--out", str(tmp_path / "llama")]) == 0
    exported = LlamaForCausalLM.from_pretrained(tmp_path / "llama", dtype=torch.float32).eval()
    with torch.no_grad():
        assert max_relative_difference(exported(text_ids).logits, ours(text_ids).logits) <= 1e-4
    # the tokenizer taken from the file travels with the export
    assert load_tokenizer(tmp_path / "llama")(TEXT).input_ids[:96] == text_ids[0].tolist()
    shutil.rmtree(tmp_path / "llama")  # 540 MB in fp32


# ---------------------------------------------------------------------------------------------
# What cannot be read: one line each


def write_tiny_gguf(path, arch="llama", tensor_type=None):
    """A 1-layer GGUF of `arch` with random weights, written by the gguf package (no tokenizer)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(64)
    writer.add_embedding_length(32)
    writer.add_block_count(1)
    writer.add_feed_forward_length(64)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(64)
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (64, 32), "output_norm.weight": (32,), "blk.0.attn_norm.weight": (32,),
              "blk.0.ffn_norm.weight": (32,), "blk.0.attn_q.weight": (32, 32), "blk.0.attn_k.weight": (16, 32),
              "blk.0.attn_v.weight": (16, 32), "blk.0.attn_output.weight": (32, 32),
              "blk.0.ffn_gate.weight": (64, 32), "blk.0.ffn_up.weight": (64, 32), "blk.0.ffn_down.weight": (32, 64)}
    for name, shape in shapes.items():
        values = rng.standard_normal(shape).astype(np.float32)
        if tensor_type is not None and name == "blk.0.ffn_up.weight":  # raw blocks of that type
            block_values, block_bytes = gguf.GGML_QUANT_SIZES[tensor_type]
            blocks = np.zeros((shape[0], shape[1] // block_values * block_bytes), dtype=np.uint8)
            writer.add_tensor(name, blocks, raw_dtype=tensor_type)
        else:
            writer.add_tensor(name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_tiny_gguf_reads(tmp_path):
    """The fixture the errors below vary: as written, it opens and loads."""
    model = load_model(write_tiny_gguf(tmp_path / "tiny.gguf"))
    assert model.config.num_hidden_layers == 1 and open_model(tmp_path / "tiny.gguf").tokenizer_dir is None


def test_architecture_transformers_cannot_read_is_one_line(tmp_path):
    path = write_tiny_gguf(tmp_path / "odd.gguf", arch="bamtestarch")
    with pytest.raises(BamError, match=r"odd.gguf: transformers cannot read this GGUF file \(.*bamtestarch") as err:
        open_model(path)
    assert "\n" not in str(err.value)


def test_family_bam_does_not_import_is_refused_as_for_a_directory(tmp_path):
    """transformers reads a GPT-2 GGUF; bam's import refuses the family by the same rule as config.json."""
    with pytest.raises(BamError, match=r"gpt2.gguf: model_type='gpt2' is not supported \(expected bam or one of llama"):
        open_model(write_tiny_gguf(tmp_path / "gpt2.gguf", arch="gpt2"))


def test_quantization_transformers_cannot_read_is_one_line(tmp_path):
    """Q8_1 (llama.cpp's intermediate type) is one gguf has no dequantization for. The file opens
    (its config is fine); loading its tensors fails, naming the type."""
    import gguf

    path = write_tiny_gguf(tmp_path / "q81.gguf", tensor_type=gguf.GGMLQuantizationType.Q8_1)
    assert open_model(path).config.num_hidden_layers == 1
    with pytest.raises(BamError, match=r"q81.gguf: transformers cannot dequantize this GGUF file \(.*Q8_1") as err:
        load_model(path)
    assert "\n" not in str(err.value)


def test_missing_gguf_package_says_install_the_extra(tmp_path, monkeypatch):
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` now raises ImportError
    with pytest.raises(BamError, match=r"tiny.gguf: reading a GGUF file needs the gguf package: install bam\[gguf\]"):
        open_model(path)
