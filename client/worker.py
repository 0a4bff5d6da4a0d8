"""The warm hospital worker: one long-lived process that answers this site's messages.

Flower 1.42 starts a fresh `flwr-clientapp` process per message, which imports torch,
transformers and opacus, loads the backbone and re-reads the records every time (tens of
seconds a round). The worker does that once: it holds the imported libraries, the backbone (on
the site's GPU when it has one), the tokenised records (cached by the file's sha256, so a
changed file is re-read and re-validated) and the frozen features, and serves the installed
fedprompt's handlers (client/client_app.answer, the very function simulation calls).

It speaks only to its supervisor (client/daemon.py), over a socket pair inherited at spawn: no
address, no file, nothing another local user could open. Requests and replies are Flower
RecordDicts serialised with Flower's own protobuf codec.

    supervisor -> worker   ("message", kind, run_id, RecordDict protobuf bytes)
    worker -> supervisor   ("ready", info) once warm; ("reply", RecordDict bytes, timing) per message

Run by the daemon only: `python -m fedprompt.client.worker --site SITE --fd N`. It writes no core
file: its memory holds the site's records, their features and the training state.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import resource
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path

from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

from fedprompt.common.logs import FORMAT_ENV, configure_logging

log = logging.getLogger("fedprompt.worker")

PR_GET_DUMPABLE, PR_SET_DUMPABLE = 3, 4  # linux/prctl.h


def no_core_dumps() -> int | None:
    """Before any record is read: no core file (RLIMIT_CORE 0, the hard limit too, so nothing in the
    process raises it again) and, on Linux, not dumpable (no core whatever the limit, no ptrace attach
    by the site's other non-root processes). Returns the dumpable flag the kernel then reports (0), or
    None where prctl is not available."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    if prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        log.warning("could not mark the worker non-dumpable (errno %d); core files stay off", ctypes.get_errno())
    return prctl(PR_GET_DUMPABLE, 0, 0, 0, 0)


def encode_content(content) -> bytes:
    return recorddict_to_proto(content).SerializeToString()


def decode_content(data: bytes):
    proto = ProtoRecordDict()
    proto.ParseFromString(data)
    return recorddict_from_proto(proto)


def warm_up(site_path: Path, dumpable: int | None = None) -> dict:
    """Import the training stack and load the site's backbone before the first message arrives."""
    from fedprompt.client.hospital import cached_backbone
    from fedprompt.client.trainer import resolve_device
    from fedprompt.common.config import SiteConfig

    site = SiteConfig.load(site_path)
    backbone = cached_backbone(str(site.backbone) if site.backbone else None)
    device = resolve_device(site.device)
    # stays there across rounds (transformers' decorator hides `to`'s signature from type checkers)
    backbone.model.to(device)  # type: ignore[arg-type]
    return {
        "pid": os.getpid(),
        "hospital": site.hospital_id,
        "device": str(device),
        "backbone": backbone.fingerprint[:16],
        "dumpable": dumpable,
    }


def serve(conn: Connection, site_path: Path, dumpable: int | None = None) -> int:
    from fedprompt.client.client_app import answer
    from fedprompt.client.hospital import project_next_round

    try:
        info = warm_up(site_path, dumpable)
    except Exception:  # noqa: BLE001 - whatever fails, the supervisor answers "worker unavailable"
        log.exception("the worker could not start for %s", site_path)
        return 1
    log.info(
        "worker ready (pid %d, %s on %s, backbone %s...)",
        info["pid"],
        info["hospital"],
        info["device"],
        info["backbone"],
    )
    conn.send(("ready", info))
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return 0  # the supervisor is gone: so is the site's daemon
        _, kind, run_id, data = request
        start = time.time()
        content, timings = answer(kind, decode_content(data), site_path, run_id=run_id)
        conn.send(
            ("reply", encode_content(content), {"handler_start": start, "handler_end": time.time(), "phases": timings})
        )
        try:
            project_next_round(site_path)  # between rounds, off the round's critical path
        except Exception:  # noqa: BLE001 - an optimisation: the next round computes it itself if this fails
            log.debug("could not project the next round's epsilon", exc_info=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedprompt-worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--site", type=Path, required=True)
    parser.add_argument("--fd", type=int, required=True, help="the socket inherited from the supervisor")
    args = parser.parse_args(argv)
    configure_logging(os.environ.get(FORMAT_ENV, "text"))  # the daemon's --log-format
    dumpable = no_core_dumps()
    return serve(Connection(args.fd), args.site, dumpable)


if __name__ == "__main__":
    sys.exit(main())
