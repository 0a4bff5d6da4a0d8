"""An in-process engine for the product's own apps: the ServerApp's main runs unchanged on a Flower
`Grid` that hands each message, synchronously, to the ClientApp in this same process.

Flower's simulation engine (Ray) does the same with one actor process per virtual node: correct,
but slow to start (seconds of Ray start-up per run) and heavy for dozens of federations in one
benchmark, each of which would encode every site's records again in fresh processes. Here every
simulated hospital is one `Context` in this process, given the node config the Ray engine gives
(`partition-id`, `num-partitions`: client/client_app.py `site_path` maps it onto the workspace's
hospitals), and the process-wide caches (backbone, encoded records, frozen features) serve every
hospital and every run.

Messages cross as they would over the wire: a deep copy of the instruction reaches the ClientApp,
a deep copy of its reply comes back, with the metadata Flower's engines set (message ids,
`reply_to_message_id`, src/dst node ids swapped by `Message(..., reply_to=...)`). A ClientApp
that raises becomes Flower's error reply (`CLIENT_APP_RAISED_EXCEPTION`), as in the Ray engine's
worker (flwr/server/superlink/fleet/vce/vce_api.py). Messages are handled one at a time, in
order: a run's outcome does not depend on thread timing.
"""

from __future__ import annotations

import copy
import logging
import secrets
from collections.abc import Iterable, Sequence
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import (
    NUM_PARTITIONS_KEY,
    PARTITION_ID_KEY,
    SUPERLINK_NODE_ID,
    ErrorCode,
)
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

log = logging.getLogger("fedprompt.server")

ENGINES = ("ray", "local")


def _random_id() -> int:
    """A 63-bit id as Flower draws them (never the SuperLink's own node id)."""
    while (value := secrets.randbits(63)) in (0, SUPERLINK_NODE_ID):
        pass
    return value


class LocalGrid(Grid):
    """`num_nodes` virtual nodes, each answering with `client_app` in this process. `names`: the
    hospital each partition is (client/client_app.py `site_path`'s order), for this engine's own
    log lines."""

    def __init__(self, client_app: ClientApp, num_nodes: int, run_id: int | None = None, names: Sequence[str] = ()):
        if num_nodes < 1:
            raise ValueError(f"a federation needs at least one node, got {num_nodes}")
        self.client_app = client_app
        self.task_id = _random_id()  # the ServerApp's task, as the SuperLink registers it
        self._run = Run.create_empty(run_id=run_id if run_id is not None else _random_id())
        self._run.primary_task_id = self.task_id
        self.contexts: dict[int, Context] = {}
        while len(self.contexts) < num_nodes:
            node_id = _random_id()
            if node_id not in self.contexts:
                self.contexts[node_id] = self._node_context(node_id, len(self.contexts), num_nodes)
        self._replies: dict[str, Message] = {}
        self.names = {
            node: names[partition % len(names)] if names else f"node {node}"
            for partition, node in enumerate(self.contexts)
        }

    def _node_context(self, node_id: int, partition: int, num_nodes: int) -> Context:
        # What the Ray engine's node store registers for each virtual node (vce_api._register_node_info_stores).
        return Context(
            run_id=self._run.run_id,
            node_id=node_id,
            node_config={PARTITION_ID_KEY: partition, NUM_PARTITIONS_KEY: num_nodes},
            state=RecordDict(),
            run_config=dict(self._run.override_config),
        )

    def set_run(self, run: Run) -> None:
        if not isinstance(run, Run):
            raise TypeError(f"`run` must be an instance of Run, got {type(run).__name__}")
        self._run = run

    @property
    def run(self) -> Run:
        return Run(**vars(self._run))

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Deliver each message now; its reply waits for `pull_messages`."""
        ids = []
        for msg in messages:
            if msg.metadata.reply_to_message_id or msg.metadata.ttl <= 0:
                raise ValueError(f"not an instruction message: {msg.metadata}")
            if msg.metadata.dst_node_id not in self.contexts:
                raise ValueError(f"no node {msg.metadata.dst_node_id} in this federation")
            msg.metadata.__dict__["_message_id"] = str(uuid4())  # as the SuperLink assigns it
            self._replies[msg.metadata.message_id] = self._deliver(msg)
            ids.append(msg.metadata.message_id)
        return ids

    def _deliver(self, msg: Message) -> Message:
        received = copy.deepcopy(msg)  # the node gets its own copy, as over the wire
        context = self.contexts[msg.metadata.dst_node_id]
        try:
            reply = self.client_app(message=received, context=context)
        except Exception as exc:  # noqa: BLE001 - Flower's engines turn it into an error reply too
            log.exception("%s: ClientApp raised", self.names[msg.metadata.dst_node_id])
            reply = Message(
                Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(exc)}:<'{exc}'>"), reply_to=received
            )
        reply = copy.deepcopy(reply)
        reply.metadata.__dict__["_message_id"] = str(uuid4())
        return reply

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Every reply is in when push returns: `timeout` has nothing to wait for."""
        return self.pull_messages(list(self.push_messages(messages)))


def run_local(server_app: ServerApp, client_app: ClientApp, nodes: int | Sequence[str]) -> Context:
    """Run `server_app`'s main on a LocalGrid of `nodes` nodes (a count, or the hospitals' names in
    partition order); returns the ServerApp's context."""
    names = () if isinstance(nodes, int) else tuple(nodes)
    grid = LocalGrid(client_app, nodes if isinstance(nodes, int) else len(names), names=names)
    # The process' task identity, which `Message(...)` stamps on instructions (Flower's
    # run_simulation sets the same for its ServerApp thread).
    TaskIdentity.run_id = grid.run.run_id
    TaskIdentity.task_id = grid.task_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    context = Context(run_id=grid.run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config={})
    server_app(grid=grid, context=context)
    return context
