"""Crash-safe file writes, the project's one way to write a file that must never be torn: a reader
sees the old file or the new one, and once a write returns the new file survives a power cut.

Used for configs, checkpoints, exports, the report, keys and certificates, downloads, workspaces
(`atomic_directory`), and the privacy ledger (client/ledger/chain.py), which tells a failed write from a
failed directory sync.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import BinaryIO


class DirectorySyncError(OSError):
    """The new file is in place, but its directory could not be synced: a power cut may still lose it."""


def _sync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise DirectorySyncError(exc.errno, exc.strerror, str(directory)) from exc


@contextmanager
def atomic_file(path: str | Path, *, mode: int = 0o644, exclusive: bool = False) -> Iterator[BinaryIO]:
    """A temporary file beside `path` to write into (binary). When the block ends normally the file
    is synced and renamed to `path` (with `exclusive`, only if `path` does not exist yet:
    FileExistsError otherwise, nothing is overwritten), then the directory is synced
    (DirectorySyncError). If the block raises, `path` is untouched and the temporary file removed."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            # before the first byte (a key is never readable by others); the umask does not apply
            os.fchmod(f.fileno(), mode)
            yield f
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            os.link(tmp, path)  # atomic and never over an existing file, unlike a rename
            os.unlink(tmp)
        else:
            os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise
    _sync_directory(path.parent)


def atomic_write(path: str | Path, data: bytes | str, *, mode: int = 0o644, exclusive: bool = False) -> None:
    """Write `data` (str: as UTF-8) to `path` through `atomic_file`."""
    with atomic_file(path, mode=mode, exclusive=exclusive) as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """A new folder beside `path` to fill (write its files with `atomic_write`, so that they are
    synced too). When the block ends normally it is renamed to `path`, which must be absent or an
    empty folder, and the parent is synced; if the block raises, it is removed and `path` untouched."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir()  # plain mkdir (not mkdtemp, 0700): the folder gets the user's usual permissions
    try:
        yield tmp
        _sync_directory(tmp)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _sync_directory(path.parent)
