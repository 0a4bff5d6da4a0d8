"""This hospital's session at the aggregator (Flower's node activation), which the daemon clears itself.

The SuperLink holds an activated node online until it misses two heartbeats (2 x 30 s) and refuses
to activate it again meanwhile: a SuperNode that crashed (it cannot deactivate itself) made every
restart within that window fail with Flower's exit code 305 ("Failed to activate SuperNode"). So the
hospital daemon, with the SuperNode's own key and Fleet calls (signed like the SuperNode's):

- before its SuperNode starts, activates the node and at once deactivates it: this learns the node
  id (stable for a registered key; kept in FLWR_HOME/node-id, so that a daemon killed whole is
  cleared by its next start). An aggregator out of reach, or any answer but Flower's refusal,
  leaves the rest to the SuperNode (it retries, or reports the error);
- if that activation is refused and the node id is known: deactivates the old session and tries
  again; if it is not known: tries again with a backoff, for at most WAIT_S (the old session's
  end; `--max-wait-time` shortens it), one log line per try; then starts the SuperNode, which
  reports Flower's own error;
- after its SuperNode died: deactivates the node (one try) before it exits.

Only the node's own key can deactivate it (the SuperLink checks the signature against the node id).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import httpx
from flwr.proto.fleet_pb2 import ActivateNodeRequest, DeactivateNodeRequest
from flwr.supercore.interceptors.http.runtime_version import RuntimeVersionHttpInterceptor
from flwr.supercore.primitives.asymmetric import public_key_to_bytes
from flwr.supernode.fleet_http_client import FleetHttpClient
from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

from fedprompt.common.atomic import atomic_write
from fedprompt.common.pki import check_hospital_key

log = logging.getLogger("fedprompt.daemon")

HEARTBEAT_S = 30  # flwr.common.constant.HEARTBEAT_DEFAULT_INTERVAL, sent by the SuperNode at activation
WAIT_S = 2 * HEARTBEAT_S + 15  # the SuperLink's patience (2 heartbeats) after the last one, and a margin
FIRST_BACKOFF_S, MAX_BACKOFF_S = 2.0, 15.0
NODE_ID_FILE = "node-id"


@dataclass
class FleetSession:
    superlink: str
    root_certificates: Path
    key: Path
    state_dir: Path
    wait_s: float = WAIT_S  # `hospital start --max-wait-time` shortens it
    node_id: int | None = None

    def _client(self) -> FleetHttpClient:
        private = check_hospital_key(self.key)
        return FleetHttpClient.from_server_address(
            self.superlink,
            False,
            str(self.root_certificates),
            interceptors=[
                RuntimeVersionHttpInterceptor(component_name="SuperNode"),
                NodeAuthHttpInterceptor(private, private.public_key()),
            ],
        )

    def _saved_node_id(self) -> int | None:
        try:
            return int((self.state_dir / NODE_ID_FILE).read_text())
        except (OSError, ValueError):
            return None

    def clear(self, stopped: threading.Event) -> None:
        """Before the SuperNode starts: leave the node deactivated, its id known (module docstring)."""
        self.node_id = self._saved_node_id()
        public = public_key_to_bytes(check_hospital_key(self.key).public_key())
        backoff, waited, cleared = FIRST_BACKOFF_S, 0.0, False
        with self._client() as client:
            while not stopped.is_set():
                try:
                    res = client.ActivateNode(ActivateNodeRequest(public_key=public, heartbeat_interval=HEARTBEAT_S))
                except (httpx.HTTPError, RuntimeError) as exc:
                    if not _activation_refused(exc):  # unreachable, or a key it does not know: the SuperNode says
                        log.info("node session check: %r; starting the SuperNode", exc)
                        return
                    if self.node_id is not None and not cleared:
                        cleared = self._deactivate(client, "its previous session")
                        if cleared:
                            continue
                    if waited >= self.wait_s:
                        log.warning(
                            "the aggregator still refuses this node after %.0f s: starting the SuperNode", waited
                        )
                        return
                    log.warning(
                        "the aggregator refused to activate this hospital's node (Flower: Failed to activate "
                        "SuperNode): its previous session may still be open until it misses 2 heartbeats, or its key "
                        "is not registered; trying again in %.0f s (for at most %.0f s more)",
                        backoff,
                        self.wait_s - waited,
                    )
                    stopped.wait(backoff)
                    waited, backoff = waited + backoff, min(backoff * 2, MAX_BACKOFF_S)
                    continue
                self.node_id = res.node_id
                atomic_write(self.state_dir / NODE_ID_FILE, f"{res.node_id}\n")
                self._deactivate(client, "the session this check opened")
                return

    def close(self) -> None:
        """After the SuperNode died: end the session it left open, so that a restart is activated at once."""
        if self.node_id is None:
            return
        try:
            with self._client() as client:
                self._deactivate(client, "the session of the SuperNode that ended")
        except (httpx.HTTPError, RuntimeError, OSError) as exc:
            log.warning("could not deactivate the node's session (%r): a restart may wait up to %d s", exc, WAIT_S)

    def _deactivate(self, client: FleetHttpClient, what: str) -> bool:
        assert self.node_id is not None
        try:
            client.DeactivateNode(DeactivateNodeRequest(node_id=self.node_id))
        except (httpx.HTTPError, RuntimeError) as exc:
            log.debug("deactivating node %d: %r", self.node_id, exc)
            return False
        log.info("deactivated node %d at the aggregator (%s)", self.node_id, what)
        return True


def _activation_refused(exc: Exception) -> bool:
    """Flower's "Failed to activate SuperNode": the node is still online, or its key is unknown."""
    return isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code == httpx.codes.PRECONDITION_FAILED
