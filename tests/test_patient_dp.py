"""Patient-level DP (site.yaml: patient_field): the patient is the sampling and clipping unit."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import edit_yaml, make_workspace
from opacus import GradSampleModule
from torch import nn
from torch.utils.data import TensorDataset

from fedprompt.client.dp import check_per_sample_shapes, wrap_private
from fedprompt.client.trainer import patient_loss
from fedprompt.client.workspace import declared_weight
from fedprompt.common.errors import InputError
from fedprompt.common.features import PAD_LABEL, group_by_patient
from fedprompt.common.records import load_records
from fedprompt.common.schedule import sampling

HIDDEN, CLASSES = 6, 3
RECORDS_PER_PATIENT = [1, 3, 4, 2, 1]  # 5 patients, 11 records


def _patients_data(seed: int = 0):
    """(head, per-record features, labels, patient ids), records of a patient interleaved with others."""
    gen = torch.Generator().manual_seed(seed)
    head = nn.Linear(HIDDEN, CLASSES)
    with torch.no_grad():
        head.weight.copy_(torch.randn(CLASSES, HIDDEN, generator=gen))
        head.bias.copy_(torch.randn(CLASSES, generator=gen))
    patients = [f"p{j}" for j, n in enumerate(RECORDS_PER_PATIENT) for _ in range(n)]
    order = torch.randperm(len(patients), generator=gen).tolist()
    patients = [patients[i] for i in order]
    x = torch.randn(len(patients), HIDDEN, generator=gen) * 3
    y = torch.randint(0, CLASSES, (len(patients),), generator=gen)
    return head, x, y, patients


def _loop_patient_gradients(head: nn.Linear, x, y, patients) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: for each patient (first-appearance order), the sum of its records' CE gradients."""
    ws, bs = [], []
    for pid in dict.fromkeys(patients):
        idx = [i for i, p in enumerate(patients) if p == pid]
        gw, gb = torch.zeros_like(head.weight), torch.zeros_like(head.bias)
        for i in idx:
            head.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(head(x[i : i + 1]), y[i : i + 1]).backward()
            gw += head.weight.grad
            gb += head.bias.grad
        ws.append(gw)
        bs.append(gb)
    head.zero_grad(set_to_none=True)
    return torch.stack(ws), torch.stack(bs)


def test_group_by_patient_pads_with_ignore_label():
    _, x, y, patients = _patients_data()
    xs, ys = group_by_patient(TensorDataset(x, y), patients).tensors
    assert xs.shape == (5, 4, HIDDEN) and ys.shape == (5, 4)
    assert (ys != PAD_LABEL).sum(1).tolist() == [patients.count(p) for p in dict.fromkeys(patients)]
    assert (xs[ys == PAD_LABEL] == 0).all()


def test_per_patient_gradients_are_summed_record_gradients():
    head, x, y, patients = _patients_data()
    ref_w, ref_b = _loop_patient_gradients(head, x, y, patients)
    xs, ys = group_by_patient(TensorDataset(x, y), patients).tensors
    gsm = GradSampleModule(head, batch_first=True, loss_reduction="mean", strict=True)
    try:
        patient_loss(gsm(xs), ys).backward()
        params = [head.weight, head.bias]
        check_per_sample_shapes(params, len(ys))  # one row per PATIENT
        assert (head.weight.grad_sample - ref_w).abs().max().item() <= 1e-6
        assert (head.bias.grad_sample - ref_b).abs().max().item() <= 1e-6
    finally:
        gsm._close()


def test_zero_noise_step_is_clip_then_average_over_patients():
    head, x, y, patients = _patients_data(seed=1)
    c, lr = 0.5, 1.0
    ref_w, ref_b = _loop_patient_gradients(head, x, y, patients)
    norms = torch.sqrt(ref_w.flatten(1).pow(2).sum(1) + ref_b.pow(2).sum(1))
    assert (norms > c).any() and len(norms) == 5
    factor = (c / (norms + 1e-6)).clamp(max=1.0)
    n_patients = len(norms)  # sample rate 1: the expected batch is every patient
    expected_w = head.weight.detach() - lr * torch.einsum("i,i...->...", factor, ref_w) / n_patients
    expected_b = head.bias.detach() - lr * torch.einsum("i,i...->...", factor, ref_b) / n_patients

    dataset = group_by_patient(TensorDataset(x, y), patients)
    optimizer = torch.optim.SGD(head.parameters(), lr=lr)
    gsm, dp_opt, _ = wrap_private(head, optimizer, dataset, sample_rate=1.0, noise_multiplier=0.0, max_grad_norm=c)
    try:
        xs, ys = dataset.tensors
        patient_loss(gsm(xs), ys).backward()
        check_per_sample_shapes([head.weight, head.bias], n_patients)
        dp_opt.step()
    finally:
        gsm._close()
    assert (head.weight.detach() - expected_w).abs().max().item() <= 1e-6
    assert (head.bias.detach() - expected_b).abs().max().item() <= 1e-6


# --- records ------------------------------------------------------------------------------------


def test_record_without_patient_id_is_refused_with_its_line(tmp_path):
    f = tmp_path / "train.csv"
    f.write_text("text,label,patient\nchest pain,a,p1\nfever,b,\nseizure,a,p2\n")
    with pytest.raises(InputError) as exc:
        load_records(f, text_field="text", label_field="label", labels=["a", "b"], patient_field="patient")
    assert f"{f}:3: patient: empty patient id" in str(exc.value)
    with pytest.raises(InputError) as exc:  # no such column at all
        load_records(f, text_field="text", label_field="label", labels=["a", "b"], patient_field="mrn")
    assert f"{f}:1: mrn: missing column" in str(exc.value)
    j = tmp_path / "train.jsonl"
    j.write_text(
        json.dumps({"text": "t", "label": "a", "patient": 7}) + "\n" + json.dumps({"text": "u", "label": "b"}) + "\n"
    )
    with pytest.raises(InputError) as exc:
        load_records(j, text_field="text", label_field="label", labels=["a", "b"], patient_field="patient")
    assert f"{j}:2: patient: missing field" in str(exc.value)
    good = tmp_path / "ok.csv"
    good.write_text("text,label,patient\nx,a, p1 \ny,b,p1\n")
    ok = load_records(good, text_field="text", label_field="label", labels=["a", "b"], patient_field="patient")
    assert ok.patients == ["p1", "p1"]
    # Without patient_field nothing changes: the column is ignored and no ids are kept.
    assert load_records(f, text_field="text", label_field="label", labels=["a", "b"]).patients is None


def test_site_config_validates_patient_field(tmp_path):
    from fedprompt.common.config import SiteConfig

    base = {
        "hospital_id": "h1",
        "train": "train.csv",
        "ledger": "l.json",
        "privacy": {"max_epsilon": 8.0, "delta": 1e-5},
    }
    (tmp_path / "ok.yaml").write_text(yaml.safe_dump({**base, "patient_field": "mrn"}))
    assert SiteConfig.load(tmp_path / "ok.yaml").patient_field == "mrn"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**base, "patient_field": "  "}))
    with pytest.raises(InputError, match="patient_field"):
        SiteConfig.load(tmp_path / "bad.yaml")


def test_patient_level_dp_with_noised_evaluation_is_refused_by_the_schema(tmp_path):
    """The noised validation counts are released per record (sensitivity sqrt(2) for one record): with
    patient_field set, one patient would move up to k counts while the ledger charges one. site.yaml
    refuses the combination, naming the file, the line and both fields; each alone loads."""
    from fedprompt.common.config import SiteConfig

    base = {
        "hospital_id": "h1",
        "train": "train.csv",
        "validation": "val.csv",
        "ledger": "l.json",
        "privacy": {"max_epsilon": 8.0, "delta": 1e-5},
    }
    path = tmp_path / "site.yaml"
    for alone in ({"patient_field": "mrn"}, {"share_evaluation": "noised"}):
        path.write_text(yaml.safe_dump({**base, **alone}, sort_keys=False))
        SiteConfig.load(path)
    path.write_text(yaml.safe_dump({**base, "patient_field": "mrn", "share_evaluation": "noised"}, sort_keys=False))
    with pytest.raises(InputError) as exc:
        SiteConfig.load(path)
    line = path.read_text().splitlines().index("share_evaluation: noised") + 1
    assert str(exc.value) == (
        f"{path}:{line}: share_evaluation: 'noised' cannot go with patient_field (patient-level DP): the validation "
        "counts are released per record, so a patient with k records would move up to k of them while the ledger "
        "charges one; set share_evaluation: none (results stay in this site's log) or patient_field: null"
    )


# --- a hospital's round -------------------------------------------------------------------------

N_PATIENTS = 5


def _patient_site(tmp_path: Path, tiny_dir: Path):
    """One hospital whose train.csv has a patient column (N_PATIENTS patients) and patient_field set."""
    from fedprompt.client.workspace import list_hospitals, load_workspace
    from fedprompt.server.federation import RunSpec, prepare_run
    from fedprompt.simulation import ensure_ledgers

    overrides = {
        "rounds": 2,
        "model": {"n_virtual_tokens": 2, "max_length": 16},
        "training": {"local_epochs": 1, "sample_rate": 0.5, "lr": 0.05},
        "privacy": {"target_epsilon": 8.0},
    }
    ws = make_workspace(
        tmp_path, tiny_dir, hospitals=1, per_hospital=20, test_size=10, overrides=overrides, allow_non_private=False
    )
    site_yaml = list_hospitals(ws)[0]
    edit_yaml(site_yaml, lambda d: d.update(patient_field="patient", privacy={**d["privacy"], "delta": 1e-3}))
    train_csv = site_yaml.parent / "train.csv"
    rows = list(csv.reader(train_csv.open(newline="")))
    with train_csv.open("w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(rows[0] + ["patient"])
        for i, row in enumerate(rows[1:]):
            w.writerow(row + [f"patient-{i % N_PATIENTS}"])
    ensure_ledgers(ws)
    fed, _, _ = load_workspace(ws)
    run = prepare_run(RunSpec(fed, tmp_path / "out", None, tiny_dir))
    return run, site_yaml, len(rows) - 1, train_csv


def _content(run, **plan_changes):
    from flwr.app import RecordDict

    from fedprompt.common.plan import RoundPlan
    from fedprompt.common.wire import ARRAYS, state_to_arrays

    plan = RoundPlan.for_run(run.spec.federation, run.prompt, round=2).replaced(**plan_changes)
    return RecordDict({ARRAYS: state_to_arrays(run.state), "config": plan.to_config_record()}), plan


def test_train_round_accounts_patients_not_records(tmp_path, tiny_dir, caplog):
    from fedprompt.client.hospital import train_round
    from fedprompt.common.config import SiteConfig
    from fedprompt.common.wire import STATUS

    run, site_yaml, n_records, train_csv = _patient_site(tmp_path, tiny_dir)
    content, plan = _content(run)
    with caplog.at_level("INFO", logger="fedprompt.hospital"):
        reply = train_round(content, site_yaml)
    assert reply[STATUS]["status"] == "ok", caplog.text
    ledger = json.loads(SiteConfig.load(site_yaml).ledger.read_text())
    entry = ledger["history"][-1]
    # the declared size (not declared here: the patient count to 1 significant digit) sets q
    s = sampling(plan, declared_weight(N_PATIENTS))
    assert (entry["sample_rate"], entry["steps"]) == (s.sample_rate, s.steps_per_round)
    assert f"of {N_PATIENTS} patients" in caplog.text

    # A record without its patient: refused, the file and line in the hospital's log only.
    rows = list(csv.reader(train_csv.open(newline="")))
    lines = train_csv.read_text().splitlines()
    with train_csv.open("a", newline="") as f:
        csv.writer(f, lineterminator="\n").writerow(
            ["a note" if h == "text" else "" if h == "patient" else v for h, v in zip(rows[0], rows[1], strict=True)]
        )
    caplog.clear()
    with caplog.at_level("WARNING", logger="fedprompt.hospital"):
        reply = train_round(_content(run)[0], site_yaml)
    assert reply[STATUS]["reason"] == "records"
    assert f"train.csv:{len(lines) + 1}: patient: empty patient id" in caplog.text


def test_patient_level_dp_trains_a_late_prompt_and_refuses_an_input_prompt(tmp_path, tiny_dir, caplog):
    from fedprompt.client.hospital import train_round
    from fedprompt.client.trainer import local_update
    from fedprompt.common.config import SiteConfig
    from fedprompt.common.wire import STATUS

    run, site_yaml, _, _ = _patient_site(tmp_path, tiny_dir)
    ledger_path = SiteConfig.load(site_yaml).ledger
    before = ledger_path.read_bytes()
    content, plan = _content(run, train_prompt=True, prompt_layer=0)
    with caplog.at_level("WARNING", logger="fedprompt.hospital"):
        reply = train_round(content, site_yaml)
    assert reply[STATUS]["status"] == "refused" and reply[STATUS]["reason"] == "configuration"
    assert "patient_field: patient-level DP with a trained prompt needs a late prompt" in caplog.text
    assert ledger_path.read_bytes() == before  # refused before anything is accounted
    with pytest.raises(InputError, match="needs a late prompt"):
        local_update(None, None, plan, sampling(plan, 10.0), 1.0, torch.device("cpu"), patients=["p"])

    # a prefix before the last layer: trained per patient, the ledger charged the patients' sampling
    content, plan = _content(run, train_prompt=True, prompt_layer=1, prompt_style="prefix")
    with caplog.at_level("INFO", logger="fedprompt.hospital"):
        reply = train_round(content, site_yaml)
    assert reply[STATUS]["status"] == "ok", caplog.text
    entry = json.loads(ledger_path.read_text())["history"][-1]
    s = sampling(plan, declared_weight(N_PATIENTS))
    assert (entry["sample_rate"], entry["steps"]) == (s.sample_rate, s.steps_per_round)


def test_data_check_validates_patient_field(tmp_path, data_cli, capsys):
    from fedprompt.client.workspace import write_workspace

    labels = ["a", "b"]
    ws = write_workspace(
        tmp_path / "ws", name="t", labels=labels, hospitals={"1": ([("x", "a"), ("y", "b")] * 10, [("z", "a")])}
    )
    site = ws / "hospital-1"
    edit_yaml(site / "site.yaml", lambda d: d.update(patient_field="patient", privacy={**d["privacy"], "delta": 0.01}))
    rows = "".join(f"note {i},{'ab'[i % 2]},p{i % 4}\n" for i in range(20))
    (site / "train.csv").write_text("text,label,patient\n" + rows + "late,a,\n")
    assert data_cli(["data", "check", "--site", str(site / "site.yaml")]) == 2
    err = capsys.readouterr().err
    assert f"{site / 'train.csv'}:22: patient: empty patient id" in err
    (site / "train.csv").write_text("text,label,patient\n" + rows)
    assert data_cli(["data", "check", "--site", str(site / "site.yaml")]) == 0
    assert "4" in capsys.readouterr().out.split("patients")[-1]
    edit_yaml(site / "site.yaml", lambda d: d["privacy"].update(delta=0.3))  # against 1/4 patients, not 1/20 records
    assert data_cli(["data", "check", "--site", str(site / "site.yaml")]) == 2
    assert "privacy.delta: 0.3 is not below 1/n = 1/4 patients" in capsys.readouterr().err
