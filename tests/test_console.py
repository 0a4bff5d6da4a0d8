"""A quiet console (common/logs.py): `fedprompt simulate` shows fedprompt's own lines only;
Flower's, Ray's and Opacus' output goes to RUN_DIR/logs/; daemons can log JSON lines."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys

import pytest
from conftest import make_workspace

from fedprompt.cli import main
from fedprompt.common.logs import CONSOLE, FORMAT_ENV, PROGRESS, captured_output, console
from fedprompt.simulation import LOG_NAME, ensure_ledgers


@pytest.mark.simulation
@pytest.mark.subprocess
def test_simulate_console_holds_only_fedprompt_lines(tmp_path, tiny_dir):
    """The done-when of the quiet console: a real `fedprompt simulate` (tiny BERT, 2 hospitals, 2
    rounds) in a fresh process, its stdout and stderr as an operator's terminal would get them."""
    overrides = {"rounds": 2, "model": {"n_virtual_tokens": 4, "max_length": 32}}
    ws = make_workspace(
        tmp_path, tiny_dir, hospitals=2, per_hospital=30, test_size=20, overrides=overrides, name="quiet"
    )
    ensure_ledgers(ws)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLWR_LOG", "RAY_"))}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedprompt",
            "simulate",
            "--workspace",
            str(ws),
            "--out",
            str(out),
            "--backbone",
            str(tiny_dir),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    shown = r.stdout + r.stderr
    assert r.returncode == 0, shown[-4000:]
    # Ray's C++ core writes its own lines to the process' stderr (one at shutdown since hospital actors
    # are restartable: "task_manager.cc: Failed to push error to driver"); nothing else may reach it.
    raylet = re.compile(r"^\[[^\]]+\] \w+\.cc:\d+: ")
    assert [line for line in r.stderr.splitlines() if line and not raylet.match(line)] == [], r.stderr[-4000:]
    lines = [line for line in r.stdout.splitlines() if line]
    summary = lines.index("[fedprompt] run 'quiet' finished: 2 round(s), differential privacy at every hospital")
    assert all(line.startswith("[fedprompt] ") for line in lines[:summary]), shown
    assert all(line.startswith("  ") for line in lines[summary + 1 :]), shown  # the summary's own lines
    assert [line.split(" | ")[0] for line in lines[:summary]] == ["[fedprompt] pre-flight for rounds 1-2"] + [
        f"[fedprompt] round {r}/2" + (" (zero-shot start, no training)" if r == 0 else "") for r in (0, 1, 2)
    ]
    assert re.search(r"hospital-1 ok eps \d+\.\d\d, hospital-2 ok eps \d+\.\d\d", lines[summary - 1]), lines[
        summary - 1
    ]
    for noise in ("Warning", "WARNING", "INFO :", "DEPRECATED", "ClientAppActor", "fedprompt-timing"):
        assert noise not in shown, noise
    assert not re.search(r"\bray\b|opacus", shown, re.IGNORECASE), shown
    log = (out / "logs" / LOG_NAME).read_text(encoding="utf-8")
    assert "INFO flwr: Starting ValidatedStrategy strategy" in log  # Flower's records, whole ConfigRecords included
    assert "(ClientAppActor pid=" in log and "fedprompt-timing" in log  # the hospitals (Ray actors)' output
    assert "Optimal order is the largest alpha" in log  # Opacus' RDP warning, from inside an actor
    assert "INFO fedprompt.server: round 2/2" in log  # fedprompt's own lines too
    assert "`run_simulation` function is deprecated" not in log  # dropped on purpose (fedprompt/simulation.py)
    assert (out / "report.html").is_file()


def test_captured_output_quiet_and_verbose(tmp_path, capsys):
    """What a library prints or logs, and its warnings, go to the file; fedprompt's console lines
    stay on the console, once; `verbose` leaves the console as it was (and still writes the file)."""
    flwr_like = logging.getLogger("fedprompt-test-engine")
    flwr_like.propagate = False
    flwr_like.addHandler(logging.StreamHandler(sys.stderr))
    flwr_like.setLevel(logging.INFO)
    opacus_like = logging.StreamHandler(sys.stderr)  # Opacus' logging.basicConfig at import
    logging.getLogger().addHandler(opacus_like)
    log = logging.getLogger("fedprompt.test")
    try:
        for verbose in (False, True):
            path = tmp_path / f"{verbose}.log"
            with console(), captured_output(path, verbose=verbose):
                flwr_like.info("engine record")
                print("printed by a library")
                print("a library's warning", file=sys.stderr)  # as warnings.showwarning writes it
                log.info("round 1/1 | ok", extra=PROGRESS)
                log.info("detail for the log only")
            shown = capsys.readouterr()
            text = path.read_text()
            assert "engine record" in text and "round 1/1 | ok" in text and "detail for the log only" in text
            assert "[fedprompt] round 1/1 | ok" in shown.out and "detail for the log only" not in shown.out + shown.err
            assert "round 1/1" not in shown.err
            if verbose:
                assert (
                    "engine record" in shown.err
                    and "printed by a library" in shown.out
                    and "a library's warning" in shown.err
                )
            else:
                assert "printed by a library" in text and "a library's warning" in text
                assert shown.out == "[fedprompt] round 1/1 | ok\n" and shown.err == ""
        assert len(flwr_like.handlers) == 1 and opacus_like in logging.getLogger().handlers  # both back
    finally:
        flwr_like.handlers.clear()
        logging.getLogger().removeHandler(opacus_like)


def test_progress_lines_are_rewritten_in_place_on_a_terminal():
    stream = io.StringIO()
    log = logging.getLogger("fedprompt.test")
    with console(stream, in_place=True):
        log.info("round 1/2", extra=PROGRESS)
        log.info("round 2/2", extra=PROGRESS)
        log.info("a line that stays", extra=CONSOLE)
        log.info("not for the console")
        log.warning("careful")
    assert stream.getvalue() == (
        "\r\x1b[K[fedprompt] round 1/2\r\x1b[K[fedprompt] round 2/2\n[fedprompt] a line that stays\n"
        "[fedprompt] warning: careful\n"
    )


@pytest.mark.subprocess
def test_daemons_log_json_lines(tmp_path):
    code = (
        "import logging, os; from fedprompt.common.logs import configure_logging, FORMAT_ENV; "
        "configure_logging('json'); "
        "logging.getLogger('fedprompt.hospital').info('hospital %s ready', 'h1'); print(os.environ[FORMAT_ENV])"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    record = json.loads(r.stderr.strip().splitlines()[-1])
    assert (record["level"], record["logger"], record["message"]) == ("INFO", "fedprompt.hospital", "hospital h1 ready")
    assert r.stdout.strip() == "json"  # what the daemon's worker process inherits
    from fedprompt.cli import build_parser

    for argv in (
        ["hospital", "start", "--site", "s", "--superlink", "h:1", "--root-certificates", "c", "--key", "k"],
        ["aggregator", "start", "--pki", "p", "--state", "s"],
        ["aggregator", "proxy"],
    ):
        assert build_parser().parse_args([*argv, "--log-format", "json"]).log_format == "json"


def test_simulate_without_ray_says_what_to_install(tmp_path, monkeypatch, capsys):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else find_spec(name, *a))
    monkeypatch.delenv(FORMAT_ENV, raising=False)
    assert main(["simulate", "--out", str(tmp_path / "run")]) == 2
    assert "install fedprompt[simulation]" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing written, not even the demo


@pytest.fixture(autouse=True)
def _no_leftover_handlers():
    yield
    assert not any(type(h).__name__ == "ConsoleHandler" for h in logging.getLogger("fedprompt").handlers)
