"""The aggregator's Flower ServerApp: a thin layer over server/federation.py."""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedprompt.common.config import FederationConfig

from .federation import PreparedRun, RunSpec, execute, prepare_run


def make_server_app(run: PreparedRun | None = None) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        execute(grid, run if run is not None else prepare_run(spec_from_run_config(context.run_config)))

    return app


def spec_from_run_config(cfg) -> RunSpec:
    """`flwr run` path: `--run-config 'workspace="/ws" out="/runs/x"'`; keys declared in
    pyproject.toml's [tool.flwr.app.config] (workspace, out, rounds, backbone, resume)."""
    workspace = Path(str(cfg.get("workspace") or "."))
    fed = FederationConfig.load(workspace / "federation.yaml")
    if int(cfg.get("rounds") or 0) > 0:
        fed.rounds = int(cfg["rounds"])
    test = workspace / "test.csv"
    out = Path(str(cfg.get("out") or workspace / "runs" / fed.name))
    backbone = Path(str(cfg["backbone"])) if cfg.get("backbone") else None
    return RunSpec(fed, out, test if test.exists() else None, backbone, resume=bool(cfg.get("resume", False)))


app = make_server_app()
