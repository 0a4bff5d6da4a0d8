"""docker-compose.yml keeps the deployment's topology (parsed with yaml; `docker-compose config -q` if present)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DAEMON = re.compile(r"^hospital-(\d+)(-gpu)?$")
HOSPITAL_ANY = re.compile(r"^hospital-(\d+)(-\w+)?$")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def mounts(service: dict) -> list[tuple[str, str, str]]:
    """(source, target, mode) of each volume entry (short or long syntax)."""
    out = []
    for v in service.get("volumes", []):
        if isinstance(v, dict):
            out.append((v.get("source", ""), v["target"], "ro" if v.get("read_only") else "rw"))
        else:
            parts = v.split(":")
            out.append((parts[0], parts[1], parts[2] if len(parts) > 2 else "rw"))
    return out


def networks(service: dict) -> set[str]:
    n = service.get("networks", [])
    return set(n) if isinstance(n, list) else set(n or {})


def daemons(compose: dict) -> dict[str, tuple[str, dict]]:
    return {name: (m.group(1), s) for name, s in compose["services"].items() if (m := DAEMON.match(name))}


def test_three_hospitals_and_gpu_variants(compose):
    d = daemons(compose)
    assert sorted(n for n in d if not n.endswith("-gpu")) == ["hospital-1", "hospital-2", "hospital-3"]
    for name, (_, service) in d.items():
        gpu = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")
        if name.endswith("-gpu"):
            assert service.get("profiles") == ["gpu"] and gpu and gpu[0]["capabilities"] == ["gpu"], name
            assert "Dockerfile.cuda" in service["build"]["dockerfile"]
        else:
            assert not service.get("profiles") and not gpu, name


def test_no_hospital_service_mounts_another_hospitals_volumes(compose):
    for name, service in compose["services"].items():
        m = HOSPITAL_ANY.match(name)
        if not m:
            # aggregator-side services never mount a hospital's data, ledger or key
            assert not any(src.startswith("hospital-") for src, _, _ in mounts(service)), name
            continue
        for src, _, _ in mounts(service):
            assert not src.startswith(("/", ".", "~")), f"{name}: host bind mount {src}"
            other = re.match(r"^hospital-(\d+)-", src)
            assert other is None or other.group(1) == m.group(1), f"{name} mounts {src}"


def test_data_read_only_and_own_ledger_and_anchor_volumes(compose):
    """The ledger's anchor lives on its own volume: restoring an old copy of the ledger's volume
    leaves the anchor that shows the rollback."""
    ledgers: dict[str, str] = {}
    for name, (hid, service) in daemons(compose).items():
        by_target = {t: (src, mode) for src, t, mode in mounts(service)}
        assert by_target["/data"] == (f"hospital-{hid}-data", "ro"), name
        assert by_target["/key"] == (f"hospital-{hid}-key", "ro"), name
        assert by_target["/ledger"] == (f"hospital-{hid}-ledger", "rw"), name
        assert by_target["/anchor"] == (f"hospital-{hid}-anchor", "rw"), name
        assert ledgers.setdefault(hid, by_target["/ledger"][0]) == by_target["/ledger"][0]
        writable = sorted(t for _, t, mode in mounts(service) if mode != "ro")
        assert writable == ["/anchor", "/ledger"], f"{name}: writable mounts {writable}"
        assert service.get("read_only") is True, name
        command = service["command"]
        assert command[:2] == ["hospital", "start"] and "fleet-proxy:9443" in command
    assert len(set(ledgers.values())) == 3  # one ledger volume per hospital
    for hid in ledgers:  # the seeding step writes site.yaml's ledger_anchor onto that volume
        setup = compose["services"][f"hospital-{hid}-setup"]
        assert (f"hospital-{hid}-anchor", "/anchor", "rw") in mounts(setup)
        assert setup["command"][-2:] == ["--anchor", "/anchor"]


def test_hospitals_reach_only_the_proxy(compose):
    services = compose["services"]
    nets = compose["networks"]
    assert all(cfg and cfg.get("internal") is True for cfg in nets.values()), "every network is internal"
    for name, (hid, service) in daemons(compose).items():
        assert networks(service) == {f"hospital-{hid}-net"}, name
    for net in (n for n in nets if n.startswith("hospital-")):
        hid = re.match(r"hospital-(\d+)-net", net).group(1)
        members = {n for n, s in services.items() if net in networks(s)}
        assert members == {n for n in (f"hospital-{hid}", f"hospital-{hid}-gpu", "fleet-proxy") if n in services}, (
            net,
            members,
        )
    # The SuperLink (Control API, no auth) is on the aggregator's internal network only, unpublished.
    assert networks(services["superlink"]) == {"aggregator-internal"}
    assert "ports" not in services["superlink"]
    assert "aggregator-internal" in networks(services["fleet-proxy"])
    assert "--upstream" in services["fleet-proxy"]["command"]
    # Hospital set-up steps run without any network.
    for name, service in services.items():
        if HOSPITAL_ANY.match(name) and not DAEMON.match(name):
            assert service.get("network_mode") == "none", name


def test_dockerfiles():
    for name in ("Dockerfile", "Dockerfile.cuda"):
        text = (ROOT / "docker" / name).read_text()
        assert re.search(r"^FROM python:3\.11-slim", text, re.M), name
        users = re.findall(r"^USER (\S+)", text, re.M)
        assert users and users[-1] not in ("root", "0"), name
        assert "HEALTHCHECK" in text and "HF_HUB_OFFLINE=1" in text and "TRANSFORMERS_OFFLINE=1" in text
        assert "load_backbone()" in text  # the embedded backbone is checked at build time
        # the app the submitter sends is the one installed with the package (fedprompt/app), no copy of it
        assert "default_app()" in text and "docker/app" not in text and "FEDPROMPT_APP" not in text, name
    assert "whl/cu" in (ROOT / "docker" / "Dockerfile.cuda").read_text()


@pytest.mark.subprocess
@pytest.mark.parametrize("profile", [None, "gpu", "run"])
def test_docker_compose_config_is_valid(profile):
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose not installed (apt-get install -y docker-compose)")
    argv = [exe, "-f", str(COMPOSE)] + (["--profile", profile] if profile else []) + ["config", "-q"]
    # Debian's docker-compose is a system-Python program: nothing of this venv may leak into it (an
    # in-process Ray simulation earlier in the session exports PYTHONPATH with the venv's packages).
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr


@pytest.mark.subprocess
def test_demo_seeding_never_recreates_a_lost_ledger(tmp_path):
    """The compose demo's seeding step creates a hospital's ledger only when it seeds the site in
    the same call; a site seeded earlier whose ledger volume is gone is refused (exit 3)."""
    import sys

    script = Path(__file__).resolve().parents[1] / "docker" / "demo_site.py"
    data, ledger = tmp_path / "data", tmp_path / "ledger"
    data.mkdir()
    ledger.mkdir()

    def seed() -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(script), "hospital", "--id", "1", "--data", str(data), "--ledger", str(ledger)],
            capture_output=True,
            text=True,
            timeout=300,
        )

    first = seed()
    assert first.returncode == 0, first.stderr
    book = ledger / "privacy-ledger.json"
    assert book.is_file() and (data / "site.yaml").is_file()
    # The demo sites carry docs/deployment.md's recommended private settings: one demo run (the
    # demo federation asks for 8) spends the lifetime cap, and nothing runs without DP.
    from fedprompt.common.config import SiteConfig

    site = SiteConfig.load(data / "site.yaml")
    assert (site.privacy.max_epsilon, site.allow_non_private) == (8.0, False)
    kept = book.read_bytes()
    assert seed().returncode == 0 and book.read_bytes() == kept  # idempotent: nothing touched
    book.unlink()
    lost = seed()
    assert lost.returncode == 3 and "restore it from a backup" in lost.stderr
    assert not book.exists()

    # The whole site lost but its ledger's anchor kept (its own volume, in real life: site.yaml's
    # ledger_anchor), which says the site has trained: seeding refuses to give it a new ledger.
    from fedprompt.client.ledger import PrivacyLedger

    (data / "site.yaml").unlink()
    assert seed().returncode == 0 and book.is_file()
    PrivacyLedger.open(book).record(1.0, 0.5, 4, epsilon_cap=8.0, run_id="demo", round=1)
    book.unlink()
    (data / "site.yaml").unlink()
    trained = seed()
    assert trained.returncode == 3 and "has trained" in trained.stderr, trained.stderr
    assert "Traceback" not in trained.stderr and not book.exists()
