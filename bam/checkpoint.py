"""Model directories: open any supported checkpoint as a stream of tensors, load, and write atomically.

A model directory is an ordinary Hugging Face one: config.json, model.safetensors (or shards with
model.safetensors.index.json), tokenizer files. Tensors are read lazily through safetensors'
memory map, so mixing never holds more than the tensors it is combining. Everything we write
appears only when complete: it is built in a temporary sibling directory and renamed into place.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from bam.config import BamConfig
from bam.errors import BamError

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)


@dataclass
class ModelSource:
    """A checkpoint seen as our parameter names -> tensors, whatever format it is stored in."""

    path: Path
    family: str  # "bam" for ours, else the transformers model_type it was imported from
    config: BamConfig
    tensor_names: list[str]
    read: Callable[[str], torch.Tensor]
    tokenizer_dir: Path | None = None
    notes: list[str] = field(default_factory=list)

    def tensor(self, name: str) -> torch.Tensor:
        return self.read(name)


class SafetensorsFiles:
    """Lazy access to the tensors of a directory's safetensors file(s) by name."""

    def __init__(self, directory: Path):
        index = directory / WEIGHTS_INDEX_NAME
        if index.exists():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise BamError(f"{index}: field weight_map missing or not an object")
            self.file_of = {name: directory / file for name, file in weight_map.items()}
        elif (directory / WEIGHTS_NAME).exists():
            path = directory / WEIGHTS_NAME
            self.file_of = {name: path for name in _safe_open(path).keys()}
        else:
            found = ", ".join(sorted(p.name for p in directory.glob("*.bin"))) or "no weight files"
            raise BamError(f"{directory}: no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME} "
                           f"(found {found}; only safetensors weights are loaded, never pickles)")

    def names(self) -> list[str]:
        return list(self.file_of)

    def get(self, name: str) -> torch.Tensor:
        # A fresh handle per tensor: a long-lived memory map would keep every page read so far
        # resident, and peak RSS would grow with the inputs' size instead of one tensor's.
        path = self.file_of[name]
        try:
            with safe_open(str(path), framework="pt") as f:
                return f.get_tensor(name)
        except (SafetensorError, RuntimeError, OSError) as err:
            raise BamError(f"{path}: tensor {name} could not be read ({err}); the file is corrupt or truncated")

    def shape(self, name: str) -> tuple[int, ...]:
        with _safe_open(self.file_of[name]) as f:
            return tuple(f.get_slice(name).get_shape())


def _safe_open(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError) as err:
        raise BamError(f"{path}: not a readable safetensors file ({err})")


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise BamError(f"{path}: file not found")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BamError(f"{path}: not valid JSON ({err})")
    if not isinstance(data, dict):
        raise BamError(f"{path}: expected a JSON object")
    return data


def read_config_dict(path: Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise BamError(f"{path}: no such file or directory")
    if not path.is_dir():
        raise BamError(f"{path}: expected a model directory (config.json + safetensors weights)")
    if not (path / "config.json").exists():
        raise BamError(f"{path}: not a model directory (no config.json)")
    return _read_json(path / "config.json")


def open_model(path: str | Path) -> ModelSource:
    """Open one of our checkpoints or a supported Hugging Face dense checkpoint (see bam/hf.py)."""
    path = Path(path)
    config_dict = read_config_dict(path)
    model_type = config_dict.get("model_type")
    tokenizer_dir = path if any((path / f).exists() for f in TOKENIZER_FILES) else None
    if model_type != BamConfig.model_type:
        from bam.hf import open_hf_model  # noqa: PLC0415  (hf imports need transformers' configs)

        return open_hf_model(path, config_dict, tokenizer_dir)
    config = config_from_dict(config_dict, path / "config.json")
    files = SafetensorsFiles(path)
    return ModelSource(path, "bam", config, files.names(), files.get, tokenizer_dir)


def config_from_dict(config_dict: dict, where: Path | str) -> BamConfig:
    try:
        return BamConfig.from_dict(dict(config_dict))
    except BamError as err:
        raise BamError(f"{where}: {err}")
    except (TypeError, ValueError) as err:
        raise BamError(f"{where}: invalid config ({err})")


def expected_tensor_names(config: BamConfig) -> list[str]:
    """The parameter names of a model with this config, in module order (tied lm_head left out)."""
    from bam.model import BamForCausalLM  # noqa: PLC0415

    with torch.device("meta"):
        model = BamForCausalLM(config)
    return [name for name, _ in model.named_parameters()]  # named_parameters skips the tied duplicate


def load_model(path: str | Path, dtype: torch.dtype = torch.float32):
    """Build a BamForCausalLM from any checkpoint `open_model` accepts, checking every tensor's shape."""
    from bam.model import BamForCausalLM  # noqa: PLC0415

    source = open_model(path)
    with torch.device("meta"):
        model = BamForCausalLM(source.config)
    expected = dict(model.named_parameters())
    missing = [name for name in expected if name not in source.tensor_names]
    if missing:
        raise BamError(f"{source.path}: tensor {missing[0]} missing ({len(missing)} missing in all)")
    state = {}
    for name, param in expected.items():
        tensor = source.tensor(name)
        if tuple(tensor.shape) != tuple(param.shape):
            raise BamError(f"{source.path}: tensor {name} has shape {tuple(tensor.shape)}, "
                           f"expected {tuple(param.shape)} from config.json")
        state[name] = tensor.to(dtype)
    model.load_state_dict(state, strict=False, assign=True)
    if source.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.eval()
    return model


# ---------------------------------------------------------------------------------------------
# Writing


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, overwrite: bool = False, keep_existing: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `out`; it becomes `out` only if the block succeeds.

    A reader sees no directory or a complete one, never a half-written one. On any error (or
    KeyboardInterrupt) the temporary directory is removed and an existing `out` is left as it was.
    If `out` exists: an error by default; `overwrite` swaps it out by renames; `keep_existing`
    keeps it and discards the new one (content-addressed caches, where two processes racing to
    build one entry build identical ones).
    """
    out = Path(out)
    if out.exists() and not (overwrite or keep_existing):
        raise BamError(f"{out}: output already exists (choose another path or pass --overwrite)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private (0700); the result is an ordinary directory
    try:
        yield tmp
        _fsync_tree(tmp)
        _publish(tmp, out, keep_existing)
        _fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _publish(tmp: Path, out: Path, keep_existing: bool) -> None:
    try:
        os.rename(tmp, out)  # atomic; succeeds when `out` is absent
        return
    except OSError:
        if not out.exists():
            raise
    if keep_existing:
        shutil.rmtree(tmp, ignore_errors=True)
        return
    # POSIX cannot rename over a non-empty directory: move the old one aside first, then drop it.
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rename(out, old / out.name)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_DTYPE_NAMES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


class StreamingSafetensorsWriter:
    """Writes a safetensors file whose tensors arrive one at a time, in the order declared.

    The header (names, dtypes, shapes, offsets) is known before any tensor is computed, so it is
    written first and each tensor's bytes are appended as soon as it exists: peak memory is one
    output tensor plus its inputs, whatever the model size.
    """

    def __init__(self, path: Path, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        for name, (dtype, shape) in specs.items():
            nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        header_bytes = json.dumps(header, separators=(",", ":")).encode()
        header_bytes += b" " * (-len(header_bytes) % 8)
        self.path = path
        self.pending = list(specs.items())
        self.file = open(path, "wb")
        self.file.write(struct.pack("<Q", len(header_bytes)) + header_bytes)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected_name, (dtype, shape) = self.pending.pop(0)
        if name != expected_name or tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise RuntimeError(f"writer expected {expected_name} {dtype} {tuple(shape)}, "
                               f"got {name} {tensor.dtype} {tuple(tensor.shape)}")
        tensor = tensor.detach().contiguous().cpu()
        if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16; the bytes are what matter
            tensor = tensor.view(torch.int16)
        self.file.write(tensor.numpy().data)  # the buffer itself, no copy

    def close(self) -> None:
        self.file.close()
        if self.pending:
            raise RuntimeError(f"{self.path}: {len(self.pending)} tensors never written, "
                               f"first {self.pending[0][0]}")

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.file.close()


def copy_tokenizer(src: Path | None, dst: Path) -> None:
    if src is None:
        return
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)


def save_model(model, out: str | Path, tokenizer_dir: Path | None = None, overwrite: bool = False) -> Path:
    """Write config.json + model.safetensors (+ tokenizer files) atomically."""
    out = Path(out)
    tensors = dict(model.named_parameters())  # named_parameters lists a tied weight once
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        model.config.save_pretrained(tmp)
        specs = {name: (t.dtype, tuple(t.shape)) for name, t in tensors.items()}
        with StreamingSafetensorsWriter(tmp / WEIGHTS_NAME, specs) as writer:
            for name, tensor in tensors.items():
                writer.write(name, tensor)
        copy_tokenizer(tokenizer_dir, tmp)
    return out
