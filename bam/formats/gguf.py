"""GGUF files (llama.cpp's format) as seeds and experts, read through transformers' own GGUF loading.

A `.gguf` file, or a directory holding exactly one and no config.json, is opened wherever a model
directory is (bam/formats/model_dir.py): transformers rebuilds the family's config from the file's
metadata (`AutoConfig.from_pretrained(dir, gguf_file=...)`), dequantizes every tensor to fp32 under
the names its own model of that family has (`load_gguf_checkpoint`, what
`AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)` loads), and converts the file's
tokenizer (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`). From there the file is a Hugging
Face checkpoint like any other: bam/formats/hf.py maps it, with the same families and refusals.

transformers dequantizes a whole file at once, so the fp32 tensors are made on the first tensor
read rather than at open (reading the config alone stays cheap), and every source open on one file
in this process shares them: one dequantized copy however often a file is opened (`bam mix F F`).
Needs the `gguf` package (`pip install 'bam[gguf]'`).
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import shutil
import tempfile
import weakref
from pathlib import Path

import torch

from bam.errors import BamError, first_line
from bam.formats.source import ModelSource

GGUF_SUFFIX = ".gguf"


def gguf_file_of(path: Path) -> Path | None:
    """The GGUF file `path` stands for: itself, or the one `.gguf` in a directory with no
    config.json; None for anything else (a model directory, or no model at all)."""
    if path.is_file() and path.suffix.lower() == GGUF_SUFFIX:
        return path
    if not path.is_dir() or (path / "config.json").exists():
        return None
    found = sorted(p for p in path.iterdir() if p.suffix.lower() == GGUF_SUFFIX and p.is_file())
    if len(found) > 1:
        raise BamError(f"{path}: holds {len(found)} GGUF files ({', '.join(p.name for p in found)}); "
                       f"pass the one to use")
    return found[0] if found else None


def _require_gguf(path: Path) -> None:
    try:
        import gguf  # noqa: F401, PLC0415  (transformers' GGUF loader reads the file with it)
    except ImportError as err:
        raise BamError(f"{path}: reading a GGUF file needs the gguf package: install bam[gguf] "
                       f"(pip install 'bam[gguf]')") from err


@contextlib.contextmanager
def _transformers_errors(path: Path, what: str):
    """transformers' GGUF errors (an architecture it has no config for, a tensor type gguf cannot
    dequantize, a file that is no GGUF) as our one-line message."""
    try:
        yield
    except (ValueError, NotImplementedError, KeyError, OSError, TypeError) as err:
        raise BamError(f"{path}: transformers cannot {what} ({first_line(err)})") from err


class GgufTensors:
    """A GGUF file's tensors under transformers' names (`names()`, `get(name)`, `get_rows`, as
    bam/formats/hf.py reads a safetensors directory), all dequantized to fp32 on the first `get`."""

    def __init__(self, path: Path, hf_config):
        from transformers import AutoModelForCausalLM  # noqa: PLC0415

        self.path = path
        self.hf_config = hf_config
        # transformers maps GGUF names to the parameters of a model of the family; on the meta
        # device it costs no memory
        with torch.device("meta"):
            self._model = AutoModelForCausalLM.from_config(hf_config)
        self._names = list(self._model.state_dict())
        self._tensors: dict[str, torch.Tensor] | None = None

    def names(self) -> list[str]:
        return self._names

    def get(self, name: str) -> torch.Tensor:
        """The stored tensor itself, not a copy (one fp32 model in memory, not two): a model loaded
        while a source of the file is open shares these tensors, so changing its weights in place
        changes what later reads of the file return until every source is closed."""
        if self._tensors is None:
            from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint  # noqa: PLC0415

            with _transformers_errors(self.path, "dequantize this GGUF file"):
                loaded = load_gguf_checkpoint(str(self.path), return_tensors=True, model_to_load=self._model,
                                              torch_dtype=torch.float32)
            self._tensors = loaded["tensors"]
        if name not in self._tensors:
            raise BamError(f"{self.path}: tensor {name} missing from the GGUF file")
        return self._tensors[name]

    def get_rows(self, name: str, ranges: list[tuple[int, int]]) -> list[torch.Tensor]:
        """Row blocks [start, stop) of tensor `name`, as SafetensorsFiles.get_rows gives them."""
        tensor = self.get(name)
        return [tensor[start:stop] for start, stop in ranges]


# One GgufTensors per file while any source opened on it lives; one config and one converted
# tokenizer per file for the process's lifetime (transformers parses all the metadata, vocabulary
# included, each time it reads either). Keyed by the file's identity: an edited file is read again.
_OPEN_FILES: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_CONFIGS: dict[tuple, object] = {}
_TOKENIZER_DIRS: dict[tuple, Path | None] = {}


def _file_key(path: Path) -> tuple:
    stat = path.stat()
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns


def gguf_tokenizer_dir(path: Path) -> Path | None:
    """The file's tokenizer, converted by transformers and saved as tokenizer files in a directory
    that lives as long as this process (where ModelSource and copy_tokenizer expect them); None if
    the file has no tokenizer."""
    key = _file_key(path)
    if key not in _TOKENIZER_DIRS:
        from transformers import AutoTokenizer  # noqa: PLC0415
        from transformers.integrations.gguf import read_gguf_metadata  # noqa: PLC0415

        metadata, _ = read_gguf_metadata(str(path), ())
        directory = None
        if "tokenizer.ggml.model" in metadata:
            with _transformers_errors(path, "convert this GGUF file's tokenizer"):
                tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            directory = Path(tempfile.mkdtemp(prefix="bam-gguf-tokenizer-"))
            atexit.register(shutil.rmtree, directory, ignore_errors=True)
            tokenizer.save_pretrained(directory)
        _TOKENIZER_DIRS[key] = directory
    return _TOKENIZER_DIRS[key]


def open_gguf_model(path: Path) -> ModelSource:
    """A GGUF file as a ModelSource: its config and tokenizer at once, its tensors on first read."""
    from transformers import AutoConfig  # noqa: PLC0415

    from bam.formats.hf import check_family, hf_model_source  # noqa: PLC0415

    _require_gguf(path)
    key = _file_key(path)
    tensors = _OPEN_FILES.get(key)
    if tensors is None:
        if key not in _CONFIGS:
            with _transformers_errors(path, "read this GGUF file"):
                _CONFIGS[key] = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        hf_config = copy.deepcopy(_CONFIGS[key])  # building transformers' model may set fields on it
        check_family(hf_config.model_type, str(path))
        tensors = GgufTensors(path, hf_config)
        _OPEN_FILES[key] = tensors
    return hf_model_source(path, tensors.hf_config, lambda: tensors, gguf_tokenizer_dir(path), path)
