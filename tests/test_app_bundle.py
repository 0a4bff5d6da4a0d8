"""The Flower app `fedprompt aggregator run` submits by default: fedprompt/app, package data.

What it must be: a code-free app (its FAB is a pyproject.toml naming the installed fedprompt
components, never a .py file a hospital would import ahead of its installed package), found
through the installed package on an editable install and on a wheel install alike.
"""

from __future__ import annotations

import importlib
import io
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

import fedprompt
from fedprompt.commands.aggregator import default_app, packaged_app

ROOT = Path(__file__).resolve().parents[1]
COMPONENTS = {"serverapp": "fedprompt.server.server_app:app", "clientapp": "fedprompt.client.client_app:app"}


@pytest.fixture
def no_env_app(monkeypatch):
    monkeypatch.delenv("FEDPROMPT_APP", raising=False)


def test_default_app_is_the_package_data_folder_not_the_project_root(no_env_app, monkeypatch, tmp_path):
    app = default_app()
    assert app == packaged_app() == Path(fedprompt.__file__).resolve().parent / "app"
    assert app != ROOT and (app / "pyproject.toml").is_file()
    assert sorted(p.name for p in app.iterdir()) == ["pyproject.toml"]  # nothing else would travel with it
    # the project's pyproject.toml ships it as package data (the wheel check below builds one)
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "fedprompt.app" in setuptools["packages"] and setuptools["package-data"]["fedprompt.app"] == [
        "pyproject.toml"
    ]
    # the project root is no Flower app any more: only one [tool.flwr.app] to keep in step
    assert "flwr" not in tomllib.loads((ROOT / "pyproject.toml").read_text()).get("tool", {})
    monkeypatch.setenv("FEDPROMPT_APP", str(tmp_path))  # an operator's override still wins
    assert default_app() == tmp_path


def test_fab_of_the_default_app_is_code_free_and_names_the_installed_components(no_env_app):
    from flwr.cli.build import build_fab_from_disk

    fab = build_fab_from_disk(default_app())  # what `flwr run APP ...` submits (server/deploy.py)
    with zipfile.ZipFile(io.BytesIO(fab)) as z:
        names = z.namelist()
        config = tomllib.loads(z.read("pyproject.toml").decode())
    assert sorted(names) == [".info/CONTENT", "pyproject.toml"], names
    assert not [n for n in names if n.endswith((".py", ".pyc", ".so"))]
    assert len(fab) < 2048, len(fab)  # against ~1 MB when the project root was submitted
    assert config["tool"]["flwr"]["app"]["components"] == COMPONENTS
    for ref in COMPONENTS.values():  # each names an importable attribute of the installed package
        module, _, attr = ref.partition(":")
        assert getattr(importlib.import_module(module), attr) is not None
    assert config["project"]["name"] == "fedprompt" and config["project"]["version"] == fedprompt.__version__
    # the run-config keys server/server_app.py reads and `aggregator run` sets
    assert set(config["tool"]["flwr"]["app"]["config"]) == {"workspace", "out", "rounds", "backbone", "resume"}


def test_wheel_install_resolves_the_default_app_from_package_data(tmp_path):
    """Build the wheel from a copy of the sources (no build/ left in the working tree), install it
    into a folder, and ask that installed copy for its default app."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("fedprompt", "common", "client", "server"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    r = subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    (wheel,) = (tmp_path / "dist").glob("fedprompt-*.whl")
    with zipfile.ZipFile(wheel) as z:
        assert "fedprompt/app/pyproject.toml" in z.namelist()
    site = tmp_path / "site"
    r = subprocess.run(
        [*pip, "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    env = {k: v for k, v in os.environ.items() if k != "FEDPROMPT_APP"} | {"PYTHONPATH": str(site)}
    probe = (
        "import fedprompt; from fedprompt.commands.aggregator import default_app; print(fedprompt.__file__); "
        "print(default_app())"
    )
    r = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env
    )
    assert r.returncode == 0, r.stderr
    module, app = r.stdout.split()
    assert Path(module).resolve().parent == (site / "fedprompt").resolve()  # the wheel's copy, not the working tree
    assert Path(app) == (site / "fedprompt" / "app").resolve() and (Path(app) / "pyproject.toml").is_file()
