"""Watching a site-local command: what it opened, wrote and tried to send, and what changed on disk.

For the commands that promise to stay at the site (`fedprompt personalize`, `fedprompt audit`):
`socket.socket` and `socket.create_connection` raise, and one process-wide audit hook records
every file opened (with whether for writing) and every socket event (also a socket made without
the patched module attributes) while a `watched()` block runs.
"""

from __future__ import annotations

import hashlib
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest


def snapshot(root: Path) -> dict[str, tuple[str, int] | None]:
    """Every file (sha256, mtime) and folder (None) under root."""
    return {
        str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        if p.is_file()
        else None
        for p in root.rglob("*")
    }


@dataclass
class Watch:
    dials: list[tuple] = field(default_factory=list)  # calls of the patched socket constructors
    sockets: list[str] = field(default_factory=list)  # socket audit events
    opened: list[str] = field(default_factory=list)  # resolved paths of every file opened
    written: list[str] = field(default_factory=list)  # paths opened for writing
    changed: set[str] = field(default_factory=set)  # paths under root added, removed or modified


_current: Watch | None = None  # an audit hook cannot be removed: it records only while a block runs


def _hook(event: str, args: tuple) -> None:
    if _current is None:
        return
    if event.startswith("socket."):
        _current.sockets.append(event)
    elif event == "open" and args and isinstance(args[0], (str, Path)):
        _current.opened.append(str(Path(args[0]).resolve()))
        mode, flags = (args[1] if len(args) > 1 else ""), (args[2] if len(args) > 2 else 0)
        if any(c in str(mode or "") for c in "wax+") or (isinstance(flags, int) and flags & 0o3):
            _current.written.append(str(args[0]))


sys.addaudithook(_hook)


@contextmanager
def watched(root: Path) -> Iterator[Watch]:
    """Run the block with sockets forbidden and its file and socket activity recorded; on exit,
    `changed` holds what differs under `root` from before the block."""
    global _current
    watch = Watch()

    def forbidden(*args, **kwargs):
        watch.dials.append(args)
        raise OSError("a site-local command must not open a socket")

    before = snapshot(root)
    patch = pytest.MonkeyPatch()
    patch.setattr(socket, "socket", forbidden)
    patch.setattr(socket, "create_connection", forbidden)
    _current = watch
    try:
        yield watch
    finally:
        _current = None
        patch.undo()
        after = snapshot(root)
        watch.changed = {k for k in before.keys() | after.keys() if before.get(k, "gone") != after.get(k, "new")}
