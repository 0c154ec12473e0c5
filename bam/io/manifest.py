"""Manifests: the size and sha256 of every file of a directory we wrote.

Every directory we write that holds weights also holds manifest.json, computed inside the
temporary directory before the rename (bam.io.atomic). Readers verify it lazily: a file the first
time it is used, so opening a directory and checks on names and shapes cost no hashing.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from bam.errors import BamError
from bam.io.jsonfile import read_json

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1

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


def remember_digest(path: Path, digest: str) -> None:
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
    data = read_json(path)
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
