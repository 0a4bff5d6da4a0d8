"""The aggregator's Flower ServerApp: a thin layer over server/federation.py."""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.superlink.grid import http_grid
from flwr.superlink.grid.http_grid import HttpGrid  # flwr 1.42's deployment Grid (server/grid.py)

from fedprompt.common.config import FederationConfig
from fedprompt.common.flower_polling import shorten_object_pull_backoff
from fedprompt.common.logs import ensure_handler

from .federation import PreparedRun, RunSpec, execute, prepare_run
from .grid import PromptGrid


def make_server_app(run: PreparedRun | None = None) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        ensure_handler()  # a deployment's flwr-serverapp: the rounds' lines go to the run's log
        if isinstance(grid, HttpGrid):  # a deployment: Flower's Grid waits 3 s between pulls for replies
            grid = PromptGrid(grid)
            shorten_object_pull_backoff(http_grid)  # and 1 s, 2 s, ... for the objects of a reply
        execute(grid, run if run is not None else prepare_run(spec_from_run_config(context.run_config)))

    return app


def spec_from_run_config(cfg) -> RunSpec:
    """`flwr run` path: `--run-config 'workspace="/ws" out="/runs/x"'`; keys declared in
    fedprompt/app/pyproject.toml's [tool.flwr.app.config] (workspace, out, rounds, backbone, resume)."""
    workspace = Path(str(cfg.get("workspace") or "."))
    fed = FederationConfig.load(workspace / "federation.yaml")
    if int(cfg.get("rounds") or 0) > 0:
        fed = fed.replaced(rounds=int(cfg["rounds"]), origin="run config 'rounds'")
    test = workspace / "test.csv"
    out = Path(str(cfg.get("out") or workspace / "runs" / fed.name))
    backbone = Path(str(cfg["backbone"])) if cfg.get("backbone") else None
    return RunSpec(fed, out, test if test.exists() else None, backbone, resume=bool(cfg.get("resume", False)))


app = make_server_app()
