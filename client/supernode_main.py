"""`python -m fedprompt.client.supernode_main ARGS`: Flower's `flower-supernode` polling the
aggregator every POLL_S seconds when idle instead of 3 s; `fedprompt hospital start` runs the
SuperNode this way.

Flower 1.42's SuperNode loop (`flwr/supernode/start_client_internal.py`) sleeps a literal 3 s
after every pull that finds no message, and checks its local state for the site's reply every
0.5 s. With a warm worker those two waits are most of a round's overhead (a round instruction
waits 1.5 s on average before a hospital even sees it; benchmarks/round.py). This wrapper gives
that module a `time` whose `sleep` shortens exactly those two waits, and a short backoff for
the message objects it fetches (common/flower_polling.py); everything else in Flower is unchanged.
Pinned to flwr 1.42 (pyproject.toml): a Flower upgrade must re-check the literals.
Cost: one Fleet pull per POLL_S per hospital at the aggregator's proxy while idle.
"""

from __future__ import annotations

import os
import sys
import time
import types
from typing import cast

POLL_S = float(os.environ.get("FEDPROMPT_SUPERNODE_POLL_S", "1.0"))  # Flower: 3 s
REPLY_CHECK_S = 0.1  # Flower: 0.5 s; a check of the SuperNode's own in-memory state
FLOWER_IDLE_S, FLOWER_REPLY_CHECK_S = 3, 0.5  # the literals in flwr 1.42's loop


def _sleep(seconds: float) -> None:
    if seconds == FLOWER_IDLE_S:
        seconds = POLL_S
    elif seconds == FLOWER_REPLY_CHECK_S:
        seconds = REPLY_CHECK_S
    time.sleep(seconds)


def main() -> int:
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli.flower_supernode import flower_supernode

    from fedprompt.common.exit_codes import ExitCode
    from fedprompt.common.flower_polling import shorten_object_pull_backoff

    if not 0.05 <= POLL_S <= 60:
        print(f"error: FEDPROMPT_SUPERNODE_POLL_S must be between 0.05 and 60 seconds, got {POLL_S}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    patched = types.SimpleNamespace(**{name: getattr(time, name) for name in dir(time) if not name.startswith("_")})
    patched.sleep = _sleep
    # only this module's waits; time.time & co. unchanged (a stand-in for the module: a cast for the type checker)
    start_client_internal.time = cast(types.ModuleType, patched)
    shorten_object_pull_backoff(start_client_internal)  # the message's objects, fetched from the aggregator
    sys.argv[0] = "flower-supernode"
    flower_supernode()
    return 0


if __name__ == "__main__":
    sys.exit(main())
