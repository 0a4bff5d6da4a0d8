"""The warm hospital worker and what it accepts to run.

- Bundles: only a code-free bundle naming the installed fedprompt (or one on the site's
  allow-list) is accepted; a bundle with a ClientApp of its own is refused as "untrusted app",
  through the executor's real answer path, and nothing from it runs.
- The worker process (a real `python -m fedprompt.client.worker`, tiny BERT): answers train
  messages with the same handler simulation uses; killed mid-round, the message gets a
  well-formed "worker unavailable" refusal, the worker is restarted, the next round trains, and
  the ledger is whole (the crashed round counted: recorded before training, over-count only).
  The worker writes no core file (its memory holds the records).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from conftest import make_workspace
from flwr.app import Message, Metadata, RecordDict
from flwr.cli.build import build_fab_from_disk

INSTALLED = (
    '[tool.flwr.app.components]\nserverapp = "fedprompt.server.server_app:app"\nclientapp = '
    '"fedprompt.client.client_app:app"\n'
)
PROJECT = (
    '[build-system]\nrequires = ["setuptools>=69"]\nbuild-backend = "setuptools.build_meta"\n\n[project]\nname = '
    '"app"\nversion = "1.0.0"\ndescription = ""\nlicense = "Apache-2.0"\n\n[tool.flwr.app]\npublisher = "x"\n\n'
)


def _bundle(folder: Path, components: str = INSTALLED, code: str | None = None) -> bytes:
    folder.mkdir(parents=True)
    (folder / "pyproject.toml").write_text(PROJECT + components)
    if code is not None:
        (folder / "evil").mkdir()
        (folder / "evil" / "__init__.py").write_text("")
        (folder / "evil" / "client_app.py").write_text(code)
    return build_fab_from_disk(folder)


def test_only_code_free_bundles_of_the_installed_components_are_accepted(tmp_path):
    from fedprompt.client.bundle import bundle_sha256, untrusted_reason

    assert untrusted_reason(_bundle(tmp_path / "ok")) is None
    packaged = tmp_path / "packaged"
    assert (
        untrusted_reason(_bundle(packaged, INSTALLED.replace("fedprompt.client.client_app:app", "evil.client_app:app")))
        is not None
    )
    with_code = _bundle(tmp_path / "code", code="import os\n")
    reason = untrusted_reason(with_code)
    assert reason is not None and "evil/client_app.py" in reason
    # The same bytes on the site's allow-list are accepted (the installed code still runs).
    assert untrusted_reason(with_code, frozenset({bundle_sha256(with_code)})) is None
    assert untrusted_reason(b"not a zip") is not None


# --- the worker process --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def site(tmp_path_factory, tiny_dir):
    """One demo hospital on the tiny BERT, its ledger created; returns (run, site.yaml)."""
    from fedprompt.client.workspace import list_hospitals, load_workspace
    from fedprompt.server.federation import RunSpec, prepare_run
    from fedprompt.simulation import ensure_ledgers

    root = tmp_path_factory.mktemp("worker")
    # 300 local epochs (full-batch steps on this small site): a DP-SGD round long enough to be killed mid-way
    overrides = {
        "rounds": 3,
        "round_timeout": 120.0,
        "model": {"n_virtual_tokens": 2, "max_length": 16},
        "training": {"local_epochs": 300},
    }
    ws = make_workspace(
        root,
        tiny_dir,
        hospitals=1,
        per_hospital=24,
        test_size=10,
        overrides=overrides,
        allow_non_private=False,
        name="w",
        seed=3,
    )
    ensure_ledgers(ws)
    fed, _, _ = load_workspace(ws)
    return prepare_run(RunSpec(fed, root / "out", None, tiny_dir)), list_hospitals(ws)[0]


def _train_content(run, round_: int) -> RecordDict:
    from fedprompt.common.plan import RoundPlan
    from fedprompt.common.wire import ARRAYS, state_to_arrays

    plan = RoundPlan.for_run(run.spec.federation, run.prompt, round=round_)
    return RecordDict({ARRAYS: state_to_arrays(run.state), "config": plan.to_config_record()})


def _status(content: RecordDict) -> tuple[str, str]:
    from fedprompt.common.wire import STATUS

    return content[STATUS]["status"], content[STATUS]["reason"]


@pytest.mark.subprocess
def test_worker_crash_mid_round_refuses_restarts_and_keeps_the_ledger_whole(site):
    from fedprompt.client.executor import WorkerHandle, WorkerUnavailable
    from fedprompt.client.ledger import PrivacyLedger
    from fedprompt.common.config import SiteConfig

    run, site_yaml = site
    worker = WorkerHandle(site_yaml, dict(os.environ))
    worker.start()
    try:
        deadline = time.monotonic() + 300
        reply, timing = worker.call("train", "r1", _train_content(run, 1), deadline)
        assert _status(reply) == ("ok", ""), reply
        assert timing["phases"]["train"] > 0
        first_pid = worker.proc.pid

        # Round 2: the worker is killed while it holds the message.
        killer = threading.Timer(0.3, lambda: os.kill(first_pid, signal.SIGKILL))
        killer.start()
        with pytest.raises(WorkerUnavailable):
            worker.call("train", "r1", _train_content(run, 2), time.monotonic() + 300)
        killer.join()
        assert worker.restarts == 1 and worker.alive() and worker.proc.pid != first_pid

        # Round 3 trains on the restarted worker.
        reply, _ = worker.call("train", "r1", _train_content(run, 3), time.monotonic() + 300)
        assert _status(reply) == ("ok", "")
    finally:
        worker.stop()
    ledger = PrivacyLedger.for_site(SiteConfig.load(site_yaml))  # the hash chain and anchor verify on load
    rounds = [e["round"] for e in json.loads(SiteConfig.load(site_yaml).ledger.read_text())["history"]]
    # Round 2 may have been recorded before the kill (over-count, never under-count); 1 and 3 always.
    assert rounds in ([1, 2, 3], [1, 3]), rounds
    assert len(ledger.completions) == 2 and ledger.epsilon_spent() > 0  # rounds 1 and 3 sent an update


@pytest.mark.subprocess
@pytest.mark.skipif(not Path("/proc/self/limits").exists(), reason="reads /proc/<pid>/limits (Linux)")
def test_the_worker_can_write_no_core_file(site):
    """A real worker, once warm: its core-file size limit is 0, soft and hard (so nothing in it can
    raise it again), as the kernel reports it in /proc/<pid>/limits, and it is not dumpable."""
    from fedprompt.client.executor import WorkerHandle

    _, site_yaml = site
    worker = WorkerHandle(site_yaml, dict(os.environ))
    worker.start()
    try:
        info = worker.wait_ready(time.monotonic() + 300)
        limits = Path(f"/proc/{worker.proc.pid}/limits").read_text().splitlines()
    finally:
        worker.stop()
    core = next(line for line in limits if line.startswith("Max core file size"))
    assert core.split()[4:6] == ["0", "0"], core
    assert info["dumpable"] == 0, info


@pytest.mark.subprocess
def test_hung_worker_is_replaced_before_the_deadline(site):
    from fedprompt.client.executor import WorkerHandle, WorkerUnavailable

    run, site_yaml = site
    worker = WorkerHandle(site_yaml, dict(os.environ))
    worker.start()
    try:
        worker.wait_ready(time.monotonic() + 300)
        os.kill(worker.proc.pid, signal.SIGSTOP)  # alive but silent
        t0 = time.monotonic()
        with pytest.raises(WorkerUnavailable, match="deadline"):
            worker.call("train", "r1", _train_content(run, 1), time.monotonic() + 2.0)
        assert time.monotonic() - t0 < 10
        assert worker.restarts == 1 and worker.alive()
    finally:
        worker.stop()


def _message(content: RecordDict) -> Message:
    md = Metadata(
        run_id=1,
        message_id="m1",
        src_node_id=0,
        dst_node_id=1,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=60,
        message_type="train",
    )
    return Message(metadata=md, content=content)


@pytest.mark.subprocess
def test_a_stopped_worker_is_answered_worker_unavailable_before_the_round_timeout(site, tmp_path):
    """The executor's own answer path, deadline from the plan's round timeout on the monotonic clock
    (it once compared time.time() with time.monotonic(): the early answer never came, and a site
    was charged for replies the aggregator had already dropped). A worker stopped before the
    message arrives answers nothing and charges nothing."""
    from fedprompt.client.executor import DEADLINE_MARGIN_S, Executor, WorkerHandle
    from fedprompt.common.config import SiteConfig

    run, site_yaml = site
    ledger = SiteConfig.load(site_yaml).ledger
    before = ledger.read_bytes()
    worker = WorkerHandle(site_yaml, dict(os.environ))
    worker.start()
    executor = Executor("127.0.0.1:1", b"secret", site_yaml, "hospital-1", frozenset(), worker)
    timeout = 4.0  # the aggregator stops waiting after this; the executor answers at max(timeout - margin, timeout / 2)
    assert timeout - DEADLINE_MARGIN_S < timeout / 2
    content = _train_content(run, 1)
    content["config"]["fp.round_timeout"] = timeout
    try:
        worker.wait_ready(time.monotonic() + 300)
        os.kill(worker.proc.pid, signal.SIGSTOP)  # alive, silent: it never reads the message
        received = time.monotonic()
        reply, _ = executor._answer(_message(content), _bundle(tmp_path / "app"), "train")
        answered = time.monotonic() - received
        assert _status(reply) == ("refused", "worker unavailable")
        assert timeout / 2 <= answered < timeout, answered  # at the executor's deadline, before the aggregator's
        assert worker.restarts == 1 and worker.alive()
    finally:
        worker.stop()
    assert ledger.read_bytes() == before  # nothing charged for a round that sent nothing


def test_executor_refuses_an_untrusted_bundle_without_running_it(site, tmp_path):
    """The executor's answer path: a bundle whose ClientApp would read the records is refused
    as "untrusted app" and the worker never sees the message (nothing of the bundle runs)."""
    from fedprompt.client.executor import Executor, WorkerHandle

    run, site_yaml = site
    marker = tmp_path / "ran"
    evil = _bundle(
        tmp_path / "evil",
        INSTALLED.replace("fedprompt.client.client_app:app", "evil.client_app:app"),
        code=f"open({str(marker)!r}, 'w').write(open({str(site_yaml.parent / 'train.csv')!r}).read())\n",
    )
    worker = WorkerHandle(site_yaml, dict(os.environ))  # never started: a call would raise
    executor = Executor("127.0.0.1:1", b"secret", site_yaml, "hospital-1", frozenset(), worker)
    content, _ = executor._answer(_message(_train_content(run, 1)), evil, "train")
    assert _status(content) == ("refused", "untrusted app")
    assert worker.proc is None and not marker.exists()
