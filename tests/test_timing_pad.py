"""Timing: a reply leaves the site at a point of a fixed grid (site.yaml `reply_after_s` x 2^k, or
the deadline), never when it is ready, and its Flower stamp is floored to the whole second
(client/reply_timing.py). Two real workers (tiny BERT) whose sites differ 40-fold in records
answer through the executor's reply path at the same moment."""

from __future__ import annotations

import math
import os
import random
import threading
import time

import pytest
from conftest import edit_yaml
from flwr.app import Message, Metadata, RecordDict

from fedprompt.client.reply_timing import coarse_stamp, hold

from tinybert import TOY_KEYWORDS, TOY_LABELS, TOY_NEUTRAL


def test_hold_waits_for_the_grid_point():
    received = time.monotonic()
    time.sleep(0.3)  # the "work"
    assert hold(received, 1.0) == 1.0
    assert 1.0 <= time.monotonic() - received < 1.2


def _message(content: RecordDict, created_at: float) -> Message:
    md = Metadata(
        run_id=1,
        message_id="m1",
        src_node_id=1,
        dst_node_id=2,
        reply_to_message_id="",
        group_id="1",
        created_at=created_at,
        ttl=600.0,
        message_type="train",
    )
    return Message(metadata=md, content=content)


def _assert_whole_second_stamp(reply: Message, to: Message) -> None:
    created, ttl = reply.metadata.created_at, reply.metadata.ttl
    assert created == math.floor(created)  # no sub-second time of the site's
    # the TTL ends where the message replied to expires: it is the aggregator's own expiry minus a whole second
    assert created + ttl == pytest.approx(to.metadata.created_at + to.metadata.ttl, abs=1e-6)


def test_the_reply_stamp_is_floored_to_the_second():
    to = _message(RecordDict(), time.time() - 3.123456)
    raw = Message(content=RecordDict(), reply_to=to)
    assert raw.metadata.created_at != math.floor(raw.metadata.created_at)  # Flower's stamp: microseconds
    reply = coarse_stamp(Message(content=RecordDict(), reply_to=to), to)
    _assert_whole_second_stamp(reply, to)
    assert 0 <= time.time() - reply.metadata.created_at < 2


# --- two sites, 40-fold apart in records, answered by real workers -----------------------------------
GRID_S = 30.0  # above the larger site's first round on a loaded 2-core host (tens of seconds)


@pytest.fixture(scope="module")
def sites(tmp_path_factory, tiny_dir):
    """A small (20 records) and a large (800) site on one tiny BERT, reply_after_s GRID_S: their
    round-1 content and site.yaml paths."""
    from fedprompt.client.workspace import list_hospitals, load_workspace, write_workspace
    from fedprompt.common.backbone import load_backbone
    from fedprompt.common.plan import RoundPlan, initial_global_state_for, prompt_config
    from fedprompt.common.wire import ARRAYS, state_to_arrays
    from fedprompt.simulation import ensure_ledgers

    root = tmp_path_factory.mktemp("timing")
    rng = random.Random(0)

    def rows(n: int) -> list[tuple[str, str]]:
        out = []
        for _ in range(n):
            y = rng.randrange(len(TOY_LABELS))
            out.append((" ".join(rng.choices(TOY_KEYWORDS[y], k=3) + rng.choices(TOY_NEUTRAL, k=8)), TOY_LABELS[y]))
        return out

    ws = write_workspace(
        root / "ws",
        name="timing",
        labels=TOY_LABELS,
        hospitals={"1": (rows(20), rows(6)), "2": (rows(800), rows(6))},
        federation_overrides={
            "round_timeout": 120.0,
            "model": {"n_virtual_tokens": 2, "max_length": 32},
            "training": {"train_prompt": False},
        },
        epsilon_cap=10.0,
        backbone=tiny_dir,
    )
    paths = list_hospitals(ws)
    for path in paths:
        edit_yaml(path, lambda d: d.update(reply_after_s=GRID_S))
    ensure_ledgers(ws)
    fed, _, _ = load_workspace(ws)
    backbone = load_backbone(tiny_dir)
    plan = RoundPlan.for_run(fed, prompt_config(fed, backbone), round=1)
    state = initial_global_state_for(fed, backbone)
    return RecordDict({ARRAYS: state_to_arrays(state), "config": plan.to_config_record()}), paths


@pytest.mark.slow
@pytest.mark.subprocess
def test_sites_of_very_different_size_reply_at_the_same_padded_time(sites, tmp_path):
    from test_worker import _bundle

    from fedprompt.client.executor import Executor, WorkerHandle
    from fedprompt.common.wire import STATUS

    content, paths = sites
    fab = _bundle(tmp_path / "app")
    workers = [WorkerHandle(path, dict(os.environ)) for path in paths]
    results: dict[int, tuple] = {}

    def answer(i: int, to: Message) -> None:
        executor = Executor("127.0.0.1:1", b"secret", paths[i], f"hospital-{i + 1}", frozenset(), workers[i])
        t0 = time.monotonic()
        reply, timing = executor.reply(to, fab, "train")
        results[i] = (time.monotonic() - t0, reply, timing)

    try:
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.wait_ready(time.monotonic() + 300)
        messages = [_message(content, time.time()) for _ in paths]
        threads = [threading.Thread(target=answer, args=(i, m)) for i, m in enumerate(messages)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        for worker in workers:
            worker.stop()
    (small, small_reply, small_timing), (large, large_reply, large_timing) = results[0], results[1]
    for reply, to in ((small_reply, messages[0]), (large_reply, messages[1])):
        assert reply.content[STATUS]["status"] == "ok", reply.content[STATUS]
        _assert_whole_second_stamp(reply, to)
    # Ready at different times (the large site encodes and sums 40x the records) ...
    busy = [t["handler_end"] - t["handler_start"] for t in (small_timing, large_timing)]
    assert busy[1] > busy[0] and busy[1] < GRID_S, busy
    # ... both leave at the grid point, GRID_S after arrival.
    assert GRID_S <= small < GRID_S + 0.5 and GRID_S <= large < GRID_S + 0.5, (small, large, busy)
    assert abs(small - large) < 0.3, (small, large)
