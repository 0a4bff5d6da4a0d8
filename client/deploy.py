"""A hospital's process wrappers for a real deployment: the checks before its SuperNode starts, the
SuperNode's command line (Flower 1.42 flags) and its working folder. The aggregator's are in
server/deploy.py; see docs/deployment.md for the whole picture.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from fedprompt.common.config import SiteConfig
from fedprompt.common.deploy import toml_str
from fedprompt.common.errors import InputError, LedgerError, Problem
from fedprompt.common.pki import check_hospital_key, load_cert

from .ledger import PrivacyLedger


@dataclass
class HospitalCheck:
    site_path: Path
    hospital_id: str
    ledger: Path
    trusted_apps: list[str]


def check_hospital(site_path: Path, key: Path, root_certificates: Path) -> HospitalCheck:
    """Everything a hospital daemon needs, validated before the SuperNode starts (InputError)."""
    problems: list[Problem] = []
    site_path = Path(site_path)
    site = None
    try:
        site = SiteConfig.load(site_path)
    except InputError as exc:
        problems += exc.problems
    if site is not None:
        if not site.ledger.is_file():
            problems.append(
                Problem(
                    str(site.ledger),
                    None,
                    "ledger",
                    f"privacy ledger not found: create it once with `fedprompt privacy init --site {site_path}` "
                    "(never re-create a lost ledger on a site that has trained: restore it from backup)",
                )
            )
        else:
            try:
                PrivacyLedger.for_site(site)
            except LedgerError as exc:
                problems.append(Problem(str(site.ledger), None, "ledger", str(exc)))
            except InputError as exc:
                problems += exc.problems
        if site.labels is None:  # the daemon would refuse every message (client/hospital.py)
            problems.append(
                Problem(
                    str(site_path),
                    None,
                    "labels",
                    f"the label space is not pinned: run `fedprompt hospital labels --site {site_path} --federation "
                    "FEDERATION.yaml` (the aggregator's federation.yaml) before starting the daemon",
                )
            )
        for name in ("train", "validation"):
            p = getattr(site, name)
            if p is not None and not Path(p).is_file():
                problems.append(Problem(str(site_path), None, name, f"record file {p} not found"))
        if site.backbone is not None and not (Path(site.backbone) / "config.json").is_file():
            problems.append(
                Problem(str(site_path), None, "backbone", f"{site.backbone} is not a model directory (no config.json)")
            )
    for check in (lambda: check_hospital_key(key), lambda: load_cert(root_certificates)):
        try:
            check()
        except InputError as exc:
            problems += exc.problems
    if problems:
        raise InputError(problems)
    assert site is not None
    return HospitalCheck(site_path.resolve(), site.hospital_id, site.ledger, list(site.trusted_apps))


def supernode_argv(
    *,
    superlink: str,
    root_certificates: Path,
    key: Path,
    site_path: Path,
    runtime_host: str = "127.0.0.1",
    runtime_port: int = 9094,
    max_retries: int | None = None,
    max_wait_time: float | None = None,
    isolation: str = "subprocess",
    trusted_entities: Path | None = None,
) -> list[str]:
    argv = [
        sys.executable,
        "-P",
        "-m",
        "fedprompt.client.supernode_main",  # flower-supernode, idle poll 1 s (not 3 s)
        "--superlink",
        superlink,
        "--root-certificates",
        str(Path(root_certificates).resolve()),
        "--auth-supernode-private-key",
        str(Path(key).resolve()),
        "--node-config",
        f"site-config={toml_str(str(Path(site_path).resolve()), '--site')}",
        "--isolation",
        isolation,
        "--host",
        runtime_host,
        "--port",
        str(runtime_port),
    ]
    if max_retries is not None:
        argv += ["--max-retries", str(max_retries)]
    if max_wait_time is not None:
        argv += ["--max-wait-time", str(max_wait_time)]
    if trusted_entities is not None:
        argv += ["--trusted-entities", str(Path(trusted_entities).resolve())]
    return argv


def flwr_home_of(env: dict[str, str]) -> Path:
    """The FLWR_HOME a daemon started with `env` uses (Flower's default: ~/.flwr)."""
    return Path(env["FLWR_HOME"]) if env.get("FLWR_HOME") else Path.home() / ".flwr"


def site_flwr_home(ledger: Path) -> Path:
    """A hospital daemon's FLWR_HOME unless `--flwr-home` says otherwise: `LEDGER.flwr-home/`, beside
    the site's privacy ledger (like `LEDGER.anchor` and `LEDGER.noise-memo`). Per site: a ledger
    belongs to one hospital, so two daemons on one host never share it, as they would share ~/.flwr
    or an inherited $FLWR_HOME. Writable: the daemon writes the ledger's folder anyway, while
    site.yaml and the records may be read-only. What Flower keeps there (installed app bundles,
    caches) is disposable and needs no backup."""
    return ledger.with_name(ledger.name + ".flwr-home")
