"""safetensors files, read lazily and written as a stream.

Tensors are read through safetensors' memory map, one fresh handle per tensor, so mixing never
holds more than the tensors it is combining; with a manifest (bam.io.manifest) a file is verified
before its first tensor is used. The writer appends each tensor as it arrives. Weights are only
ever read through safetensors, never unpickled.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import queue
import struct
import threading
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from bam.errors import BamError, first_line
from bam.io.jsonfile import read_json
from bam.io.manifest import MANIFEST_NAME, read_manifest, remember_digest, verify_file

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


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
            weight_map = read_json(index).get("weight_map")
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
            raise BamError(f"{path}: tensor {name} could not be read ({first_line(err)}); "
                           "the file is corrupt or truncated") from None

    def get_rows(self, name: str, ranges: list[tuple[int, int]]) -> list[torch.Tensor]:
        """Row blocks [start, stop) of tensor `name`, read through one handle: only those rows'
        bytes are read (a fused q/k/v tensor's q, k or v rows)."""
        path = self.file_of[name]
        self._verify(path)
        try:
            with _safe_open(path) as f:
                rows = f.get_slice(name)
                return [rows[start:stop] for start, stop in ranges]
        except (SafetensorError, RuntimeError, OSError) as err:
            raise BamError(f"{path}: tensor {name} could not be read ({first_line(err)}); "
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
        raise BamError(f"{path}: not a readable safetensors file ({first_line(err)}); "
                       "the file is corrupt or truncated") from None


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
        remember_digest(self.path, self.digest)

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
