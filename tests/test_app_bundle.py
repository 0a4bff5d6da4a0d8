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


@pytest.mark.subprocess
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


def _fab_with(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def test_a_zip_bomb_bundle_is_refused_from_its_metadata_without_inflating_it(no_env_app):
    """The issue's bundle: 918 KB on the wire, a pyproject.toml that inflates to 900 MiB (accepted
    after 14 s and +1.8 GB before). Refused from the central directory, before any inflating."""
    import time
    import tracemalloc

    from flwr.cli.build import build_fab_from_disk

    from fedprompt.client.bundle import MAX_UNCOMPRESSED_BYTES, untrusted_reason

    valid = build_fab_from_disk(default_app())
    with zipfile.ZipFile(io.BytesIO(valid)) as z:
        pyproject, manifest = z.read("pyproject.toml"), z.read(".info/CONTENT")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        with z.open("pyproject.toml", "w") as f:  # a real TOML head, then 900 MiB of padding
            f.write(pyproject)
            mib = b"\n" * (1 << 20)
            for _ in range(900):
                f.write(mib)
        z.writestr(".info/CONTENT", manifest)
    bomb = buf.getvalue()
    assert len(bomb) < 1 << 20  # it passes the bundle's byte limit: only the metadata can tell
    with zipfile.ZipFile(io.BytesIO(bomb)) as z:
        assert z.getinfo("pyproject.toml").file_size > 900 << 20

    tracemalloc.start()
    t0 = time.perf_counter()
    reason = untrusted_reason(bomb)
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"zip bomb of {len(bomb)} bytes refused in {seconds * 1000:.1f} ms, peak {peak / 1e6:.2f} MB")
    assert reason is not None and f"at most {MAX_UNCOMPRESSED_BYTES}" in reason and "'pyproject.toml'" in reason
    assert peak < 50e6

    # The same bomb declaring 2,000 bytes (local header and central directory both patched): the
    # read stops where the declared size ends, and the CRC of what was read fails.
    lying = bytearray(bomb)
    with zipfile.ZipFile(io.BytesIO(bomb)) as z:
        local, central = z.getinfo("pyproject.toml").header_offset + 22, z.start_dir + 24
    for offset in (local, central):
        lying[offset : offset + 4] = (2000).to_bytes(4, "little")
    tracemalloc.start()
    reason = untrusted_reason(bytes(lying))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert reason is not None and "unreadable" in reason and "CRC" in reason, reason
    assert peak < 50e6
    # Every member at most 100:1 (padding compresses ~1,000:1; a pyproject.toml ~3:1).
    padded = _fab_with({"pyproject.toml": pyproject + b"\n" * 500_000, ".info/CONTENT": manifest})
    assert "inflates" in (untrusted_reason(padded) or "")


def test_info_holds_only_flowers_manifest(no_env_app):
    from flwr.cli.build import build_fab_from_disk

    from fedprompt.client.bundle import MAX_MEMBERS, untrusted_reason

    valid = build_fab_from_disk(default_app())
    assert untrusted_reason(valid) is None  # what `flwr run` submits still passes
    with zipfile.ZipFile(io.BytesIO(valid)) as z:
        members = {n: z.read(n) for n in z.namelist()}
    extra = _fab_with({**members, ".info/payload.py": b"import os\n"})
    assert ".info/payload.py" in (untrusted_reason(extra) or "")
    assert untrusted_reason(_fab_with({**members, ".info/": b""})) is not None  # not even a folder entry
    no_manifest = _fab_with({"pyproject.toml": members["pyproject.toml"]})
    assert untrusted_reason(no_manifest) is None  # the manifest is Flower's, not the site's concern
    twice = io.BytesIO(valid)
    with zipfile.ZipFile(twice, "a") as z, pytest.warns(UserWarning, match="Duplicate name"):
        z.writestr("pyproject.toml", b'[tool.flwr.app.components]\nclientapp = "evil:app"\n')
    assert "twice" in (untrusted_reason(twice.getvalue()) or "")
    many = _fab_with({**members, **{f".info/{i}": b"" for i in range(MAX_MEMBERS)}})
    assert f"at most {MAX_MEMBERS}" in (untrusted_reason(many) or "")
