"""The hospital's Flower ClientApp: a thin layer over client/hospital.py.

Which site a node is comes from its node config: `site-config` (deployment: the daemon's
`--node-config 'site-config="/site/site.yaml"'`), or in simulation the `partition-id` Flower
injects, mapped onto the workspace's hospitals.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from .hospital import evaluate_round, train_round
from .workspace import list_hospitals


def site_path(context: Context, site_paths: list[Path] | None = None) -> Path:
    node = context.node_config
    if "site-config" in node:
        return Path(str(node["site-config"]))
    if "partition-id" in node:
        paths = site_paths
        if paths is None and context.run_config.get("workspace"):
            paths = list_hospitals(Path(str(context.run_config["workspace"])))
        if paths:
            return paths[int(node["partition-id"]) % len(paths)]
    raise RuntimeError("node config has no 'site-config' (path to this hospital's site.yaml)")


def make_client_app(site_paths: list[Path] | None = None, torch_threads: int | None = None) -> ClientApp:
    app = ClientApp()

    def setup() -> None:
        logging.getLogger("fedprompt").setLevel(logging.INFO)
        if torch_threads:
            torch.set_num_threads(torch_threads)  # simulated hospitals share the host's cores

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        setup()
        return Message(content=train_round(msg.content, site_path(context, site_paths), run_id=str(msg.metadata.run_id)), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        setup()
        return Message(content=evaluate_round(msg.content, site_path(context, site_paths)), reply_to=msg)

    return app


# `flwr run .` / flower-supernode entry point (pyproject: [tool.flwr.app.components]).
app = make_client_app()
