"""Dependencies by role (pyproject.toml, docker/) and the files the aggregator writes with a library."""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_ray_only_where_simulation_runs():
    project = _project()
    core = project["project"]["dependencies"]
    extras = project["project"]["optional-dependencies"]
    assert "flwr==1.42.*" in core and not any("simulation" in d or d.startswith("ray") for d in core)
    assert extras["simulation"] == ["flwr[simulation]==1.42.*"]
    assert "fedprompt[simulation]" in extras["test"]  # README's test command installs what the tests run
    assert any(d.startswith("jinja2") for d in core) and any(d.startswith("matplotlib") for d in core)  # the report
    for dockerfile in (ROOT / "docker").glob("Dockerfile*"):  # hospital and aggregator images: no Ray
        text = dockerfile.read_text(encoding="utf-8")
        assert "pip install ." in text and not re.search(
            r"pip install[^\n]*(\[simulation\]|\bray\b)", text, re.IGNORECASE
        ), dockerfile
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert 'pip install -e ".[simulation]" && fedprompt simulate --out runs/demo' in readme


def test_fedprompt_holds_links_to_the_three_top_folders():
    """common/, client/ and server/ stay at the top; fedprompt/ links to them, so that one folder is the
    package that setuptools, an editable install, mypy and IDEs read (pyproject.toml [tool.setuptools])."""
    for name in ("common", "client", "server"):
        link = ROOT / "fedprompt" / name
        assert link.is_symlink() and os.readlink(link) == f"../{name}", link
        assert link.resolve() == (ROOT / name).resolve()
    assert "package-dir" not in _project()["tool"]["setuptools"]


def test_every_package_is_listed_for_setuptools():
    """A subpackage missing from the list would be left out of the wheel (the images install one),
    while an editable install still finds it."""
    found = {"fedprompt.app"}  # a data folder without __init__.py (Flower's code-free app)
    for folder, _, files in os.walk(ROOT / "fedprompt", followlinks=True):
        if "__init__.py" in files:
            found.add(".".join(Path(folder).relative_to(ROOT).parts))
    assert "fedprompt.server.strategies" in found
    assert set(_project()["tool"]["setuptools"]["packages"]) == found


def test_report_template_ships_as_package_data():
    data = _project()["tool"]["setuptools"]["package-data"]["fedprompt.server"]
    assert data == ["templates/*.j2"] and list((ROOT / "server" / "templates").glob("*.j2"))


def test_connection_file_is_toml_whatever_the_path(tmp_path):
    from fedprompt.server import deploy

    ca = tmp_path / 'odd "dir" \\ name' / "ca.pem"
    path = deploy.write_connection(tmp_path / "state", "10.0.0.5:8000", ca)
    doc = tomllib.loads(path.read_text(encoding="utf-8"))
    assert doc["superlink"] == {
        "default": deploy.CONNECTION,
        deploy.CONNECTION: {"address": "10.0.0.5:8000", "root-certificates": str(ca.resolve())},
    }


@pytest.mark.subprocess
def test_flower_telemetry_is_off_in_every_fedprompt_process():
    """Flower sends usage events to Flower Labs unless FLWR_TELEMETRY_ENABLED=0 when it is first
    imported; importing fedprompt first (every command, daemon, worker and the API do) turns it off."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "FLWR_TELEMETRY_ENABLED"}
    code = (
        "import fedprompt.client.executor; from flwr.supercore import telemetry; "
        "print(telemetry.FLWR_TELEMETRY_ENABLED)"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "0"
