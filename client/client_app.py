"""The hospital's Flower ClientApp: a thin layer over client/hospital.py.

`answer()` is the one entry for a message's reply: the ClientApp calls it in simulation (and in
a deployment run with `hospital start --executor flower`), the warm worker (client/worker.py)
calls it in a deployment. Any exception in a handler becomes a well-formed refusal of category
"internal" (traceback in the hospital's log), never Flower's error reply, which would carry the
exception's text (a record line, a label, a path) to the aggregator.

Which site a node is comes from its node config: `site-config` (the daemon's
`--node-config 'site-config="/site/site.yaml"'`), or in simulation the `partition-id` Flower
injects, mapped onto the workspace's hospitals. A ClientApp process logs one
`fedprompt-timing {json}` line per message in the hospital's own log (process start, import,
handler phases); it never leaves the site.
"""

from __future__ import annotations

import time

_IMPORT_START = time.time()  # before the heavy imports (torch, transformers, opacus, flwr)

import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from flwr.app import Context, Message, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

from fedprompt.common.logs import ensure_handler  # noqa: E402
from fedprompt.common.wire import MAX_HOSPITAL_ID, refusal, round_of  # noqa: E402

from .hospital import evaluate_round, train_round  # noqa: E402
from .preflight import preflight  # noqa: E402
from .workspace import list_hospitals  # noqa: E402

_IMPORT_END = time.time()
TIMING_TAG = "fedprompt-timing"
log = logging.getLogger("fedprompt.client")


def site_path(context: Context, site_paths: list[Path] | None = None) -> Path:
    node = context.node_config
    if "site-config" in node:
        return Path(str(node["site-config"]))
    if "partition-id" in node:
        paths = site_paths
        if paths is None and context.run_config.get("workspace"):
            paths = list_hospitals(Path(str(context.run_config["workspace"])))
        if paths:
            return paths[int(node["partition-id"]) % len(paths)]
    raise RuntimeError("node config has no 'site-config' (path to this hospital's site.yaml)")


def process_start_time() -> float | None:
    """Wall-clock time this process started (Linux /proc), to ~10 ms; None elsewhere."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))


def _log_timing(kind: str, msg: Message, site: Path, start: float, timings: dict[str, float]) -> None:
    config = msg.content.config_records.get("config")
    log.info(
        "%s %s",
        TIMING_TAG,
        json.dumps(
            {
                "type": kind,
                "site": site.parent.name,
                "round": round_of(config),
                "pid": os.getpid(),
                "sent": msg.metadata.created_at,
                "process_start": process_start_time(),
                "import_start": _IMPORT_START,
                "import_end": _IMPORT_END,
                "handler_start": start,
                "handler_end": time.time(),
                "phases": {k: round(v, 4) for k, v in timings.items()},
            }
        ),
    )


def _fallback_id(site: Path | None, context: Context) -> str:
    """Who this node is, for an "internal" refusal, without reading anything that could fail."""
    name = context.node_config.get("hospital-id") if isinstance(context.node_config, dict) else None
    if not isinstance(name, str) and site is not None:
        name = site.parent.name
    return name if isinstance(name, str) and 0 < len(name) <= MAX_HOSPITAL_ID else "unknown"


def answer(kind: str, content: RecordDict, site: Path, *, run_id: str = "") -> tuple[RecordDict, dict[str, float]]:
    """The reply to one message and the seconds of its phases: what the ClientApp (simulation,
    Flower's own executor) and the warm worker (client/worker.py) both call.

    Any exception becomes an "internal" refusal: its text (a record line, a label, a path) must
    not leave the site, so the traceback goes to this site's log only.
    """
    timings: dict[str, float] = {}
    try:
        # looked up per call (tests patch them); "query" is the run's pre-flight (client/preflight.py)
        handler = {"train": train_round, "evaluate": evaluate_round, "query": preflight}[kind]
        return handler(content, site, run_id=run_id, timings=timings), timings
    except Exception:  # noqa: BLE001 - whatever it is, its text must not leave the site
        fallback = site.parent.name if 0 < len(site.parent.name) <= MAX_HOSPITAL_ID else "unknown"
        log.exception(
            "%s: %s message failed; replying with an 'internal' refusal (details only in this log)", fallback, kind
        )
        return refusal(fallback, "internal"), timings


def make_client_app(site_paths: list[Path] | None = None, torch_threads: int | None = None) -> ClientApp:
    app = ClientApp()

    def setup() -> None:
        ensure_handler()  # a flwr-clientapp process or a Ray actor: the hospital's log is its stderr
        if torch_threads:
            torch.set_num_threads(torch_threads)  # simulated hospitals share the host's cores

    def handle(kind: str, msg: Message, context: Context) -> Message:
        site: Path | None = None
        try:
            setup()
            site = site_path(context, site_paths)
        except Exception:  # noqa: BLE001 - as in answer(): the text stays here
            log.exception(
                "%s: %s message failed; replying with an 'internal' refusal (details only in this log)",
                _fallback_id(site, context),
                kind,
            )
            return Message(content=refusal(_fallback_id(site, context), "internal"), reply_to=msg)
        start = time.time()
        content, timings = answer(kind, msg.content, site, run_id=str(msg.metadata.run_id))
        try:
            _log_timing(kind, msg, site, start, timings)
        except Exception:  # noqa: BLE001 - the timing line is diagnostics: never lose a reply over it
            log.exception("could not log the %s timing line", kind)
        return Message(content=content, reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return handle("train", msg, context)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return handle("evaluate", msg, context)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return handle("query", msg, context)

    return app


# `flwr run .` / flower-supernode entry point (pyproject: [tool.flwr.app.components]).
app = make_client_app()
