"""Where log records go: the operator's console, a run's log file, a daemon's stderr.

- Daemons (`hospital start`, `aggregator start|proxy`, the hospital worker): `configure_logging`,
  one line per record on stderr, as text or as JSON objects (`--log-format json`, for a collector).
- Flower's processes (flwr-serverapp, flwr-clientapp, Ray actors): `ensure_handler`.
- `fedprompt simulate` and `fedprompt.api.simulate`: `console` shows fedprompt's own lines (records
  marked CONSOLE or PROGRESS, and warnings); `captured_output` sends everything else, Flower's,
  Ray's and Opacus' output included, to RUN_DIR/logs/.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_FORMATS = ("text", "json")
# A daemon's --log-format, inherited by the processes it starts (the hospital's worker).
FORMAT_ENV = "FEDPROMPT_LOG_FORMAT"

# `extra=` of an INFO record meant for the operator's console; a PROGRESS line is rewritten in
# place by the next one on a terminal.
CONSOLE = {"fedprompt_console": "line"}
PROGRESS = {"fedprompt_console": "progress"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


def _formatter(fmt: str) -> logging.Formatter:
    return JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT)


def _is_console(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.StreamHandler) and handler.stream in (
        sys.stdout,
        sys.stderr,
        sys.__stdout__,
        sys.__stderr__,
    )


def add_log_format_argument(parser) -> None:
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default="text",
        help="text (default): timestamped lines; json: one JSON object per line (time, level, logger, message)",
    )


def configure_logging(fmt: str = "text") -> None:
    """A daemon's logging: records at INFO and above, one line each on stderr, and the format for
    the processes it starts afterwards. It replaces any console handler of the root logger (Opacus
    calls logging.basicConfig when imported); others (a test's log capture) stay."""
    os.environ[FORMAT_ENV] = fmt
    root = logging.getLogger()
    for old in [h for h in root.handlers if _is_console(h)]:
        root.removeHandler(old)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_formatter(fmt))
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def ensure_handler() -> None:
    """A Flower process has no handler for fedprompt's loggers: give them stderr at INFO, in the
    daemon's format (Flower mirrors that stream into the run's log), unless the host process (the
    CLI, a Ray worker, pytest) has configured logging already."""
    logger = logging.getLogger("fedprompt")
    logger.setLevel(logging.INFO)
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_formatter(os.environ.get(FORMAT_ENV, "text")))
        logger.addHandler(handler)


class ConsoleHandler(logging.Handler):
    """fedprompt's lines on the operator's console: records marked CONSOLE or PROGRESS, and
    warnings. On a terminal each progress line replaces the one before it; elsewhere (a pipe, a
    file, a notebook) every line stays."""

    def __init__(self, stream: TextIO, in_place: bool):
        super().__init__(logging.INFO)
        self.stream, self.in_place, self.pending = stream, in_place, False

    def emit(self, record: logging.LogRecord) -> None:
        kind = getattr(record, "fedprompt_console", None)
        if kind is None and record.levelno < logging.WARNING:
            return
        try:
            level = f"{record.levelname.lower()}: " if record.levelno >= logging.WARNING else ""
            text = f"[fedprompt] {level}{record.getMessage()}"
            if kind == "progress" and self.in_place:
                # Cut to the terminal's width: a wrapped line could not be rewritten in place.
                self.stream.write("\r\x1b[K" + text[: shutil.get_terminal_size().columns - 1])
                self.pending = True
            else:
                self.stream.write(("\n" if self.pending else "") + text + "\n")
                self.pending = False
            self.stream.flush()
        except Exception:  # noqa: BLE001 - logging's own contract: report, never raise
            self.handleError(record)

    def close(self) -> None:
        if self.pending:
            self.stream.write("\n")
            self.stream.flush()
            self.pending = False
        super().close()


@contextmanager
def console(stream: TextIO | None = None, *, in_place: bool | None = None) -> Iterator[ConsoleHandler]:
    """fedprompt's console lines on `stream` (default: stdout) while the block runs, and only
    there: the root logger's console handlers are detached meanwhile (Opacus calls
    logging.basicConfig when imported, which would print each line again, on stderr)."""
    stream = stream or sys.stdout
    handler = ConsoleHandler(stream, stream.isatty() if in_place is None else in_place)
    logger, root = logging.getLogger("fedprompt"), logging.getLogger()
    level = logger.level
    detached = [h for h in root.handlers if _is_console(h)]
    for h in detached:
        root.removeHandler(h)
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        handler.close()
        logger.setLevel(level)
        for h in detached:
            root.addHandler(h)


@contextmanager
def captured_output(log_file: Path, *, verbose: bool = False) -> Iterator[None]:
    """Every log record, warning and line printed while the block runs goes to `log_file`
    (appended). Unless `verbose`, nothing else reaches the console: the stream handlers of every
    logger (Flower's, Ray's) are detached and sys.stdout/sys.stderr point at the file, which is
    where Ray prints what its actors (the simulated hospitals) write. fedprompt's ConsoleHandler
    keeps the stream it was given. Import a library that binds a handler to the console at import
    (Ray) before the block, so that its handler is found and detached."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    sink = open(log_file, "a", encoding="utf-8", buffering=1)
    root = logging.getLogger()
    fedprompt = logging.getLogger("fedprompt")
    level = fedprompt.level
    if fedprompt.getEffectiveLevel() > logging.INFO:
        fedprompt.setLevel(logging.INFO)
    detached: list[tuple[logging.Logger, logging.Handler]] = []
    attached: list[tuple[logging.Logger, logging.Handler]] = []
    for logger in [root, *(lg for lg in logging.root.manager.loggerDict.values() if isinstance(lg, logging.Logger))]:
        had_handlers = bool(logger.handlers)
        for handler in [] if verbose else [h for h in logger.handlers if _is_console(h)]:
            logger.removeHandler(handler)
            detached.append((logger, handler))
        if logger is root or (had_handlers and not logger.propagate):
            # One handler each: Ray sets the formatter of every handler of its logger.
            handler = logging.StreamHandler(sink)
            handler.setFormatter(logging.Formatter(TEXT_FORMAT))
            handler.setLevel(logging.INFO)
            logger.addHandler(handler)
            attached.append((logger, handler))
    streams, color = (sys.stdout, sys.stderr), os.environ.get("RAY_COLOR_PREFIX")
    if not verbose:
        sys.stdout = sys.stderr = sink
        os.environ["RAY_COLOR_PREFIX"] = "0"  # Ray's prefix of an actor's lines, without colour codes
    try:
        yield
    finally:
        sys.stdout, sys.stderr = streams
        if not verbose:
            if color is None:
                os.environ.pop("RAY_COLOR_PREFIX", None)
            else:
                os.environ["RAY_COLOR_PREFIX"] = color
        for logger, handler in attached:
            logger.removeHandler(handler)
        for logger, handler in detached:
            logger.addHandler(handler)
        fedprompt.setLevel(level)
        sink.close()
