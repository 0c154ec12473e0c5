"""Model directories: open any supported checkpoint as a stream of tensors, load, and write atomically.

A model directory is an ordinary Hugging Face one: config.json, model.safetensors (or shards with
model.safetensors.index.json), tokenizer files. Tensors are read lazily through safetensors'
memory map, so mixing never holds more than the tensors it is combining. Everything we write
appears only when complete: it is built in a temporary sibling directory and renamed into place.

Every directory we write that holds weights also holds manifest.json: the size and sha256 of each
of its files, computed inside the temporary directory before the rename. Reading verifies it:
config.json when the model is opened, a weight file the first time one of its tensors is read
(before that tensor is used). Opening a model and checks on names and shapes (headers) therefore
cost no hashing, and a load reads each file twice at most (the second time from the page cache).
Directories without a manifest (Hugging Face checkpoints from elsewhere) load as before. Weights
are only ever read through safetensors, never unpickled.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import queue
import re
import shutil
import socket
import struct
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from bam.modeling.config import BamConfig
from bam.errors import BamError

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
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
    # For formats that store one of our tensors in pieces (an imported Llama's FFN gate and up
    # projections): name -> those pieces, read lazily. Absent: every tensor is one piece.
    read_parts: Callable[[str], Iterable[torch.Tensor]] | None = None

    def tensor(self, name: str) -> torch.Tensor:
        return self.read(name)

    def tensor_parts(self, name: str) -> Iterable[torch.Tensor]:
        """Tensor `name` as row blocks whose row-major concatenation is `tensor(name)` (the form
        StreamingSafetensorsWriter.write takes), without concatenating the stored pieces."""
        return [self.read(name)] if self.read_parts is None else self.read_parts(name)


class SafetensorsFiles:
    """Lazy access to the tensors of a directory's safetensors file(s) by name.

    Names and shapes come from the files' headers. With a manifest, a file is verified (size, then
    sha256) before the first tensor is read from it, so no tensor of a corrupt file is ever used.
    """

    def __init__(self, directory: Path):
        self.directory = directory
        self.manifest = read_manifest(directory)
        self._verified: set[Path] = set()
        index = directory / WEIGHTS_INDEX_NAME
        if index.exists():
            self._verify(index)
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise BamError(f"{index}: field weight_map missing or not an object")
            self.file_of = {name: directory / file for name, file in weight_map.items()}
        elif (directory / WEIGHTS_NAME).exists():
            path = directory / WEIGHTS_NAME
            with _safe_open(path) as f:
                self.file_of = {name: path for name in f.keys()}
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
        self._verify(path)
        try:
            with _safe_open(path) as f:
                return f.get_tensor(name)
        except (SafetensorError, RuntimeError, OSError) as err:
            raise BamError(f"{path}: tensor {name} could not be read ({_first_line(err)}); "
                           "the file is corrupt or truncated") from None

    def shape(self, name: str) -> tuple[int, ...]:
        with _safe_open(self.file_of[name]) as f:
            return tuple(f.get_slice(name).get_shape())

    def _verify(self, path: Path) -> None:
        if self.manifest is None or path in self._verified:
            return
        entry = self.manifest.get(path.relative_to(self.directory).as_posix())
        if entry is None:
            raise BamError(f"{path}: not listed in {self.directory / MANIFEST_NAME}, so the directory was "
                           f"changed after it was written (delete {MANIFEST_NAME} to load it unverified)")
        verify_file(path, entry)
        self._verified.add(path)


def _safe_open(path: Path):
    """safetensors' reader; it checks the header and that the file holds every byte it declares."""
    try:
        return safe_open(str(path), framework="pt")
    except FileNotFoundError:
        raise BamError(f"{path}: weight file missing") from None
    except (SafetensorError, OSError, ValueError) as err:
        raise BamError(f"{path}: not a readable safetensors file ({_first_line(err)}); "
                       "the file is corrupt or truncated") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise BamError(f"{path}: file not found") from None
    except OSError as err:
        raise BamError(f"{path}: cannot be read ({err.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BamError(f"{path}: not valid JSON ({_first_line(err)})") from None
    if not isinstance(data, dict):
        raise BamError(f"{path}: expected a JSON object")
    return data


# ---------------------------------------------------------------------------------------------
# Manifests: the size and sha256 of every file of a directory we wrote

_HASH_BUFFER = 1 << 20  # 1 MiB reads: as fast as larger ones, and a fixed, small buffer


def sha256_file(path: Path) -> str:
    """sha256 of a file, streamed through one reused buffer (no whole-file read into memory)."""
    digest = hashlib.sha256()
    buffer = bytearray(_HASH_BUFFER)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


# sha256 of the files StreamingSafetensorsWriter wrote in this process, computed from the bytes on
# their way to the file: absolute path -> (the file's identity at close, hex digest). write_manifest
# takes a digest from here instead of reading the file back (1.8 GB for a 4-expert mix), but only
# for the same file unchanged since (device, inode, size and mtime as at close); else it reads.
_WRITTEN_DIGESTS: dict[str, tuple[tuple[int, int, int, int], str]] = {}


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _remember_digest(path: Path, digest: str) -> None:
    _WRITTEN_DIGESTS[os.path.abspath(path)] = (_identity(os.stat(path)), digest)


def _file_digest(path: Path, st: os.stat_result) -> str:
    """The file's sha256: the writer's, if it wrote this file and nothing changed it since, else read."""
    known = _WRITTEN_DIGESTS.pop(os.path.abspath(path), None)
    if known is not None and known[0] == _identity(st):
        return known[1]
    return sha256_file(path)


def write_manifest(directory: Path) -> dict:
    """Write `directory`/manifest.json listing the size and sha256 of each file directly in it.

    Subdirectories are not listed: a model directory inside a checkpoint is written (and
    manifested) on its own. Returns the file entries.
    """
    directory = Path(directory)
    files = {}
    for path in sorted(directory.iterdir()):
        if path.is_file() and path.name != MANIFEST_NAME:
            st = path.stat()
            files[path.name] = {"size": st.st_size, "sha256": _file_digest(path, st)}
    manifest = {"format": MANIFEST_FORMAT, "generator": "bam", "files": files}
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return files


def read_manifest(directory: Path) -> dict[str, dict] | None:
    """File name -> {"size", "sha256"} from `directory`/manifest.json; None when there is none.

    A manifest.json that parses but is not ours (no "generator": "bam") is ignored, so a foreign
    file of that name cannot make a checkpoint unloadable; one of ours that is damaged is an error.
    """
    path = Path(directory) / MANIFEST_NAME
    if not path.exists():
        return None
    data = _read_json(path)
    if data.get("generator") != "bam":
        return None
    files = data.get("files")
    if data.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
        raise BamError(f"{path}: format {data.get('format')!r} unknown or field files missing "
                       f"(expected format {MANIFEST_FORMAT})")
    for name, entry in files.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("size"), int)
                and isinstance(entry.get("sha256"), str) and len(entry["sha256"]) == 64):
            raise BamError(f"{path}: entry {name!r} is not {{size, sha256}}; the manifest is damaged")
    return files


def verify_file(path: Path, entry: dict) -> None:
    """BamError naming `path` unless it has the manifest entry's size and sha256."""
    if not path.exists():
        raise BamError(f"{path}: listed in {MANIFEST_NAME} but missing")
    if not path.is_file():
        raise BamError(f"{path}: expected a file (listed in {MANIFEST_NAME})")
    size = path.stat().st_size
    if size != entry["size"]:
        raise BamError(f"{path}: {size} bytes where {MANIFEST_NAME} says {entry['size']}: "
                       "the file is truncated or was modified")
    actual = sha256_file(path)
    if actual != entry["sha256"]:
        raise BamError(f"{path}: sha256 mismatch (expected {entry['sha256']}, got {actual}): "
                       "the file is corrupt or was modified")


def verify_manifest(directory: Path, names: list[str] | None = None) -> bool:
    """Check the files manifest.json lists (only those among `names`, if given).

    Returns False when the directory has no manifest (nothing to check); BamError names the first
    file that does not match. A name in `names` that the manifest does not list is an error too:
    the caller relies on that file, and it was not part of what was written.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest is None:
        return False
    for name in manifest if names is None else names:
        if name not in manifest:
            raise BamError(f"{directory / name}: not listed in {directory / MANIFEST_NAME}, so the directory "
                           f"was changed after it was written (delete {MANIFEST_NAME} to load it unverified)")
        verify_file(directory / name, manifest[name])
    return True


# ---------------------------------------------------------------------------------------------
# Opening and loading


def read_config_dict(path: Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise BamError(f"{path}: no such file or directory")
    if not path.is_dir():
        raise BamError(f"{path}: expected a model directory (config.json + safetensors weights)")
    if not (path / "config.json").exists():
        raise BamError(f"{path}: not a model directory (no config.json)")
    manifest = read_manifest(path)
    if manifest is not None and "config.json" in manifest:  # small: checked at once, not lazily
        verify_file(path / "config.json", manifest["config.json"])
    return _read_json(path / "config.json")


def open_model(path: str | Path) -> ModelSource:
    """Open one of our checkpoints or a supported Hugging Face dense checkpoint (see bam/formats/hf.py).

    Reads config.json and the weights' headers only; each weight file is verified against the
    directory's manifest (if any) when its first tensor is read.
    """
    path = Path(path)
    config_dict = read_config_dict(path)
    model_type = config_dict.get("model_type")
    tokenizer_dir = path if any((path / f).exists() for f in TOKENIZER_FILES) else None
    if model_type != BamConfig.model_type:
        from bam.formats.hf import open_hf_model  # noqa: PLC0415  (hf imports need transformers' configs)

        return open_hf_model(path, config_dict, tokenizer_dir)
    config = config_from_dict(config_dict, path / "config.json")
    files = SafetensorsFiles(path)
    return ModelSource(path, "bam", config, files.names(), files.get, tokenizer_dir)


def config_from_dict(config_dict: dict, where: Path | str) -> BamConfig:
    """A validated BamConfig from a config file's fields; BamError names `where` and the field."""
    try:
        return BamConfig.from_dict(dict(config_dict))
    except BamError as err:
        raise BamError(f"{where}: {err}") from None
    except (TypeError, ValueError) as err:
        raise BamError(f"{where}: invalid config ({_first_line(err)})") from None


def load_model(path: str | Path, dtype: torch.dtype = torch.float32):
    """Build a BamForCausalLM from any checkpoint `open_model` accepts, checking every tensor's shape."""
    from bam.modeling.model import BamForCausalLM  # noqa: PLC0415

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
def atomic_output_dir(out: str | Path, overwrite: bool = False, keep_existing: bool = False,
                      manifest: bool | None = None) -> Iterator[Path]:
    """Yield a temporary directory beside `out`; it becomes `out` only if the block succeeds.

    A reader sees no directory or a complete one, never a half-written one. On any error (or
    KeyboardInterrupt) the temporary directory is removed, and so are parent directories this
    call created; an existing `out` is left as it was. If `out` exists: an error by default;
    `overwrite` swaps it out by renames; `keep_existing` keeps it and discards the new one
    (content-addressed caches, where two processes racing to build one entry build identical ones).

    `manifest`: write manifest.json (size and sha256 of each file) into the finished directory
    before it is renamed into place. The default, None, means "when it holds *.safetensors files":
    every model directory and checkpoint gets one whoever writes it (save_model, mix, export, the
    trainer), with no flag to forget; caches, tokenizers and reports, which are not read back as
    weights, skip the hashing.

    Running out of disk space while the block writes becomes a one-line BamError naming `out`.
    """
    out = Path(out)
    if out.exists() and not (overwrite or keep_existing):
        raise BamError(f"{out}: output already exists (choose another path or pass --overwrite)")
    created = _missing_ancestors(out.parent)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(out)
        tmp = Path(tempfile.mkdtemp(prefix=_temporary_prefix(out), dir=out.parent))
    except OSError as err:
        _remove_empty(created)
        clear = _write_error(err, out)
        if clear is not None:
            raise clear  # its __cause__ is the original error
        raise
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private (0700); the result is an ordinary directory
    try:
        yield tmp
        if manifest or (manifest is None and any(tmp.glob("*.safetensors"))):
            write_manifest(tmp)
        _fsync_tree(tmp)
        _publish(tmp, out, keep_existing)
        _fsync_dir(out.parent)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        clear = _write_error(err, out)
        if clear is not None:
            raise clear  # its __cause__ is the original error
        raise


# errno values that mean "the disk (or quota, or file-size limit) cannot take these bytes".
_OUT_OF_SPACE = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                 errno.EFBIG: "file-size limit reached"}


def _write_error(err: BaseException, out: Path) -> BamError | None:
    """A one-line BamError for a write that failed for lack of space (caused by the original
    error); None for anything else.

    Python raises OSError with the errno; safetensors' Rust writer raises SafetensorError whose
    message ends with "(os error N)". When atomic outputs nest (a checkpoint's model directory, a
    pipeline stage's model), the inner one's error is renamed after the outer `out`: the path the
    user knows, where the inner one lived in a temporary directory that no longer exists.
    """
    if isinstance(err, BamError) and err.__cause__ is not None:
        err = err.__cause__  # an inner atomic_output_dir's error: its cause is the original one
    code = getattr(err, "errno", None) if isinstance(err, OSError) else None
    if isinstance(err, SafetensorError):
        code = next((c for c in _OUT_OF_SPACE if f"(os error {c})" in str(err)), None)
    if code not in _OUT_OF_SPACE:
        return None
    error = BamError(f"{_OUT_OF_SPACE[code]} while writing {out} (the partial output was removed; "
                     "free some space and run again)")
    error.__cause__ = err
    return error


def _temporary_prefix(out: Path, kind: str = "tmp") -> str:
    # Hidden, named after `out`, and owned: which process on which machine is writing it. `kind`
    # is "tmp" for the directory being written, "old" for the copy an overwrite moves aside.
    return f".{out.name}.{kind}-{os.getpid()}@{socket.gethostname()}-"


def _remove_stale_temporaries(out: Path) -> None:
    """Delete temporary directories of `out` left by killed processes on this machine.

    A process killed mid-write leaves its hidden temporary directory behind, and one killed
    between the two renames of an overwrite leaves the replaced copy moved aside; the next write
    of the same output removes both. Only directories whose owner is on this host and no longer
    running are removed: a live writer's (another rank, a racing cache build) is never touched,
    and neither is one from another machine sharing the file system.
    """
    host = socket.gethostname()
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(?:tmp|old)-(\d+)@(.+)-[^-]+$")
    for path in out.parent.glob(f".{glob.escape(out.name)}.*-*"):
        match = pattern.match(path.name)
        if match and match.group(2) == host and not _process_alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _missing_ancestors(directory: Path) -> list[Path]:
    """`directory` and its ancestors that do not exist yet, deepest first."""
    missing = []
    while not directory.exists() and directory != directory.parent:
        missing.append(directory)
        directory = directory.parent
    return missing


def _remove_empty(directories: list[Path]) -> None:
    for directory in directories:  # deepest first; stops at the first one something else filled
        try:
            directory.rmdir()
        except OSError:
            return


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
    old = Path(tempfile.mkdtemp(prefix=_temporary_prefix(out, "old"), dir=out.parent))
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


_WRITE_SLICE = 1 << 20  # bytes hashed, then written, at a time

_DTYPE_NAMES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


def is_row_block(part: torch.Tensor, shape: tuple[int, ...]) -> bool:
    """Whether `part` is whole rows of a tensor of `shape`: same last dimension (1-D for a 1-D tensor)."""
    if len(shape) <= 1:
        return part.dim() == len(shape)
    return part.dim() >= 1 and part.shape[-1] == shape[-1]


class StreamingSafetensorsWriter:
    """Writes a safetensors file whose tensors arrive one at a time, in the order declared.

    The header (names, dtypes, shapes, offsets) is known before any tensor is computed, so it is
    written first and each tensor's bytes are appended as soon as it exists: peak memory is one
    output tensor plus its inputs, whatever the model size. A tensor may also arrive in parts (see
    `write`), so a stack of experts is written without ever being built.

    Every byte is fed to a running sha256 on its way to the file; `atomic_output_dir`'s manifest
    takes that digest (`digest` after close) instead of reading the whole file back.
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
        self.digest: str | None = None
        self.file = open(path, "wb")
        self._output = _HashingWriter(self.file)
        self._output.put(memoryview(struct.pack("<Q", len(header_bytes)) + header_bytes))

    def write(self, name: str, tensor: torch.Tensor | Iterable[torch.Tensor]) -> None:
        """Append tensor `name`: a tensor, or an iterable of row blocks that make it up.

        Row blocks are written back to back, so the tensor is their concatenation in row-major
        order: each block has the tensor's dtype and last dimension (a 1-D tensor's blocks are
        1-D), and together they hold its number of elements (a dim-0 stack of experts, or one
        expert's gate rows then its up rows). A lazy iterable keeps one block in memory at a time.

        The bytes are written on a background thread: do not modify a tensor handed to `write`
        until `close` returns (which waits until everything is on its way to the disk).
        """
        expected_name, (dtype, shape) = self.pending.pop(0)
        if isinstance(tensor, torch.Tensor):
            if name != expected_name or tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                raise RuntimeError(f"writer expected {expected_name} {dtype} {tuple(shape)}, "
                                   f"got {name} {tensor.dtype} {tuple(tensor.shape)}")
            self._append_tensor(tensor)
            return
        if name != expected_name:
            raise RuntimeError(f"writer expected {expected_name}, got {name}")
        remaining = torch.Size(shape).numel()
        for part in tensor:
            if part.dtype != dtype or not is_row_block(part, shape) or part.numel() > remaining:
                raise RuntimeError(f"writer expected row blocks of {name} {dtype} {tuple(shape)}, got a block "
                                   f"{part.dtype} {tuple(part.shape)} with {remaining} elements left")
            self._append_tensor(part)
            remaining -= part.numel()
        if remaining:
            raise RuntimeError(f"writer: row blocks of {name} {tuple(shape)} ended {remaining} elements short")

    def _append_tensor(self, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().contiguous().cpu()
        if tensor.numel() == 0:
            return
        if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16; the bytes are what matter
            tensor = tensor.view(torch.int16)
        self._output.put(memoryview(tensor.numpy()).cast("B"))  # the tensor's own buffer, no copy

    def close(self) -> None:
        try:
            self._output.finish()
        finally:
            self.file.close()
        if self.pending:
            raise RuntimeError(f"{self.path}: {len(self.pending)} tensors never written, "
                               f"first {self.pending[0][0]}")
        self.digest = self._output.sha256.hexdigest()
        _remember_digest(self.path, self.digest)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self._output.abort()
            # Flushing may fail the same way the write did (a full disk): keep the first error.
            with contextlib.suppress(OSError):
                self.file.close()


class _HashingWriter:
    """Feeds buffers, in order, to a sha256 and to `file`, on a background thread.

    Hashing and copying GBs into the page cache cost about as much as computing the tensors of a
    mix, and both release the GIL: on a thread of their own they overlap the computation of the
    next tensor when a core is free. At most `depth` buffers wait (the extra memory: tensors
    already computed). An error on the thread (a full disk) is raised again by the next `put` or
    by `finish`.
    """

    def __init__(self, file, depth: int = 2):
        self.file = file
        self.sha256 = hashlib.sha256()
        self._buffers: queue.Queue[memoryview | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._aborted = False
        self._thread = threading.Thread(target=self._run, name="bam-safetensors-writer", daemon=True)
        self._thread.start()

    def put(self, data: memoryview) -> None:
        self._raise_error()
        self._buffers.put(data)

    def finish(self) -> None:
        """Wait until every buffer is hashed and written; raise the thread's error, if any."""
        self._buffers.put(None)
        self._thread.join()
        self._raise_error()

    def abort(self) -> None:
        """Drop what is still queued and stop the thread (the caller failed)."""
        self._aborted = True
        self._buffers.put(None)
        self._thread.join()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        # After an error or an abort, keep taking buffers (and dropping them) so `put` never blocks.
        while (data := self._buffers.get()) is not None:
            if self._error is not None or self._aborted:
                continue
            try:
                # Slice by slice: the write copies bytes the hash just brought into the CPU cache,
                # and single writes of whole tensors into the page cache were slower and less
                # steady on our VM (up to 1.6x the wall time of a full-size mix).
                for start in range(0, len(data), _WRITE_SLICE):
                    piece = data[start:start + _WRITE_SLICE]
                    self.sha256.update(piece)
                    self.file.write(piece)
            except BaseException as err:  # noqa: BLE001  (re-raised in the caller's thread)
                self._error = err


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
