"""The aggregator witnesses each site's privacy ledger (issue 22 item 5): every accepted train reply's
ledger head and epsilon are recorded in the run's history, and a later reply whose epsilon decreased
or whose chain does not hold the head it showed before is "rejected", naming the hospital. A real
federation (tiny BERT, Flower's apps on the local engine), a ledger cut and re-anchored between its
rounds, and a resume that goes on from the witness in the checkpoint."""

from __future__ import annotations

import json

import pytest
from conftest import FAST, make_workspace

from fedprompt.client.ledger import PrivacyLedger
from fedprompt.common.config import SiteConfig
from fedprompt.server.checkpoint import load_checkpoint
from fedprompt.simulation import ensure_ledgers, simulate


def _cut_this_run(site_yaml, run_name: str) -> None:
    """What the issue's operator did: drop the run's entries (and their completions), delete the
    anchor, and re-anchor from an older head: the chain that is left is valid, with less epsilon."""
    site = SiteConfig.load(site_yaml)
    book = PrivacyLedger.for_site(site)
    keep = [i for i, e in enumerate(book.history) if e.run_id != run_name and not e.run_id.startswith(run_name + "/")]
    older = book.history[keep[-1]].hash
    doc = json.loads(site.ledger.read_text())
    doc["history"] = [doc["history"][i] for i in keep]
    doc["completions"] = [c for c in doc["completions"] if c["entry"] in keep]
    site.ledger.write_text(json.dumps(doc))
    book.anchor_path.unlink()
    PrivacyLedger.for_site(site, anchored=False).reanchor(older)


@pytest.mark.simulation
def test_a_cut_ledger_is_rejected_by_the_aggregator_in_a_real_federation(tmp_path, tiny_dir):
    ws = make_workspace(
        tmp_path, tiny_dir, hospitals=2, per_hospital=20, overrides={**FAST, "rounds": 2}, accountant="rdp"
    )
    ensure_ledgers(ws)
    site1 = ws / "hospital-1" / "site.yaml"
    # hospital-1 took part in an earlier run: its ledger has a head the operator can re-anchor at
    PrivacyLedger.for_site(SiteConfig.load(site1)).record(2.0, 0.1, 20, epsilon_cap=10.0, run_id="earlier", round=1)
    out = tmp_path / "out"
    first = simulate(ws, out, backbone=tiny_dir, stop_after=1, engine="local", compare=False)
    r1 = first["rounds"][-1]
    assert r1["round"] == 1
    witnessed = {h: (o["ledger_head"], o["epsilon_spent"]) for h, o in r1["hospitals"].items()}
    book = PrivacyLedger.for_site(SiteConfig.load(site1))
    # recorded every round: the head of the site's ledger and its epsilon, in metrics.json and the checkpoint
    assert witnessed["hospital-1"] == (book.head, pytest.approx(book.epsilon_spent()))
    assert load_checkpoint(out / "checkpoint").history[-1]["hospitals"]["hospital-1"]["ledger_head"] == book.head

    _cut_this_run(site1, "t")
    assert PrivacyLedger.for_site(SiteConfig.load(site1)).epsilon_spent() < witnessed["hospital-1"][1]

    resumed = simulate(ws, out, backbone=tiny_dir, resume=True, engine="local", compare=False)
    r2 = resumed["rounds"][-1]
    assert r2["round"] == 2
    cut, honest = r2["hospitals"]["hospital-1"], r2["hospitals"]["hospital-2"]
    assert cut["status"] == "rejected" and cut["reason"].startswith("hospital-1: privacy ledger rolled back"), cut
    assert "it reported in round 1" in cut["reason"] and cut["ledger_head"] is None
    assert honest["status"] == "ok" and honest["ledger_head"] != witnessed["hospital-2"][0]
    assert honest["epsilon_spent"] >= witnessed["hospital-2"][1]
