"""The in-process engine (fedprompt/local_engine.py) against Flower's Ray engine: the same apps, the
same federation, the same global model round by round; and the same ledger entries when private."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import edit_yaml, make_workspace
from flwr.app import Message, RecordDict
from flwr.clientapp import ClientApp
from safetensors.torch import load_file

from fedprompt.client.ledger import PrivacyLedger
from fedprompt.client.workspace import list_hospitals, load_workspace
from fedprompt.local_engine import LocalGrid
from fedprompt.simulation import ensure_ledgers, simulate

pytestmark = pytest.mark.slow

# Full-batch, non-private rounds: no sampling and no noise, so each site's local training is a
# deterministic function of the global model it receives (a non-private batch is the expected one,
# q x the declared size: with q 1 and a declared size above the site's 32 records, one batch holds
# every record, and shuffling only reorders the sum of one mean gradient). Both engines must then
# agree to float rounding, round by round.
DETERMINISTIC = {
    "rounds": 3,
    "model": {"n_virtual_tokens": 4, "max_length": 32},
    "training": {"local_epochs": 2, "batch_size": 1000, "lr": 0.5},
}
DECLARED_SIZE = 100.0
PRIVATE = {
    "rounds": 2,
    "model": {"n_virtual_tokens": 4, "max_length": 32},
    "training": {"local_epochs": 1, "batch_size": 8, "lr": 0.05},
    "privacy": {"target_epsilon": 8.0},
}


def _run(root: Path, tiny_dir: Path, engine: str, overrides: dict, **kw) -> tuple[Path, dict]:
    ws = make_workspace(root, tiny_dir, per_hospital=40, test_size=40, overrides=overrides)
    for site in list_hospitals(ws):
        edit_yaml(site, lambda d: d.update(weight=DECLARED_SIZE))
    ensure_ledgers(ws)
    return ws, simulate(ws, root / "out", backbone=tiny_dir, engine=engine, **kw)


@pytest.mark.simulation
def test_local_engine_trains_the_same_global_model_as_ray(tmp_path, tiny_dir):
    _, ray = _run(tmp_path / "ray", tiny_dir, "ray", DETERMINISTIC, non_private=True)
    _, local = _run(tmp_path / "local", tiny_dir, "local", DETERMINISTIC, non_private=True)
    assert [r["round"] for r in local["rounds"]] == [0, 1, 2, 3] == [r["round"] for r in ray["rounds"]]
    for a, b in zip(ray["rounds"], local["rounds"], strict=True):
        assert b["aggregated"] == a["aggregated"] == (a["round"] > 0)
        assert {h: o["status"] for h, o in b["hospitals"].items()} == {
            h: o["status"] for h, o in a["hospitals"].items()
        }
        for key in ("accuracy", "macro_f1", "loss"):
            assert b["test"][key] == pytest.approx(a["test"][key], abs=1e-5), (a["round"], key)
    # the model changed (the comparison is not of two untrained models) ...
    assert local["rounds"][-1]["test"]["loss"] != pytest.approx(local["rounds"][0]["test"]["loss"], abs=1e-3)
    # ... and the exported tensors are the same to float rounding
    exported = [load_file(tmp_path / e / "out" / "export" / "prompt.safetensors") for e in ("ray", "local")]
    assert exported[0].keys() == exported[1].keys()
    for key in exported[0]:
        torch.testing.assert_close(exported[1][key], exported[0][key], atol=1e-5, rtol=1e-5)
    # simulate's shared tail ran on both: the per-hospital comparison, written to comparison.json
    assert [r["hospital"] for r in local["hospital_comparison"]] == [r["hospital"] for r in ray["hospital_comparison"]]
    assert json.loads((tmp_path / "local" / "out" / "comparison.json").read_text()) == local["hospital_comparison"]


@pytest.mark.simulation
def test_private_run_writes_the_same_ledger_entries_on_both_engines(tmp_path, tiny_dir):
    entries = {}
    for engine in ("ray", "local"):
        ws, metrics = _run(tmp_path / engine, tiny_dir, engine, PRIVATE)
        assert metrics["private"] and [r["round"] for r in metrics["rounds"]] == [0, 1, 2]
        _, sites, _ = load_workspace(ws)
        entries[engine] = {
            site.hospital_id: [
                (e.noise_multiplier, e.sample_rate, e.steps) for e in PrivacyLedger.open(site.ledger).history
            ]
            for site in sites
        }
        spent = {h: o["epsilon_spent"] for h, o in metrics["rounds"][-1]["hospitals"].items()}
        assert spent == {s.hospital_id: pytest.approx(PrivacyLedger.open(s.ledger).epsilon_spent()) for s in sites}
    assert entries["local"] == entries["ray"]
    assert all(len(rounds) == 2 and rounds[0][0] > 0 for rounds in entries["local"].values())


def _echo_app() -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context) -> Message:
        if context.node_config["partition-id"] == 1:
            raise ValueError("site 1 broke")
        reply = RecordDict({"config": msg.content["config"]})
        return Message(content=reply, reply_to=msg)

    return app


def test_grid_replies_like_flower(tmp_path):
    """Replies carry the ids the strategies match on; a ClientApp that raises is Flower's error reply;
    every node has its own partition id."""
    from flwr.app import ConfigRecord

    grid = LocalGrid(_echo_app(), 3)
    nodes = list(grid.get_node_ids())
    assert sorted(grid.contexts[n].node_config["partition-id"] for n in nodes) == [0, 1, 2]
    assert all(grid.contexts[n].node_config["num-partitions"] == 3 for n in nodes)
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = grid.run.run_id, 1, 1
    sent = [
        Message(RecordDict({"config": ConfigRecord({"n": i})}), n, "train", group_id="1") for i, n in enumerate(nodes)
    ]
    replies = list(grid.send_and_receive(sent))
    assert len(replies) == 3
    by_request = {r.metadata.reply_to_message_id: r for r in replies}
    for i, msg in enumerate(sent):
        reply = by_request[msg.metadata.message_id]
        assert (reply.metadata.src_node_id, reply.metadata.dst_node_id) == (msg.metadata.dst_node_id, 1)
        assert reply.metadata.message_id and reply.metadata.message_id != msg.metadata.message_id
        if grid.contexts[msg.metadata.dst_node_id].node_config["partition-id"] == 1:
            assert reply.has_error() and "site 1 broke" in reply.error.reason
        else:
            assert reply.content["config"]["n"] == i
    assert list(grid.pull_messages(by_request)) == []  # each reply is handed over once
    with pytest.raises(ValueError, match="no node"):
        grid.push_messages([Message(RecordDict(), 12345, "train", group_id="1")])


def test_unknown_engine_is_bad_input(tmp_path, tiny_dir):
    from fedprompt.common.errors import InputError

    ws = make_workspace(tmp_path, tiny_dir, hospitals=1, per_hospital=10, test_size=10)
    with pytest.raises(InputError, match="unknown engine 'spark'"):
        simulate(ws, tmp_path / "out", engine="spark")
    assert yaml.safe_load((ws / "federation.yaml").read_text())  # nothing was touched
    assert not (tmp_path / "out").exists()
