"""common/atomic.py, the one way files are written: whole or not at all, with the mode asked for,
never over an existing file when exclusive; a workspace appears whole or not at all. (The ledger's
use of it under disk faults: tests/test_ledger.py, tests/test_faults_inputs.py.)"""

from __future__ import annotations

import os
import stat

import pytest

from fedprompt.cli import main
from fedprompt.common.atomic import atomic_directory, atomic_file, atomic_write


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_write_replaces_whole_with_the_mode_asked_for(tmp_path):
    path = tmp_path / "f.txt"
    atomic_write(path, "first")
    assert path.read_text() == "first" and _mode(path) == 0o644
    atomic_write(path, b"second", mode=0o600)
    assert path.read_bytes() == b"second" and _mode(path) == 0o600
    assert os.listdir(tmp_path) == ["f.txt"]  # no temporary file left


def test_a_failed_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "f.txt"
    atomic_write(path, "old")
    with pytest.raises(RuntimeError), atomic_file(path) as f:
        f.write(b"half of the new")
        raise RuntimeError("crash mid-write")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["f.txt"]


def test_exclusive_never_overwrites(tmp_path):
    path = tmp_path / "key"
    atomic_write(path, "mine", mode=0o600, exclusive=True)
    with pytest.raises(FileExistsError):
        atomic_write(path, "theirs", mode=0o600, exclusive=True)
    assert path.read_text() == "mine" and _mode(path) == 0o600 and os.listdir(tmp_path) == ["key"]


def test_pki_keys_are_0600_and_never_overwritten(tmp_path, capsys):
    assert main(["pki", "init", "--out", str(tmp_path / "pki"), "--host", "127.0.0.1"]) == 0
    assert main(["pki", "hospital", "--id", "h1", "--out", str(tmp_path / "keys")]) == 0
    modes = {p.name: _mode(p) for p in [*(tmp_path / "pki").iterdir(), *(tmp_path / "keys").iterdir()]}
    assert modes == {
        "ca.key": 0o600,
        "server.key": 0o600,
        "ca.pem": 0o644,
        "server.pem": 0o644,
        "h1.key": 0o600,
        "h1.pub": 0o644,
    }
    before = (tmp_path / "keys" / "h1.key").read_bytes()
    assert main(["pki", "hospital", "--id", "h1", "--out", str(tmp_path / "keys")]) == 2
    assert "already exists; refusing to overwrite" in capsys.readouterr().err
    assert (tmp_path / "keys" / "h1.key").read_bytes() == before


def test_a_directory_appears_whole_or_not_at_all(tmp_path):
    with atomic_directory(tmp_path / "ws") as tmp:
        atomic_write(tmp / "a.txt", "a")
        (tmp / "sub").mkdir()
        atomic_write(tmp / "sub" / "b.txt", "b")
        assert not (tmp_path / "ws").exists()
    assert (tmp_path / "ws" / "sub" / "b.txt").read_text() == "b"
    with pytest.raises(RuntimeError), atomic_directory(tmp_path / "other") as tmp:
        atomic_write(tmp / "a.txt", "a")
        raise RuntimeError("crash mid-way")
    assert sorted(os.listdir(tmp_path)) == ["ws"]
