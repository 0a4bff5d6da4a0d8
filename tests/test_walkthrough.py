"""docs/deployment.md followed end to end on loopback, as an aggregator and two hospitals would
(marker `deployment`).

Each step runs the `fedprompt` command the docs show (section numbers in the comments), with
temporary folders for /etc and /var/lib, 127.0.0.1 for the aggregator's host name, the tiny test
BERT as the backbone everywhere and one round. The two hospitals share ONE host, as a small
hospital group or a test bench would: each with its own site, ledger and SuperNode, no
`--flwr-home` (the default is per site), and the aggregator's run uses its default app (no --app).

The whole walk-through runs twice:
  editable   the `fedprompt` of the development venv (pip install -e .)
  wheel      the project built as a wheel (`pip wheel`), installed with `pip install --target T`
             and run with PYTHONPATH=T: T's fedprompt wins over the venv's editable finder, and
             every process the daemons start (SuperLink, ServerApp, SuperNode, the hospital's
             training process) inherits PYTHONPATH, so the whole federation runs the wheel's code.
The PKI (section 2, steps 1-2) is made once and shared. FEDPROMPT_KEEP_DEPLOY=1 keeps the folders.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytest
from conftest import edit_yaml

from benchmarks.deploy_topology import Processes, can_connect, deploy_env, free_port, wait_for

pytestmark = pytest.mark.deployment

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
RUN_TIMEOUT = 600.0  # one round, submission to metrics.json (a bound, not a figure: 2 cores shared)
FLOWER_LIVENESS = ("Node Unavailable", "ClientApp stopped responding")
HOSPITALS = ("hospital-1", "hospital-2")
# Source folders of the repository: a wheel-flavour process that imported fedprompt from the
# editable tree would name them in its warnings or tracebacks.
SOURCE_DIRS = [f"{REPO / d}{os.sep}" for d in ("fedprompt", "client", "server", "common")]


class Site:
    """The commands of docs/deployment.md, as one installation of fedprompt runs them."""

    def __init__(self, exe: Path, env: dict[str, str]):
        self.exe, self.env = exe, env

    def argv(self, *args: object) -> list[str]:
        return [str(self.exe), *map(str, args)]

    def run(self, *args: object, expect: int = 0, timeout: float = 180) -> str:
        r = subprocess.run(self.argv(*args), capture_output=True, text=True, timeout=timeout, env=self.env)
        assert r.returncode == expect, f"fedprompt {' '.join(map(str, args))} -> {r.returncode}\n{r.stdout}\n{r.stderr}"
        return r.stdout


@pytest.fixture(scope="module")
def shared(tiny_dir):
    # Not tmp_path_factory: a concurrent pytest session may rotate its numbered folders away
    # while these daemons still use them.
    root = Path(tempfile.mkdtemp(prefix="fedprompt-walkthrough-"))
    try:
        backbone = shutil.copytree(tiny_dir, root / "backbone")  # the "local backbone directory" every party installs
        site = Site(VENV_BIN / "fedprompt", _env(root))
        pki, keys = root / "pki", root / "keys"
        # Section 2, step 1 (aggregator, once): CA + server certificate naming its host names.
        site.run("pki", "init", "--out", pki, "--host", "localhost", "--host", "127.0.0.1")
        # Section 2, step 2 (each hospital, once): its SuperNode key pair.
        for hospital in HOSPITALS:
            out = site.run("pki", "hospital", "--id", hospital, "--out", keys)
            assert "SHA256:" in out  # the fingerprint to confirm over a second channel (step 3)
        yield {"root": root, "backbone": backbone, "pki": pki, "keys": keys}
    finally:
        if not os.environ.get("FEDPROMPT_KEEP_DEPLOY"):
            shutil.rmtree(root, ignore_errors=True)


def _env(root: Path, target: Path | None = None) -> dict[str, str]:
    env = deploy_env(root)  # one thread per process; an inherited FLWR_HOME the daemons must not use
    # Flower starts flower-superexec / flwr-serverapp / flwr-clientapp by name: this venv's first.
    env["PATH"] = os.pathsep.join([str(VENV_BIN), env.get("PATH", "")])
    if target is not None:
        env["PYTHONPATH"] = str(target)
        # Byte-compiled files in T are the trace of a process that imported the wheel's code.
        env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def _build_wheel(root: Path) -> Path:
    """`pip wheel --no-deps` of a copy of the working tree (a build writes build/ and *.egg-info
    beside its sources: not into the shared checkout), installed with `pip install --target`."""
    src, dist, target = root / "src", root / "dist", root / "T"
    shutil.copytree(
        REPO,
        src,
        ignore=shutil.ignore_patterns(
            ".venv", ".git", "runs", "__pycache__", "*.egg-info", "build", "dist", ".pytest_cache", "results"
        ),
    )
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    # No build isolation: the venv's setuptools builds it (an isolated build would download one).
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(src)], check=True, timeout=300
    )
    (wheel,) = dist.glob("fedprompt-*.whl")
    # --no-compile: no byte code in T but what the walk-through's processes write there.
    subprocess.run(
        [*pip, "install", "--no-deps", "--no-compile", "--target", str(target), str(wheel)], check=True, timeout=300
    )
    return target


def _compiled(target: Path) -> set[str]:
    return {str(p.relative_to(target)) for p in target.rglob("*.pyc")}


@pytest.mark.parametrize("flavour", ["editable", "wheel"])
@pytest.mark.subprocess
def test_deployment_guide_walkthrough(flavour, shared, monkeypatch):
    t0 = time.monotonic()
    root = shared["root"] / flavour
    root.mkdir()
    # Every command runs from an operator's folder, not from the checkout: `python -c`/`-m` put
    # the current folder first on sys.path, and the checkout's fedprompt/ would shadow the wheel.
    monkeypatch.chdir(root)
    target = _build_wheel(root) if flavour == "wheel" else None
    env = _env(root, target)
    fp = Site(target / "bin" / "fedprompt" if target else VENV_BIN / "fedprompt", env)
    if target is not None:
        imported = subprocess.run(
            [sys.executable, "-c", "import fedprompt; print(fedprompt.__file__)"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        assert Path(imported).is_relative_to(target), imported
        assert fp.run("--version").strip() == "fedprompt 0.1.0"
    pki, keys, backbone = shared["pki"], shared["keys"], shared["backbone"]
    procs = Processes(root)
    try:
        # The aggregator's federation: label space and knobs in federation.yaml, its own test set.
        # `fedprompt data demo` writes both, and the synthetic records each hospital holds below.
        demo = root / "demo"
        fp.run("data", "demo", "--hospitals", "2", "--per-hospital", "40", "--out", demo)
        federation = root / "srv-federation"
        federation.mkdir()
        for name in ("federation.yaml", "test.csv"):
            shutil.copyfile(demo / name, federation / name)
        edit_yaml(federation / "federation.yaml", lambda d: d["model"].update(max_length=32))  # tiny backbone

        # Section 3: the aggregator daemon (SuperLink on its internal address + the Fleet-only proxy).
        state = root / "var-lib-fedprompt"
        link_port, fleet_port = free_port(), free_port()
        procs.start(
            "aggregator",
            fp.argv(
                "aggregator",
                "start",
                "--pki",
                pki,
                "--state",
                state,
                "--port",
                link_port,
                "--fleet-host",
                "127.0.0.1",
                "--fleet-port",
                fleet_port,
            ),
            env,
        )
        wait_for(lambda: can_connect(link_port) and can_connect(fleet_port), 180, "SuperLink and proxy ports")
        # Section 2, step 4: register each hospital's public key.
        for hospital in HOSPITALS:
            fp.run("aggregator", "register", "--state", state, keys / f"{hospital}.pub")

        # Section 4, at each hospital (both on this one host).
        sites = {}
        for n, hospital in enumerate(HOSPITALS, 1):
            home = root / hospital
            records, ledger = home / "data", home / "var-lib-fedprompt-site" / "privacy-ledger.json"
            records.mkdir(parents=True)
            for name in ("train.csv", "val.csv"):
                shutil.copyfile(demo / hospital / name, records / name)
            site = home / "etc-fedprompt" / "site.yaml"
            # Step 1: the site's config, from the commented template ...
            if n == 1:  # ... with the paths given at once,
                fp.run(
                    "hospital",
                    "init",
                    "--out",
                    site,
                    "--hospital-id",
                    hospital,
                    "--train",
                    records / "train.csv",
                    "--validation",
                    records / "val.csv",
                    "--ledger",
                    ledger,
                    "--backbone",
                    backbone,
                    # the label space it agreed to, pinned from the aggregator's federation.yaml
                    "--federation",
                    federation / "federation.yaml",
                )
            else:  # ... or filled in afterwards, as an editor would.
                out = fp.run("hospital", "init", "--out", site, "--hospital-id", hospital)
                assert "still to fill in (REQUIRED): train, ledger" in out
                assert "labels not pinned: the site trains nothing until `fedprompt hospital labels" in out
                text = site.read_text()
                for key, value in (
                    ("train", records / "train.csv"),
                    ("validation", records / "val.csv"),
                    ("ledger", ledger),
                    ("backbone", backbone),
                ):
                    assert text.count(f"\n{key}: null\n") == 1, key
                    text = text.replace(f"\n{key}: null\n", f"\n{key}: {value}\n")
                site.write_text(text)
            # ... checked by the site alone: no federation.yaml at a hospital; its labels against the
            # label space it pinned, if it did (the first hospital, at init).
            out = fp.run("data", "check", "--site", site)
            alone = (
                f"labels checked against the label space pinned in {site}"
                if n == 1
                else "not checked: the labels above against the federation's label space"
            )
            assert alone in out and out.rstrip().endswith("ok"), out
            assert "ledger: not created yet" in out
            # With the aggregator's federation.yaml handed over, the labels are checked too, and pinned.
            out = fp.run("data", "check", "--site", site, "--federation", federation / "federation.yaml")
            assert "labels checked against the label space of" in out
            if n != 1:
                pinned = fp.run("hospital", "labels", "--site", site, "--federation", federation / "federation.yaml")
                assert "labels pinned: " in pinned
            # Step 3: the ledger, once in the life of the site.
            fp.run("privacy", "init", "--site", site)
            sites[hospital] = (site, ledger)
        before = _compiled(target) if target else set()  # what the commands above imported
        for hospital, (site, _) in sites.items():
            # Step 4: the daemon. Several on one host: each its own --clientappio-port; FLWR_HOME
            # defaults to a folder beside the site's ledger.
            procs.start(
                hospital,
                fp.argv(
                    "hospital",
                    "start",
                    "--site",
                    site,
                    "--superlink",
                    f"127.0.0.1:{fleet_port}",
                    "--root-certificates",
                    pki / "ca.pem",
                    "--key",
                    keys / f"{hospital}.key",
                    "--clientappio-port",
                    free_port(),
                ),
                env,
            )

        # Section 3: submit the run (the default app: no --app), the aggregator on the sites' backbone.
        out_dir = root / "srv-runs-a"
        run = procs.start(
            "run",
            fp.argv(
                "aggregator",
                "run",
                "--state",
                state,
                "--workspace",
                federation,
                "--out",
                out_dir,
                "--rounds",
                "1",  # the default run: the one-shot class-sums release
                "--run-config",
                f'backbone="{backbone}"',
                "--timeout",
                RUN_TIMEOUT,
            ),
            env,
        )
        deadline = time.monotonic() + RUN_TIMEOUT + 60
        while (rc := run.poll()) is None:  # a daemon that dies fails the walk-through now, not at the deadline
            dead = [name for name in ("aggregator", *HOSPITALS) if procs.procs[name].poll() is not None]
            if dead:
                pytest.fail(
                    f"{dead[0]} exited with {procs.procs[dead[0]].returncode} during the run:\n"
                    + procs.log(dead[0])[-3000:]
                )
            if time.monotonic() > deadline:
                pytest.fail("`fedprompt aggregator run` did not return:\n" + procs.log("run")[-3000:])
            time.sleep(1)
        logs = {name: procs.log(name) for name in ("aggregator", "run", *HOSPITALS)}
        assert rc == 0, logs["run"][-4000:] + "\n--- hospital-1\n" + logs["hospital-1"][-3000:]
        run_log = logs["run"]
    finally:
        procs.stop_all()

    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [0, 1] and metrics["outcome"] == "trained"
    trained = metrics["rounds"][1]["hospitals"]
    assert sorted(trained) == list(HOSPITALS), trained
    lapsed = {h: r["reason"] for h, r in trained.items() if r["status"] != "ok"}
    # Only Flower declaring a daemon gone is tolerated (a lapsed heartbeat on a loaded 2-core host).
    assert len(lapsed) <= 1 and all(any(s in reason for s in FLOWER_LIVENESS) for reason in lapsed.values()), trained
    if lapsed:
        warnings.warn(f"a hospital missed the round on Flower's liveness check: {lapsed}", stacklevel=1)
    assert Path(metrics["export"]).is_dir() and "[fedprompt] run finished" in run_log
    for hospital, (site, ledger) in sites.items():
        # Section 4, step 3: the ledger, inspected at the site. One round spent the whole run's
        # request (epsilon 8) of the lifetime cap 8: a second run would be refused (section 4).
        shown = json.loads(fp.run("privacy", "show", "--site", site, "--json"))
        if hospital not in lapsed:
            assert len(shown["history"]) == 1 and 7.9 < float(shown["epsilon_spent"]) <= shown["epsilon_cap"] == 8.0, (
                shown
            )
        # The daemon's FLWR_HOME: beside its ledger, not the inherited $FLWR_HOME nor ~/.flwr.
        assert ledger.with_name(ledger.name + ".flwr-home").is_dir(), hospital
        assert f"127.0.0.1:{fleet_port}" in logs[hospital]  # the hospitals reached the proxy, not the SuperLink
    assert not (shared["root"] / flavour / "flwr-home-unused").exists()
    if target is not None:
        # The training and the ServerApp ran in processes the daemons started: they imported the
        # wheel's code (compiled into T only now), and no log names the editable tree's sources.
        new = _compiled(target) - before
        for module in ("fedprompt/client/__pycache__/trainer.", "fedprompt/server/__pycache__/server_app."):
            assert any(p.startswith(module) for p in new), (module, sorted(new))
        for name, text in logs.items():
            assert not any(d in text for d in SOURCE_DIRS), (name, [d for d in SOURCE_DIRS if d in text])
    print(f"\n[walkthrough:{flavour}] {time.monotonic() - t0:.1f}s (wheel build included: {target is not None})")
