"""The report rewritten after every round, off the round's critical path.

Rendering the page and its three plots takes 1-2 s on a small aggregator: done inline it was
part of every round's overhead (benchmarks/round.py). One background thread renders the latest
state; a newer round replaces a snapshot not yet rendered (only the latest view matters), and
`wait()` lets the run's final report be written after it, never interleaved with it.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from .report import write_report

log = logging.getLogger("fedprompt.server")


class LiveReport:
    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self._lock = threading.Lock()
        self._pending: dict | None = None
        self._thread: threading.Thread | None = None

    def submit(self, metrics: dict) -> None:
        with self._lock:
            self._pending = metrics
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._render, name="fedprompt-report", daemon=True)
                self._thread.start()

    def _render(self) -> None:
        while True:
            with self._lock:
                metrics, self._pending = self._pending, None
                if metrics is None:
                    return
            try:
                write_report(metrics, self.out_dir)
            except Exception:  # noqa: BLE001 - the report is a view of the checkpoint: never lose a round over it
                log.exception("could not rewrite the report")

    def wait(self) -> None:
        thread = self._thread
        if thread is not None:
            thread.join()
