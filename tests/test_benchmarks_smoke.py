"""Smoke test of the benchmark runner: the comm suite and a micro dp suite on a tiny BERT.

Checks that `python -m benchmarks run` writes a well-formed results.json (keys, positive finite
numbers), results.md and the plots. Timings are not asserted: they depend on the machine.
"""

from __future__ import annotations

import csv
import json
import math
import random
from pathlib import Path

import pytest

from benchmarks.__main__ import main
from benchmarks.tiny_backbone import WORDS

LABELS = ["neoplasms", "digestive", "nervous", "cardiovascular", "general"]


def _corpus(directory: Path, rows: int = 48) -> Path:
    """A synthetic labelled corpus in the real corpus' layout (columns and label-names file)."""
    rng = random.Random(0)
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / "medical_tc_test.csv"
    with data.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["condition_label", "medical_abstract"])
        for i in range(rows):
            w.writerow([i % len(LABELS) + 1, " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60)))])
    with (directory / "medical_tc_labels.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["condition_label", "condition_name"])
        w.writerows([i + 1, name] for i, name in enumerate(LABELS))
    return data


def _positive_finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@pytest.mark.subprocess
def test_runner_comm_and_micro_dp(tmp_path, tiny_dir):
    backbone = tiny_dir
    data = _corpus(tmp_path / "data")
    out = tmp_path / "out"
    argv = [
        "run",
        "--suite",
        "comm",
        "--suite",
        "dp",
        "--quick",
        "--out",
        str(out),
        "--backbone",
        str(backbone),
        "--data",
        str(data),
        "--pairs",
        "2",
        "--warmup",
        "0",
        "--n-batches",
        "2",
        "--mem-steps",
        "1",
        "--breakdown-steps",
        "1",
        "--profile-steps",
        "0",
    ]
    assert main(argv) == 0

    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"meta", "suites"}
    assert set(results["suites"]) == {"comm", "dp"}
    meta = results["meta"]
    for key in ("date_utc", "command", "nproc", "cpu_model", "torch", "opacus", "flwr", "plots"):
        assert key in meta

    dp = results["suites"]["dp"]
    for mode in ("dp", "nondp", "fullft"):
        assert _positive_finite(dp["step_seconds"][mode]["median"])
        assert len(dp["raw_wall_seconds"][mode]) == 2
        assert _positive_finite(dp["throughput_examples_per_s"][mode])
        assert _positive_finite(dp["memory"][mode]["peak_rss_mb"])
        assert dp["memory"][mode]["train_peak_over_setup_mb"] >= 0
    for key in ("ratio_dp_over_nondp", "ratio_dp_over_nondp_cpu_time", "throughput_ratio_dp_over_fullft"):
        assert _positive_finite(dp[key]["median"])
        assert dp[key]["iqr"] >= 0
    assert isinstance(dp["target"]["met"], bool)
    assert dp["config"]["trainable_params"]["dp"] == 20 * 32 + 5 * 32 + 5
    assert dp["config"]["trainable_params"]["fullft"] > dp["config"]["trainable_params"]["dp"]

    comm = results["suites"]["comm"]
    raw = comm["raw_trainable_bytes"]
    assert raw == (20 * 32 + 5 * 32 + 5) * 4
    for name in ("train_upload", "train_download", "evaluate_upload", "evaluate_download"):
        assert _positive_finite(comm["messages"][name]["message"])
        assert comm["messages"][name]["message"] >= comm["messages"][name]["content"]
    # what Flower sends for the tensors can only add framing to the raw bytes
    assert comm["messages"]["train_upload"]["message"] > raw
    assert comm["lora_r8_qv_bytes"] == 2 * 2 * 8 * (32 + 32) * 4
    assert _positive_finite(comm["backbone"]["weights_bytes_on_disk"])
    assert all(isinstance(v, bool) for k, v in comm["targets"].items() if k.endswith("_met"))

    md = (out / "results.md").read_text()
    assert "## dp" in md and "## comm" in md
    for png in meta["plots"]:
        assert (out / png).stat().st_size > 1000


def test_runner_rejects_unknown_suite(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["run", "--suite", "nope", "--out", str(tmp_path)])


@pytest.mark.slow  # one Flower simulation (Ray daemons + actor processes)
@pytest.mark.simulation
@pytest.mark.subprocess
def test_runner_scale_suite_one_size(tmp_path, tiny_dir):
    backbone = tiny_dir
    out = tmp_path / "out"
    argv = [
        "run",
        "--suite",
        "scale",
        "--out",
        str(out),
        "--backbone",
        str(backbone),
        "--scale-sizes",
        "2",
        "--scale-rounds",
        "1",
    ]
    assert main(argv) == 0

    scale = json.loads((out / "results.json").read_text())["suites"]["scale"]
    (size,) = scale["sizes"]
    assert size["n"] == 2 and size["error"] is None
    assert size["rounds_completed"] == size["rounds_requested"] == 1
    assert size["hospitals_ok_min"] == 2
    for key in (
        "first_round_seconds",
        "wall_s_per_round",
        "aggregate_s_per_round",
        "aggregate_cpu_s_per_round",
        "aggregate_ms_per_hospital",
    ):
        assert _positive_finite(size[key]), key
    memory = size["memory"]
    for key in ("peak_tree_pss_mb", "peak_tree_rss_mb", "aggregator_vmhwm_mb"):
        assert _positive_finite(memory[key]), key
    assert memory["max_processes"] > 2  # the Ray daemons and actors below the simulation process were counted
    assert scale["targets"]["complete_met"] is None  # no 100-hospital run: not measured
    assert "## scale" in (out / "results.md").read_text()
    assert (out / "scale.png").stat().st_size > 1000


def test_scale_growth_exponents():
    from benchmarks.scale import growth

    g = growth([10, 50, 100], [0.01, 0.05, 0.1])
    assert g["exponent"] == pytest.approx(1.0)
    assert [p["exponent"] for p in g["pairwise"]] == pytest.approx([1.0, 1.0])
    assert growth([10, 100], [1.0, 1.0])["exponent"] == pytest.approx(0.0)
    assert math.isnan(growth([10], [1.0])["exponent"])


def _timing_line(site: str, r: int, sent: float, train: float) -> dict:
    """An executor `fedprompt-timing` record as client/executor.py logs it (one train message per round)."""
    phases = {"records": 0.1, "privacy": 0.2, "build": 0.01, "evaluate": 0.05, "train": train, "reply": 0.01}
    acquired = sent + 1.5
    start = acquired + 0.3
    end = start + sum(phases.values()) + 0.02
    return {
        "type": "train",
        "site": site,
        "round": r,
        "pid": hash(site),
        "sent": sent,
        "acquired": acquired,
        "pulled": acquired + 0.25,
        "handler_start": start,
        "handler_end": end,
        "pushed": end + 0.05,
        "phases": phases,
    }


def test_round_suite_analysis_and_report(tmp_path):
    """The round suite's analysis on a synthetic run (the real one needs a deployment: minutes)."""
    from benchmarks import round as round_suite

    rounds, lines, t = [], [], 1000.0
    for r in (1, 2):
        sent = t + 0.1
        lines += [_timing_line(f"hospital-{h}", r, sent, train=1.0 + h) for h in (1, 2, 3)]
        received = max(m["pushed"] for m in lines if m["round"] == r) + 0.7
        end = received + 0.3
        rounds.append(
            {
                "round": r,
                "seconds": end - t,
                "timing": {
                    "start": t,
                    "train_sent": sent,
                    "train_received": received,
                    "evaluate_sent": received + 0.01,
                    "evaluate_received": received + 0.02,
                    "end": end,
                },
            }
        )
        t = end
    rows = round_suite._rounds({"rounds": rounds}, lines)
    for row in rows:
        # The critical path's segments add up to the phase, and the overhead is wall - slowest training.
        assert sum(row["train"]["segments"].values()) == pytest.approx(row["train"]["seconds"])
        assert row["evaluate"]["segments"] == {}  # one message per round
        assert row["slowest_training"] == 4.0 and row["train"]["critical"] == "hospital-3"
        assert row["overhead"] == pytest.approx(row["wall"] - 4.0)
        assert row["wall"] == pytest.approx(
            row["train"]["seconds"] + row["evaluate"]["seconds"] + sum(row["server"].values())
        )
    result = {
        "config": {
            "hospitals": 3,
            "records_per_hospital": 40,
            "rounds": 2,
            "backbone": "tiny",
            "target_overhead_s": 5.0,
        },
        **round_suite.summarize(rows),
        "run_wall_s": 60.0,
        "loadavg": {"start": [1.0], "end": [2.0]},
        "idle_daemon_rss_mb": {"median": 700.0, "min": 690.0, "max": 710.0},
        "cold_import": {"import": {"median": 3.0}, "interpreter_total": {"median": 3.5}},
    }
    assert result["messages_per_round"] == 3 and result["warm_processes"] == 3
    assert result["target_met"] == (result["overhead"]["median"] <= 5.0)
    md = round_suite.markdown(result)
    assert "Where the remaining seconds go" in md and "the SuperNode sleeps between pulls" in md
    assert (
        round_suite.plot(result, tmp_path) == ["round_phases.png"]
        and (tmp_path / "round_phases.png").stat().st_size > 0
    )


def test_runner_accuracy_suite_micro(tmp_path, tiny_dir):
    """Every accuracy mode on a tiny BERT and a synthetic corpus: well-formed results, no figures asserted."""
    backbone = tiny_dir
    data = _corpus(tmp_path / "data", rows=90)
    out = tmp_path / "out"
    assert (
        main(
            [
                "run",
                "--suite",
                "accuracy",
                "--quick",
                "--out",
                str(out),
                "--backbone",
                str(backbone),
                "--data",
                str(data),
                "--acc-rounds",
                "2",
                "--max-length",
                "64",
            ]
        )
        == 0
    )

    acc = json.loads((out / "results.json").read_text())["suites"]["accuracy"]
    modes = {
        "zero_shot",
        "linear_probe",
        "hospitals_alone_nonprivate",
        "hospitals_alone_dp",
        "federated_nonprivate",
        "federated_dp_eps1",
        "federated_dp_eps4",
        "federated_dp_eps8",
        "federated_prompt_dp_eps8",
        "central_prompt_nonprivate",
        "federated_prompt_nonprivate",
        "personalized",
    }
    assert set(acc["results"]) == modes
    for mode, r in acc["results"].items():
        if mode == "personalized":
            continue
        assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["macro_f1"] <= 1.0, mode
        assert r["num_examples"] == acc["config"]["test_rows"] == 27
        if mode.startswith("federated"):
            rounds = 1 if mode == "federated_prompt_nonprivate" else 2  # --quick: one prompt-tuning round
            # round 0 (the zero-shot start) first, then one entry per round
            assert len(r["per_round"]) == rounds + 1 and r["per_round"][-1]["macro_f1"] == r["macro_f1"]
            if "prompt" not in mode:  # prompt tuning starts with its untrained prompt on the record path
                assert r["per_round"][0] == {
                    k: acc["results"]["zero_shot"][k] for k in ("accuracy", "macro_f1", "num_examples")
                }
    from fedprompt.common.accounting import compute_epsilon

    for eps in (1, 4, 8):
        mode = acc["results"][f"federated_dp_eps{eps}"]
        for h, p in mode["per_hospital_privacy"].items():
            if eps == 1:  # ~20 records cannot carry eps 1: each site refuses as the product's does, spending nothing
                assert p["refused"] == "too few records" and p["sigma"] is None, (h, p)
                continue
            # the site's calibration (client/hospital.site_run): both rounds and its one retried DP-SGD round
            # (privacy.retry_margin) spend the budget; the two rounds run spend less
            planned = [(p["class_sums_sigma"], 1.0, 1), (p["sigma"], p["sample_rate"], 2 * p["steps"])]
            assert eps * 0.95 <= compute_epsilon("prv", planned, p["delta"]) <= eps * 1.0001, (eps, h, p)
            assert 0 < p["epsilon_spent"] < eps * 0.95, (eps, h, p)
    assert acc["results"]["federated_dp_eps1"]["per_round"][-1] == acc["results"]["federated_dp_eps1"]["per_round"][0]
    for h, p in acc["results"]["personalized"]["per_hospital"].items():
        assert p["method"] in ("global", "prior", "local_head", "own") and p["n_local_test"] > 0, h
    assert [t["met"] in (True, False) for t in acc["targets"]] == [True] * 5
    assert {"accuracy.png", "accuracy_vs_epsilon.png", "accuracy_per_round.png", "personalization.png"} <= {
        p.name for p in out.glob("*.png")
    }


def test_runner_recipe_suite_micro(tmp_path, tiny_dir):
    """The recipe sweep on a tiny BERT: every point through the product's path, well-formed."""
    backbone = tiny_dir
    data = _corpus(tmp_path / "data", rows=90)
    out = tmp_path / "out"
    assert (
        main(
            [
                "run",
                "--suite",
                "recipe",
                "--quick",
                "--out",
                str(out),
                "--backbone",
                str(backbone),
                "--data",
                str(data),
                "--max-length",
                "64",
            ]
        )
        == 0
    )
    rec = json.loads((out / "results.json").read_text())["suites"]["recipe"]
    assert len(rec["points"]) == 2 and {p["lr"] for p in rec["points"]} == {8.0, 2.0}
    for p in rec["points"]:
        assert 0.0 <= p["last3"] <= 1.0 and p["max_length"] == 64 and p["rounds"] == rec["config"]["defaults"]["rounds"]
    assert (out / "recipe.png").is_file() and "**default**" in (out / "results.md").read_text()


@pytest.mark.simulation
def test_regimes_quick_runs_the_product_federation(tmp_path, tiny_dir):
    """`--suite regimes --quick` on a tiny BERT: a real workspace per regime, federations through the
    product's apps on the in-process engine, the table and a plot per regime."""
    backbone = tiny_dir
    data = _corpus(tmp_path / "data", rows=300)
    out = tmp_path / "out"
    argv = ["run", "--suite", "regimes", "--quick", "--out", str(out), "--backbone", str(backbone), "--data", str(data)]
    argv += ["--max-length", "64"]  # the tiny BERT has 256 positions
    argv += ["--acc-rounds", "3"]  # the one-shot release, then DP-SGD rounds (the default may be the release alone)
    assert main(argv) == 0

    res = json.loads((out / "results.json").read_text())["suites"]["regimes"]
    assert res["config"]["regimes"] == ["b"] and res["config"]["seeds"] == 1 and res["config"]["rounds"] == 3
    b = res["regimes"]["b"]
    assert len(b["sites"]) == 3 and all(s["train"] > 0 and s["local_test"] > 0 for s in b["sites"].values())
    # the sites keep their 40 / 80 / 120 proportions when the corpus is too small for those sizes
    trains = [s["train"] for s in b["sites"].values()]
    assert trains[0] < trains[1] < trains[2]
    for key in ("zero_shot_plain", "central_probe"):
        assert 0 <= b[key]["macro_f1"] <= 1 and 0 <= b[key]["accuracy"] <= 1
    assert set(b["federated"]) == {"1", "4", "8"}
    for eps, fed in b["federated"].items():
        (run,) = fed["runs"]
        if run["final"] is None:  # the smallest site refused in pre-flight (too few records): nobody was charged
            assert run["outcome_reason"].startswith("pre-flight"), run["outcome_reason"]
            assert set(run["epsilon_spent"].values()) == {0.0} and run["rounds"] == []
            continue
        assert run["rounds"] == [0, 1, 2, 3] and len(run["rejected_per_round"]) == 3
        # what each site's own ledger says it spent: within its cap, and the run's target
        assert all(0 < spent <= float(eps) + 1e-6 for spent in run["epsilon_spent"].values()), run["epsilon_spent"]
        assert fed["final_macro_f1"] is not None and fed["round1_macro_f1"] is not None
    assert b["federated"]["8"]["final_macro_f1"] is not None
    # the product's per-site comparison, from the eps-8 runs
    assert set(b["per_site"]) == set(b["sites"])
    assert all({"alone", "federated", "personalized"} <= set(s) for s in b["per_site"].values())
    # each regime is a real workspace on disk, with its ledgers
    ws = out / "regimes" / "runs-b" / "eps8-seed0" / "workspace"
    assert (ws / "federation.yaml").is_file() and len(list(ws.glob("hospital-*/ledger/*.json"))) == 3
    md = (out / "results.md").read_text()
    assert "## regimes" in md and "### (b)" in md and "plain zero-shot" in md
    assert (out / "regime_b.png").stat().st_size > 1000
