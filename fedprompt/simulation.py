"""A whole federation on one machine: one virtual node per hospital of a workspace, the same
ServerApp and ClientApp code as the deployment, on Flower's simulation engine (Ray) or on the
in-process engine (fedprompt/local_engine.py: no Ray, every hospital in this process). Both sides
run in this one process, so this module lives outside server/ and client/ and imports both."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from fedprompt.client.client_app import make_client_app
from fedprompt.client.comparison import compare_site
from fedprompt.client.workspace import create_ledgers, list_hospitals, load_workspace
from fedprompt.common.atomic import atomic_write
from fedprompt.common.config import SiteConfig
from fedprompt.common.errors import InputError, Problem
from fedprompt.common.logs import CONSOLE, captured_output
from fedprompt.common.plan import initial_global_state_for
from fedprompt.common.records import load_records
from fedprompt.local_engine import ENGINES, run_local
from fedprompt.server.federation import PreparedRun, RunSpec, prepare_run
from fedprompt.server.history import read_metrics
from fedprompt.server.outcome import NOTHING_TRAINED
from fedprompt.server.server_app import make_server_app

log = logging.getLogger("fedprompt.server")


LOG_NAME = "simulate.log"  # in RUN_DIR/logs/: Flower's, Ray's and the simulated hospitals' output
# A hospital's Ray actor whose process dies (Ray's memory monitor, the kernel's OOM killer, a crash)
# is restarted by Ray up to ACTOR_RESTARTS times in a run, and the message it was handling, or one
# sent to it while it restarted, is handed to the restarted actor MESSAGE_RETRIES more time(s). A
# message the site had begun may so be charged twice in its ledger: an over-count, never an
# under-count. Bounded: an actor that keeps dying ends as a failed hospital, never a hung run.
ACTOR_RESTARTS = 3
MESSAGE_RETRIES = 1


def require_ray() -> None:
    """Flower's simulation engine runs on Ray, an optional dependency (hospitals and the aggregator
    never need it)."""
    if importlib.util.find_spec("ray") is None:
        raise InputError.at(
            "fedprompt simulate",
            "needs Ray (Flower's simulation engine), which is not installed here: "
            "install fedprompt[simulation] (pip install 'fedprompt[simulation]')",
        )


def _not_run_simulation_deprecation(record: logging.LogRecord) -> bool:
    return "`run_simulation` function is deprecated" not in record.getMessage()


def ensure_ledgers(workspace: Path) -> list[str]:
    """Create the ledgers of a workspace's sites that have none yet (the operator's `privacy init`):
    client/workspace.create_ledgers, which says where that is right (a workspace written moments
    ago by the same command or a test; anywhere else a missing ledger may be a LOST one)."""
    return create_ledgers(workspace)


def check_ledgers(sites: list[SiteConfig]) -> None:
    """Every site must already have its ledger: one is created once in a site's life, by its
    operator; silently creating it here would forget the epsilon of a site whose ledger was lost.
    (Bad input, exit 2, like `fedprompt hospital start` on a site without a ledger.)"""
    problems = [
        Problem(
            str(site.ledger),
            None,
            "ledger",
            f"hospital {site.hospital_id} has no privacy ledger: create it once with `fedprompt privacy init --site "
            f"{site.source}` (never re-create a lost ledger on a site that has trained: restore it from backup)",
        )
        for site in sites
        if not os.path.lexists(site.ledger)
    ]
    if problems:
        raise InputError(problems)


def check_records(sites, labels: list[str]) -> None:
    """Every site's records, validated before anything starts (the operator holds them all here)."""
    problems = []
    for site in sites:
        for path in filter(None, (site.train, site.validation, site.test)):
            try:
                load_records(path, text_field=site.text_field, label_field=site.label_field, labels=labels)
            except InputError as exc:
                problems += exc.problems
    if problems:
        raise InputError(problems)


def simulate(
    workspace: Path,
    out_dir: Path,
    *,
    rounds: int | None = None,
    resume: bool = False,
    stop_after: int | None = None,
    backbone: Path | None = None,
    non_private: bool = False,
    create_ledgers: bool = False,
    verbose: bool = False,
    engine: str = "ray",
    compare: bool = True,
) -> dict:
    """`create_ledgers`: only for a workspace this same command has just written (the fresh demo);
    otherwise a site without its ledger stops the run before anything trains (`check_ledgers`).
    Flower's, Ray's and the hospitals' output goes to OUT/logs/simulate.log, and with `verbose`
    to the console too (common/logs.captured_output).
    `engine`: "ray" (Flower's simulation engine) or "local" (fedprompt/local_engine.py: the same
    apps, each hospital's messages handled in this process, one after another).
    `compare`: measure each hospital's zero-shot / alone / federated / personalised models on its
    local test split (comparison.json; cross-validated personalisation at every site: the slowest
    part of a small run).
    Returns metrics.json's content; when no hospital trained (`outcome` NOTHING_TRAINED) there is
    no export and no per-hospital comparison; a "partly trained" run has both (server/outcome.py)."""
    if engine not in ENGINES:
        raise InputError.at("fedprompt simulate", f"unknown engine {engine!r} (one of {', '.join(ENGINES)})")
    if engine == "ray":
        require_ray()
    fed, sites, test = load_workspace(workspace)
    check_records(sites, fed.label_names)
    if rounds is not None:
        fed = fed.replaced(rounds=rounds, origin="--rounds")
    if non_private:
        fed = fed.replaced(privacy=fed.privacy.replaced(private=False))
    run = prepare_run(
        RunSpec(fed, out_dir, test, backbone, resume=resume, stop_after=stop_after, expected_hospitals=len(sites))
    )
    # Private or not: a non-private round is recorded in the ledger too (epsilon infinite from then on).
    if create_ledgers:
        for h in ensure_ledgers(workspace):
            log.info("created privacy ledger for hospital %s", h, extra=CONSOLE)
    else:
        check_ledgers(sites)
    server_app = make_server_app(run)
    site_paths = list_hospitals(workspace)
    backend = _ray_backend(len(sites)) if engine == "ray" else None  # (imports Ray before the capture)
    # Flower logs through its own handler; without this a root handler set up by a dependency
    # prints every line twice.
    flwr_logger = logging.getLogger("flwr")
    flwr_logger.propagate = False
    log_file = out_dir / "logs" / LOG_NAME
    with captured_output(log_file, verbose=verbose):
        if backend is not None:
            _run_on_ray(server_app, make_client_app(site_paths, torch_threads=1), len(sites), backend)
        else:
            # One process: the hospitals take turns on its threads and share its caches.
            run_local(server_app, make_client_app(site_paths), [site.hospital_id for site in sites])
        metrics_path = out_dir / "metrics.json"
        if not metrics_path.exists() or (run.history and run.history[-1]["round"] < run.done):
            raise RuntimeError(f"the simulation ended without finishing the run (see {log_file})")
        metrics = read_metrics(metrics_path)
        if metrics["outcome"] == NOTHING_TRAINED or not compare:  # (no federated model: metrics.json says why)
            return metrics
        metrics["hospital_comparison"] = compare_hospitals(run, sites)
    atomic_write(out_dir / "comparison.json", (json.dumps(metrics["hospital_comparison"], indent=1) + "\n").encode())
    return metrics


def _ray_backend(n: int) -> dict[str, dict[str, Any]]:
    """Flower's Ray backend config for `n` hospitals. Imports Ray: call it before `captured_output`
    (Ray binds its log handler to the console at import; the capture detaches it)."""
    gpus = (1.0 / min(n, 4)) if torch.cuda.is_available() else 0.0
    # The run's log keeps every hospital's lines, which Ray would merge by default.
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    import ray  # noqa: F401

    return {
        # Flower passes these to the actors' `.options()` (ray_transport/ray_actor.py BasicActorPool).
        "client_resources": {
            "num_cpus": 1,
            "num_gpus": gpus,
            "max_restarts": ACTOR_RESTARTS,
            "max_task_retries": MESSAGE_RETRIES,
        },
        # log_to_driver: the actors' (hospitals') output comes to this process, which files it.
        "init_args": {
            # one actor per hospital at most: more would sit idle, each a process with its own memory
            "num_cpus": min(os.cpu_count() or 1, n),
            "include_dashboard": False,
            "log_to_driver": True,
            "logging_level": logging.WARNING,
        },
    }


def _run_on_ray(server_app, client_app, n: int, backend: dict) -> None:
    from flwr.simulation import run_simulation

    flwr_logger = logging.getLogger("flwr")
    # Flower 1.42 deprecates run_simulation for `flwr run`, which starts a packaged app in other
    # processes (flwr-simulation, then this same engine). This command hands the ServerApp a run
    # it has validated here (workspace, records, ledgers, backbone) and reads the outcome in this
    # process, so it keeps the engine's Python entry and drops the notice.
    flwr_logger.addFilter(_not_run_simulation_deprecation)
    # Flower's Ray backend exports PYTHONPATH (this interpreter's sys.path) into this process'
    # environment for good: every program started afterwards (a notebook's, the caller's) would
    # import this venv's packages. Restored when the simulation ends.
    pythonpath = os.environ.get("PYTHONPATH")
    try:
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=n, backend_config=backend)
    finally:
        flwr_logger.removeFilter(_not_run_simulation_deprecation)
        if pythonpath is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = pythonpath


def compare_hospitals(run: PreparedRun, sites: list[SiteConfig]) -> list[dict]:
    """Each site with a local test split: zero-shot, alone, federated, personalised (client/comparison.py).
    The simulation's operator holds every site's records, so it can measure what each one gains."""
    fed = run.spec.federation
    initial = initial_global_state_for(fed, run.backbone)
    return [
        row for site in sites if (row := compare_site(site, run.backbone, run.prompt, initial, run.state)) is not None
    ]
