"""The aggregator's code never reaches into the hospital's: server/ imports only common/ (and Flower,
the standard library, third-party packages), never client/, not even lazily inside a function, and
starts no hospital module by name (`-m fedprompt.client...`). Code both sides need lives in common/;
code that runs both sides in one process (the simulation) lives in fedprompt/."""

from __future__ import annotations

import ast
from pathlib import Path

SERVER = Path(__file__).resolve().parent.parent / "server"


def _is_client(name: str) -> bool:
    return name == "fedprompt.client" or name.startswith("fedprompt.client.")


def _client_references(path: Path) -> list[str]:
    """`file:line: name` of each import of fedprompt.client (absolute, or relative from server/) and
    of each string naming it, in line order."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                base = node.module or ""
            else:  # `from .x import y` is fedprompt.server.x; `from ..x import y`, fedprompt.x
                base = ".".join(filter(None, ["fedprompt", "server" if node.level == 1 else None, node.module]))
            names = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names = [word for word in node.value.split() if _is_client(word)]
        else:
            continue
        hits = [name for name in names if _is_client(name)]
        if hits:
            found.append((node.lineno, f"{path.name}:{node.lineno}: {hits[0]}"))
    return [ref for _, ref in sorted(found)]


def test_server_never_imports_the_hospital_side():
    files = sorted(SERVER.glob("*.py"))
    assert files, SERVER
    assert [ref for path in files for ref in _client_references(path)] == []


def test_the_check_sees_every_form_of_import(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import fedprompt.client.ledger\n"
        "from fedprompt.client import hospital\n"
        "from fedprompt import client\n"
        "from ..client.records import load_records\n"
        "from .. import client\n"
        "def later():\n"
        "    from fedprompt.client.dp import plan_steps\n"
        "ARGV = ['-m', 'fedprompt.client.supernode_main']\n"
        "from fedprompt.common.records import load_records\n"
        "from .federation import prepare_run\n"
    )
    assert [ref.split(":")[1] for ref in _client_references(sample)] == ["1", "2", "3", "4", "5", "7", "8"]
