"""Smoke test of the benchmark runner: the comm suite and a micro dp suite on a tiny BERT.

Checks that `python -m benchmarks run` writes a well-formed results.json (keys, positive finite
numbers), results.md and the plots. Timings are not asserted: they depend on the machine.
"""

from __future__ import annotations

import csv
import json
import math
import random
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `benchmarks` is a top-level package of the repository
    sys.path.insert(0, str(ROOT))

from tinybert import WORDS, make_tiny_backbone  # noqa: E402

from benchmarks.__main__ import main  # noqa: E402

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


def test_runner_comm_and_micro_dp(tmp_path):
    backbone = make_tiny_backbone(tmp_path / "tinybert", hidden=32, layers=2)
    data = _corpus(tmp_path / "data")
    out = tmp_path / "out"
    argv = [
        "run", "--suite", "comm", "--suite", "dp", "--quick", "--out", str(out),
        "--backbone", str(backbone), "--data", str(data),
        "--pairs", "2", "--warmup", "0", "--n-batches", "2", "--mem-steps", "1", "--breakdown-steps", "1", "--profile-steps", "0",
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
