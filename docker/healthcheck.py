"""Container HEALTHCHECK: is this container's service accepting connections?

FEDPROMPT_HEALTH_PORT (default 9094: the SuperNode's local runtime API) on 127.0.0.1; the
SuperLink sets 8000, the Fleet proxy 9443. A TCP connect is enough: each of these processes
binds its port only once it is up, and exits (so the container restarts) when it fails.
"""

import os
import socket
import sys

port = int(os.environ.get("FEDPROMPT_HEALTH_PORT", "9094"))
# Docker's HEALTHCHECK statuses (0 healthy, 1 unhealthy), not fedprompt's (common/exit_codes.py).
try:
    with socket.create_connection(("127.0.0.1", port), timeout=3):
        pass
except OSError as exc:
    print(f"unhealthy: 127.0.0.1:{port}: {exc}")
    sys.exit(1)
sys.exit(0)
