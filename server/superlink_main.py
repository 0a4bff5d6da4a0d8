"""`python -m fedprompt.server.superlink_main ARGS`: Flower's `flower-superlink` with a longer
SQLite busy timeout; `fedprompt aggregator start` runs the SuperLink this way.

Flower 1.42 opens its SQLite state with `PRAGMA busy_timeout = 5000` (a constant). When the
aggregator's CPU is starved (many hospitals reporting at once on a busy host), a writer waits
longer than 5 s, the SuperLink answers HTTP 500 "database is locked", and a SuperNode drops the
reply it was pushing without retrying: that hospital's update is lost for the round
(docs/reliability.md, finding E). Waiting up to 60 s turns those failures into delays.
"""

from __future__ import annotations

import sys

BUSY_TIMEOUT_MS = 60_000


def main() -> int:
    from flwr.supercore import sql_mixin  # Flower reads the pragmas from here on every connection
    from flwr.superlink.cli import flower_superlink

    sql_mixin.SQLITE_PRAGMAS = tuple(  # type: ignore[assignment]  # flwr's constant is typed as a fixed 7-tuple
        (name, str(BUSY_TIMEOUT_MS) if name == "busy_timeout" else value) for name, value in sql_mixin.SQLITE_PRAGMAS
    )
    sys.argv[0] = "flower-superlink"
    flower_superlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
