"""The layers stay apart: common/ (what both sides share) imports neither client/ nor server/; the
aggregator's code (server/) never reaches into the hospital's (client/), and the hospital's never into
the aggregator's, not even lazily inside a function, and none starts the other's module by name
(`-m fedprompt.client...`). Code both sides need lives in common/; code that runs both sides in one
process (the simulation, the CLI) lives in fedprompt/. Outside benchmarks/, no function runs over 80 lines."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# folder -> the fedprompt packages its modules must not import (third-party and the standard library
# are free; so is fedprompt's own top level, which no layer below it imports today either).
FORBIDDEN = {"common": ("client", "server"), "client": ("server",), "server": ("client",)}
# References that name the other side without importing or starting it.
ALLOWED = {
    # the ServerApp a code-free bundle must name: the hospital compares the string, never imports it
    "client/bundle.py: fedprompt.server.server_app:app",
}


def _package_of(path: Path, root: Path) -> str:
    """`server/strategies/krum.py` -> fedprompt.server.strategies: the package its relative imports start in."""
    return ".".join(["fedprompt", *path.relative_to(root).parent.parts])


def _references(path: Path, root: Path, forbidden: tuple[str, ...]) -> list[str]:
    """`file:line: name` of each import of a forbidden fedprompt package (absolute, or relative from
    the file's own package) and of each string naming one, in line order."""
    bad = tuple(f"fedprompt.{name}" for name in forbidden)

    def hit(name: str) -> bool:
        return any(name == b or name.startswith(b + ".") for b in bad)

    package = _package_of(path, root).split(".")
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            # `from .x import y` is <package>.x; each further dot climbs one package up
            parent = package[: len(package) - node.level + 1] if node.level else []
            base = ".".join(filter(None, [*parent, node.module]))
            names = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names = [word for word in node.value.split() if hit(word)]
        else:
            continue
        hits = [name for name in names if hit(name)]
        if hits:
            found.append((node.lineno, f"{path.relative_to(root)}:{node.lineno}: {hits[0]}"))
    return [ref for _, ref in sorted(found)]


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_each_layer_imports_only_what_lies_below_it(folder):
    files = sorted((ROOT / folder).rglob("*.py"))
    assert len(files) > 5, folder  # subpackages (server/strategies/) included
    refs = [ref for path in files for ref in _references(path, ROOT, FORBIDDEN[folder])]
    assert [ref for ref in refs if re.sub(r":\d+: ", ": ", ref, count=1) not in ALLOWED] == []


def test_the_check_sees_every_form_of_import(tmp_path):
    sample = tmp_path / "server" / "strategies" / "sample.py"
    sample.parent.mkdir(parents=True)
    sample.write_text(
        "import fedprompt.client.ledger\n"
        "from fedprompt.client import hospital\n"
        "from fedprompt import client\n"
        "from ...client.records import load_records\n"
        "from ... import client\n"
        "def later():\n"
        "    from fedprompt.client.dp import plan_steps\n"
        "ARGV = ['-m', 'fedprompt.client.supernode_main']\n"
        "from fedprompt.common.records import load_records\n"
        "from ..federation import prepare_run\n"
        "from .. import client_names\n"
        "from .registry import register\n"
    )
    refs = _references(sample, tmp_path, ("client",))
    assert [ref.split(":")[1] for ref in refs] == ["1", "2", "3", "4", "5", "7", "8"]
    assert refs[3] == "server/strategies/sample.py:4: fedprompt.client.records"
    # common/ is checked against both sides
    shared = tmp_path / "common" / "wire.py"
    shared.parent.mkdir()
    shared.write_text(
        "from ..server.history import HospitalOutcome\nfrom .schema import Schema\nimport fedprompt.client\n"
    )
    assert [ref.split(": ")[1] for ref in _references(shared, tmp_path, FORBIDDEN["common"])] == [
        "fedprompt.server.history",
        "fedprompt.client",
    ]


# Every function outside benchmarks/ reads in one screen or two: a longer one is split into named steps.
MAX_FUNCTION_LINES = 80
PRODUCT = ("common", "client", "server", "fedprompt", "docker")


def _long_functions(path: Path, root: Path) -> list[str]:
    """`file:line: name (N lines)` of each function or method (nested ones too) over MAX_FUNCTION_LINES,
    counted from its `def` to its last line."""
    return [
        f"{path.relative_to(root)}:{node.lineno}: {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path)))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]


def test_no_function_outside_benchmarks_is_over_80_lines():
    # fedprompt/ links to the three layers: each file is read once, by its real path
    files = sorted({path.resolve() for folder in PRODUCT for path in (ROOT / folder).rglob("*.py")})
    assert len(files) > 50
    assert [hit for path in files for hit in _long_functions(path, ROOT)] == []


def test_the_length_check_counts_from_def_to_last_line(tmp_path):
    lines = [f"x{i} = {i}" for i in range(MAX_FUNCTION_LINES - 1)]  # under the def: 80 lines in all
    module = tmp_path / "server" / "m.py"
    module.parent.mkdir()
    module.write_text(
        "def fits():\n"
        + "".join(f"    {line}\n" for line in lines)
        + "\n\nclass C:\n    def over(self):\n"
        + "".join(f"        {line}\n" for line in [*lines, "return x0"])
    )
    assert _long_functions(module, tmp_path) == ["server/m.py:84: over (81 lines)"]
