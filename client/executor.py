"""The hospital's own executor: takes this site's messages from its SuperNode and has the warm
worker answer them, running only the installed fedprompt.

In `--isolation process` mode a Flower 1.42 SuperNode runs no app code itself: it queues each
message as a task on its local Runtime API (127.0.0.1) for an executor. Flower's executor
(`flower-superexec`) would start a `flwr-clientapp` process per message that installs the
submitted app bundle and imports its ClientApp. This executor does the same protocol steps with
Flower's own client functions, but never installs or imports the bundle: it checks the bundle
(client/bundle.py) and hands the message to the worker (client/worker.py), which holds the
backbone and the records between rounds.

    AcquireTask (signed with the daemon's SuperExec secret: no other local process can take a task)
    -> PullTaskInput + PullMessages (token-bound)   task heartbeats while the worker computes
    -> worker.call(...)                              refusal "untrusted app" / "worker unavailable"
    -> PushMessages + PushTaskOutput

Pinned to flwr 1.42 (these are its runtime client functions; pyproject.toml pins flwr 1.42.x).
A crashed or hung worker is restarted; the message in flight gets a well-formed refusal before
the round's timeout; the ledger rule is unchanged (recorded before training: a crash can only
over-count).
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.common.constant import SubStatus
from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
from flwr.proto.node_pb2 import Node
from flwr.proto.runtime_pb2 import AcquireTaskRequest, PullAppMessagesRequest, PullTaskInputRequest
from flwr.supercore.constant import TaskType
from flwr.supercore.fab import Fab
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.interceptors.http.superexec_auth import SuperExecAuthHttpInterceptor
from flwr.supercore.retry import RetryInvoker, make_simple_http_retry_invoker
from flwr.supercore.run import Run
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.task_identity import TaskIdentity
from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

from fedprompt.common.flower_polling import BACKOFF_CAP_S, INITIAL_BACKOFF_S
from fedprompt.common.wire import refusal, round_of

from .bundle import untrusted_reason
from .reply_timing import coarse_stamp, hold, site_grid
from .worker import decode_content, encode_content

log = logging.getLogger("fedprompt.executor")

TIMING_TAG = "fedprompt-timing"
POLL_S = 0.05  # AcquireTask on loopback: cheap, and every poll interval is added to each round
DEFAULT_DEADLINE_S = 3600.0  # a message whose plan names no round timeout
DEADLINE_MARGIN_S = 10.0  # refuse this long before the aggregator stops waiting, so the refusal arrives
RUNTIME_RETRY_S = 10.0  # the SuperNode's Runtime API, on loopback: unanswered this long, the SuperNode is gone
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def pull_task_input(client: RuntimeHttpClient) -> tuple[Message, Context, Run, Fab]:
    """The task's message, context, run and bundle, as flwr-clientapp pulls them (same Runtime
    API calls), with a short backoff for message objects still arriving at the SuperNode: it
    creates the task before it has fetched them from the aggregator (common/flower_polling.py)."""
    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = res.task_id, res.run.run_id, res.context.node_id
    context, run, fab = context_from_proto(res.context), run_from_proto(res.run), fab_from_proto(res.fab)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("the SuperNode's Runtime API returned no message for this task")
    tree, node = pulled.message_object_trees[0], Node(node_id=context.node_id)
    message = pull_and_inflate_object_from_tree(
        tree,
        make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message,
        initial_backoff=INITIAL_BACKOFF_S,
        backoff_cap=BACKOFF_CAP_S,
    )
    message.metadata.__dict__["_message_id"] = tree.object_id  # a deflated message does not carry its own id
    return message, context, run, fab


def die_with_parent() -> None:
    """In a child, before exec: Linux sends it SIGTERM when the daemon dies, even by SIGKILL (no
    orphaned SuperNode keeps taking this site's messages). Elsewhere, a no-op."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


class WorkerUnavailable(Exception):
    pass


class WorkerHandle:
    """The worker process and its private socket; restarted whenever it dies or hangs."""

    def __init__(self, site: Path, env: dict[str, str] | None = None):
        self.site = site
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.conn: Connection | None = None
        self.ready = False
        self.restarts = 0
        self.closed = False  # the daemon is ending: never restarted again
        self.lock = threading.Lock()  # the executor's call and the supervisor's idle check

    def start(self) -> None:
        ours, theirs = socket.socketpair()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-P",
                "-m",
                "fedprompt.client.worker",
                "--site",
                str(self.site),
                "--fd",
                str(theirs.fileno()),
            ],
            pass_fds=(theirs.fileno(),),
            env=self.env,
            preexec_fn=die_with_parent,
        )
        theirs.close()
        self.conn = Connection(ours.detach())
        self.ready = False
        log.info("worker started (pid %d)", self.proc.pid)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.conn is not None:
            self.conn.close()
        self.proc, self.conn = None, None

    def close(self) -> None:
        """The daemon is ending: kill the worker (a message in flight gets "worker unavailable") and
        never restart it. Safe while a call runs (stop() is not: it drops the socket under it)."""
        self.closed = True
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.kill()

    def restart(self, why: str) -> None:
        if self.closed:
            log.info("worker %s (the daemon is ending)", why)
            return
        log.warning("worker %s: restarting it", why)
        self.stop()
        self.restarts += 1
        self.start()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def restart_if_dead(self) -> None:
        """Between messages: replace a worker that died, so the next message finds one warm."""
        if self.proc is None or self.closed or not self.lock.acquire(blocking=False):
            return  # stopped, or a message is in flight (call() handles it)
        try:
            if not self.alive():
                self.restart(f"exited with code {self.proc.returncode} while idle")
        finally:
            self.lock.release()

    def _receive(self, deadline: float) -> tuple:
        """The worker's next message before `deadline`, watching that it stays alive."""
        assert self.conn is not None
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WorkerUnavailable("did not answer before the deadline (hung?)")
            try:
                if self.conn.poll(min(left, 0.5)):
                    return self.conn.recv()
            except (EOFError, OSError) as exc:
                raise WorkerUnavailable(f"connection lost ({exc!r})") from exc
            if not self.alive():
                raise WorkerUnavailable(f"exited with code {self.proc.returncode if self.proc else None}")

    def wait_ready(self, deadline: float) -> dict:
        if self.ready:
            return {}
        kind, info = self._receive(deadline)
        if kind != "ready":
            raise WorkerUnavailable(f"sent {kind!r} before 'ready'")
        self.ready = True
        log.info("worker ready: %s", info)
        return info

    def call(self, kind: str, run_id: str, content: RecordDict, deadline: float) -> tuple[RecordDict, dict]:
        """The worker's reply to one message. WorkerUnavailable (after a restart) if it dies or hangs."""
        with self.lock:
            return self._call(kind, run_id, content, deadline)

    def _call(self, kind: str, run_id: str, content: RecordDict, deadline: float) -> tuple[RecordDict, dict]:
        try:
            if not self.alive():
                raise WorkerUnavailable("is not running")
            self.wait_ready(deadline)
            assert self.conn is not None
            self.conn.send(("message", kind, run_id, encode_content(content)))
            tag, data, timing = self._receive(deadline)
            if tag != "reply":
                raise WorkerUnavailable(f"sent {tag!r} instead of a reply")
            return decode_content(data), timing
        except (WorkerUnavailable, OSError, BrokenPipeError) as exc:
            self.restart(str(exc))
            raise WorkerUnavailable(str(exc)) from exc


def _deadline(content: RecordDict, received: float) -> float:
    """Answer before the aggregator's round timeout (the plan carries it), with a margin. Deadlines are
    time.monotonic() values (`received` too): the wall clock can jump, and is only logged."""
    config = content.config_records.get("config")
    timeout = config.get("fp.round_timeout") if config is not None else None
    seconds = float(timeout) if isinstance(timeout, (int, float)) and timeout > 0 else DEFAULT_DEADLINE_S
    return received + max(seconds - DEADLINE_MARGIN_S, seconds / 2)


class Executor:
    """Serves one SuperNode's tasks, one at a time (the SuperNode hands out one message at a time)."""

    def __init__(
        self,
        runtime_address: str,
        secret: bytes,
        site: Path,
        hospital_id: str,
        trusted_apps: frozenset[str],
        worker: WorkerHandle,
    ):
        self.address = runtime_address
        self.secret = secret
        self.site = site
        self.hospital_id = hospital_id
        self.trusted_apps = trusted_apps
        self.worker = worker
        self.stopping = threading.Event()
        self.handled = 0

    def _client(self, *extra) -> RuntimeHttpClient:
        return RuntimeHttpClient.from_server_address(
            server_address=self.address,
            insecure=True,
            root_certificates=None,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"), *extra],
            retry_invoker=self._bounded_retry(),
        )

    def _bounded_retry(self) -> RetryInvoker:
        """Flower's retry for a task's Runtime API calls, which would retry a dead SuperNode forever
        (and its push threads would then hold the daemon's exit): at most RUNTIME_RETRY_S, and none
        once the executor is told to stop."""
        invoker = make_simple_http_retry_invoker()
        invoker.max_time = RUNTIME_RETRY_S
        flower_giveup = invoker.should_giveup
        invoker.should_giveup = lambda exc: self.stopping.is_set() or bool(flower_giveup and flower_giveup(exc))
        invoker.wait_function = self._retry_wait
        return invoker

    def _retry_wait(self, seconds: float) -> None:
        self.stopping.wait(seconds)  # a retry's backoff, cut short by stop()

    def run(self) -> None:
        """Poll for tasks until stop(); each is answered before the next is taken."""
        once = make_simple_http_retry_invoker()
        once.max_tries = 1  # a failed poll (the SuperNode starting or restarting) is simply tried again below
        client = RuntimeHttpClient.from_server_address(
            server_address=self.address,
            insecure=True,
            root_certificates=None,
            interceptors=[
                RuntimeVersionHttpInterceptor(component_name="SuperExec"),
                SuperExecAuthHttpInterceptor(
                    master_secret=self.secret, protected_methods={"/flwr.proto.Runtime/AcquireTask"}
                ),
            ],
            retry_invoker=once,
        )
        try:
            while not self.stopping.is_set():
                try:
                    res = client.AcquireTask(
                        AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP], agentapp_fab_hashes=[])
                    )
                except Exception as exc:  # noqa: BLE001 - the SuperNode is starting or restarting: try again
                    log.debug("AcquireTask failed: %r", exc)
                    self.stopping.wait(1.0)
                    continue
                if res.HasField("task") and res.token:
                    self.handle(res.token, acquired=time.time())
                else:
                    self.stopping.wait(POLL_S)
        finally:
            client.close()

    def stop(self) -> None:
        self.stopping.set()

    def handle(self, token: str, acquired: float) -> None:
        client = self._client(RuntimeTokenHttpInterceptor(token))
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat.start()
        context, status, details = None, SubStatus.FAILED, "fedprompt executor failed"
        try:
            message, context, run, fab = pull_task_input(client)
            pulled = time.time()  # a timestamp for the log only (the deadline is on the monotonic clock)
            kind = str(message.metadata.message_type)
            reply, timing = self.reply(message, fab.content, kind)
            push_message(client, reply, context)
            status, details = SubStatus.COMPLETED, ""
            self.handled += 1
            self._log_timing(kind, message, acquired, pulled, timing)
        except Exception as exc:  # noqa: BLE001 - one task's failure must not stop the daemon
            if self.stopping.is_set():  # the SuperNode is gone or stopping: nothing can be pushed
                log.warning("the message is dropped, the hospital daemon is ending: %r", exc)
            else:
                log.exception("task failed (Flower's own liveness rules apply to it)")
        finally:
            try:
                push_task_output(client=client, context=context, sub_status=status, details=details)
            except Exception as exc:  # noqa: BLE001 - the SuperNode is gone: the supervisor ends the daemon
                log.warning("could not report the task's end to the SuperNode: %r", exc)
            finally:
                heartbeat.stop()
                client.close()

    def reply(self, message: Message, fab: bytes, kind: str) -> tuple[Message, dict]:
        """The reply, held until its point of the site's reply grid and stamped to the whole second
        (client/reply_timing.py: when it leaves says nothing finer about the records), and the
        worker's timing (this site's log only)."""
        received = time.monotonic()
        content, timing = self._answer(message, fab, kind)
        hold(received, site_grid(self.site), _deadline(message.content, received))
        return coarse_stamp(Message(content=content, reply_to=message), message), timing

    def _answer(self, message: Message, fab: bytes, kind: str) -> tuple[RecordDict, dict]:
        """The reply content: a refusal for an untrusted bundle or a lost worker, else the worker's answer,
        which is awaited until the message's deadline, counted from now."""
        received = time.monotonic()
        reason = untrusted_reason(fab, self.trusted_apps)
        if reason is not None:
            log.warning("%s refuses the message [untrusted app]: %s; nothing of it runs here", self.hospital_id, reason)
            return refusal(self.hospital_id, "untrusted app"), {}
        if kind not in ("train", "evaluate", "query"):  # query: the run's pre-flight (client/preflight.py)
            log.warning(
                "%s refuses a %r message [configuration]: only train, evaluate and query are served",
                self.hospital_id,
                kind,
            )
            return refusal(self.hospital_id, "configuration"), {}
        try:
            return self.worker.call(
                kind, str(message.metadata.run_id), message.content, _deadline(message.content, received)
            )
        except WorkerUnavailable as exc:
            log.warning("%s refuses the %s message [worker unavailable]: the worker %s", self.hospital_id, kind, exc)
            return refusal(self.hospital_id, "worker unavailable"), {}

    def _log_timing(self, kind: str, message: Message, acquired: float, pulled: float, timing: dict) -> None:
        """One line per message in the site's log (benchmarks/round.py): never sent anywhere."""
        config = message.content.config_records.get("config")
        log.info(
            "%s %s",
            TIMING_TAG,
            json.dumps(
                {
                    "type": kind,
                    "site": self.hospital_id,
                    "round": round_of(config),
                    "pid": os.getpid(),
                    "sent": message.metadata.created_at,
                    "acquired": acquired,
                    "pulled": pulled,
                    "handler_start": timing.get("handler_start", pulled),
                    "handler_end": timing.get("handler_end", pulled),
                    "pushed": time.time(),
                    "phases": {k: round(v, 4) for k, v in timing.get("phases", {}).items()},
                }
            ),
        )
