"""Everything we write appears only when complete: it is built in a temporary sibling directory and
renamed into place. A temporary's name says which process on which host writes it, so a stale one
(its writer dead) is removed by the next write of the same output and a live one never is.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

from safetensors import SafetensorError

from bam.errors import BamError
from bam.io.manifest import write_manifest

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
        remove_stale_temporaries(out.parent, out.name)
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
        # "(os error N)" since safetensors 0.5; older releases print the Rust error's Debug form.
        code = next((c for c in _OUT_OF_SPACE if f"(os error {c})" in str(err) or f"code: {c}," in str(err)), None)
    if code not in _OUT_OF_SPACE:
        return None
    error = BamError(f"{_OUT_OF_SPACE[code]} while writing {out} (the partial output was removed; "
                     "free some space and run again)")
    error.__cause__ = err
    return error


def _temporary_prefix(out: Path, kind: str = "tmp") -> str:
    # Hidden, named after `out`, and owned: which process on which machine is writing it. `kind`
    # is "tmp" for the directory being written, "old" for a copy moved aside to be deleted (by an
    # overwrite, or by `remove_dir`).
    return f".{out.name}.{kind}-{os.getpid()}@{socket.gethostname()}-"


def remove_stale_temporaries(directory: Path, out_name: str | None = None) -> None:
    """Delete temporary directories in `directory` left by killed processes on this machine: those
    of the output named `out_name`, or of every output when it is None.

    A process killed mid-write leaves its hidden temporary directory behind, and one killed
    between the two renames of an overwrite (or in the middle of `remove_dir`) leaves the replaced
    copy moved aside; the next write of the same output removes both. Only directories whose
    owner is on this host and no longer running are removed: a live writer's (another rank, a
    racing cache build) is never touched, and neither is one from another machine sharing the
    file system. Without `out_name` it sweeps a directory whose outputs are written under ever
    new names (a training run's states, step_000002, step_000004, ...), where the next write may
    never be of the same output.
    """
    host = socket.gethostname()
    name = re.escape(out_name) if out_name is not None else ".+"
    pattern = re.compile(rf"^\.{name}\.(?:tmp|old)-(\d+)@(.+)-[^-]+$")
    for path in directory.glob(f".{glob.escape(out_name)}.*-*" if out_name is not None else ".*"):
        match = pattern.match(path.name)
        if match and match.group(2) == host and not _process_alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)


def remove_dir(path: Path) -> None:
    """Delete directory `path` so that it is never seen half-deleted: it is first moved aside under
    a temporary name of this process, which `remove_stale_temporaries` removes if a kill stops the
    deletion."""
    shutil.rmtree(_move_aside(path), ignore_errors=True)


def _move_aside(out: Path) -> Path:
    """Rename `out` into a new temporary directory of this process beside it; returns that directory."""
    old = Path(tempfile.mkdtemp(prefix=_temporary_prefix(out, "old"), dir=out.parent))
    os.rename(out, old / out.name)
    return old


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
    old = _move_aside(out)
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
