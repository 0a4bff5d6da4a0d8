"""Fleet-only reverse proxy: the one door from the hospitals' network to the aggregator.

Flower 1.42's SuperLink serves three APIs on ONE port: Fleet (`/v1/fleet/...`, what SuperNodes
speak), Control (`/v1/control/...`, what `flwr run`/`flwr supernode register` speak) and Runtime
(`/v1/runtime/...`, what the ServerApp process speaks). The open-source Control API has no
authentication: whoever reaches it can submit an app that then runs at every hospital. So the
SuperLink listens on the aggregator's internal network only, and hospitals reach it through this
proxy, which forwards `POST /v1/fleet/<method>` and answers everything else with 403.

What the SuperNode speaks (read from flwr 1.42: `flwr/supernode/fleet_http_client.py`,
`flwr/supercore/protobuf/client.py`): protobuf bodies over plain HTTP/1.1 (httpx, no HTTP/2,
30 s read timeout), POST to `/v1/fleet/<kebab-case-rpc>`, inside TLS, each request signed by the
node's key in three headers. Only the Control API streams responses; Fleet answers are single
protobuf messages.

Why h11 + asyncio and not nginx/HAProxy: the proxy ships inside the `fedprompt` package, so
`fedprompt aggregator start` and the container run one Python process that the tests start as-is,
with the same TLS files; no proxy engine is installed on the aggregator or in the test
environment. Parsing is not hand-written: h11 (a maintained, RFC 9112 parser) reads the
hospitals' HTTP/1.1, and a second h11 connection writes a fresh request to the SuperLink, so the
SuperLink never sees the client's raw framing and nothing can be smuggled behind an allowed
request. Every request on a kept-alive connection is checked, not just the first.

The SuperLink reads each request body whole into memory and logs every request it cannot parse,
so no unauthenticated byte reaches it: a request's signature headers are checked against the keys
registered at the SuperLink (proxy_auth.py) before its body is read or any upstream connection is
opened; strangers are answered here, as the SuperLink would answer them. Bounds (`ProxyConfig`,
proxy_limits.py): each Fleet method's body is capped to what Flower needs; the body bytes being
sent to the SuperLink at once are capped in all; a body must arrive at a minimum rate and never
stall; connections are capped in all and per source network (/24, /64) before the TLS handshake,
with slots kept for nodes that authenticated, a stranger's oldest connection giving way when the
strangers' share is full, and new connections from strangers rate-limited; timeouts for the
handshake, the request head and keep-alive idleness; bodies and chunks relayed in pieces of at
most READ_SIZE with backpressure. Refusals are logged at most once per source network per
`log_interval`, then summarised.

Run: `fedprompt aggregator proxy ...` or `python -m fedprompt.server.fleet_proxy --help`.
"""

from __future__ import annotations

import argparse
import asyncio
import asyncio.sslproto
import http
import logging
import os
import re
import signal
import ssl
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import h11

from fedprompt.common.exit_codes import ExitCode

from .proxy_auth import LIST_NODES, NodeAuth
from .proxy_limits import PUSH_MESSAGES_BODY, ByteBudget, Slots, body_cap, source_group

log = logging.getLogger("fedprompt.fleet_proxy")

# Exact method paths only (fullmatch: a trailing newline does not pass): no query, no %, no dots.
FLEET_PATH = re.compile(rb"/v1/fleet/[a-z0-9][a-z0-9-]{0,63}")
READ_SIZE = 16 * 1024  # one read from a socket (a TLS record's worth); the stream buffer pauses reading at 2x
# A request or response head, or one chunk-size line, that cannot fit in MAX_HEAD is refused: h11
# refuses an incomplete event over MAX_HEAD - READ_SIZE before the next read, so its buffer never
# holds more than MAX_HEAD (shorter ones always pass; 48-64 KiB ones may, depending on how they arrive).
MAX_HEAD = 64 * 1024
_INCOMPLETE = MAX_HEAD - READ_SIZE
# push-object's body cap (the largest any Fleet method needs, see proxy_limits.body_cap): Flower
# 1.42 pushes one object per request, arrays in chunks of FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE
# (5 MiB); 8 MiB leaves room for the protobuf around a chunk and for unsplit records.
DEFAULT_MAX_BODY = 8 * 1024 * 1024
# A 21-digit Content-Length, which h11 refuses as unparseable before the proxy sees the head: too
# large rather than malformed (413).
HUGE_LENGTH = re.compile(rb"(?i)\ncontent-length[ \t]*:[ \t]*[0-9]{21}")
# asyncio's TLS layer preallocates a read buffer of SSLProtocol.max_size (256 KiB) per connection,
# which made each hospital-side TLS connection cost ~280 KB; a TLS record holds at most 16 KiB of
# data, so 32 KiB reads lose nothing and a TLS connection costs ~57 KB. Set for the whole process
# (its only TLS is this proxy's) by FleetProxy.start.
TLS_READ_BUFFER = 32 * 1024
LINGER_IDLE, LINGER_TOTAL, LINGER_BYTES = 0.5, 2.0, 1 << 20
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"upgrade",
        b"expect",
        b"transfer-encoding",
    }
)
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
MAX_KEYS_ANSWER = 4 * 1024 * 1024  # the SuperLink's list of registered nodes (~350 bytes a node)


@dataclass(frozen=True)
class ProxyConfig:
    listen_host: str
    listen_port: int
    upstream_host: str
    upstream_port: int
    server_ssl: ssl.SSLContext | None = None  # None: plain HTTP towards hospitals (tests only)
    upstream_ssl: ssl.SSLContext | None = None  # None: plain HTTP towards the SuperLink
    upstream_server_name: str | None = None  # TLS name to verify (default: upstream_host)
    max_body: int = DEFAULT_MAX_BODY  # push-object's body bytes (other methods: proxy_limits); more: 413
    # The body bytes being sent to the SuperLink at once, all requests together (it reads each body
    # whole): a request waits for room up to body_timeout, then 503 (which a SuperNode retries).
    max_inflight: int = 64 * 1024 * 1024
    # A SuperNode holds one or two connections. 512 in all bounds the proxy's memory (~60 KB per
    # idle TLS connection); 64 of them are kept for connections and addresses that authenticated;
    # strangers (not authenticated yet) get at most 32 per source network (/24 or /64), which
    # leaves room for sites behind one NAT address.
    max_connections_per_source: int = 32
    max_connections: int = 512
    reserved_connections: int = 64
    # New connections a second from addresses that have not authenticated (a TLS handshake costs
    # ~1-7 ms of the proxy's CPU); hospitals' known addresses do not count.
    stranger_rate: float = 32.0
    handshake_timeout: float = 10.0  # TCP accepted -> TLS established
    head_timeout: float = 15.0  # first byte of a request -> its whole head (slow-header clients)
    idle_timeout: float = 30.0  # keep-alive wait for the next request (SuperNodes poll every ~3 s)
    body_timeout: float = 30.0  # longest silence while a request body arrives, or a client reads an answer
    # A body must keep up min_body_rate after body_grace seconds (8 MiB: within 266 s; a 256 kbit/s link passes).
    min_body_rate: float = 32 * 1024
    body_grace: float = 10.0
    io_timeout: float = 300.0  # the SuperLink's answer, and each write to it (generous: long-polls)
    connect_timeout: float = 10.0  # opening the upstream connection
    log_interval: float = 60.0  # at most one refusal line per source network per interval
    keys_refresh: float = 60.0  # re-read the registered SuperNode keys from the SuperLink
    keys_miss_interval: float = 5.0  # at most this often when an unknown key asks (a hospital just registered)

    def __post_init__(self) -> None:
        for name in (
            "max_body",
            "max_inflight",
            "max_connections_per_source",
            "max_connections",
            "stranger_rate",
            "handshake_timeout",
            "head_timeout",
            "idle_timeout",
            "body_timeout",
            "min_body_rate",
            "body_grace",
            "io_timeout",
            "connect_timeout",
            "log_interval",
            "keys_refresh",
            "keys_miss_interval",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"ProxyConfig.{name}: expected > 0, got {getattr(self, name)}")
        if not 0 <= self.reserved_connections < self.max_connections:
            raise ValueError(
                f"ProxyConfig.reserved_connections: expected 0 <= it < max_connections ({self.max_connections}), "
                f"got {self.reserved_connections}"
            )
        if self.max_inflight < max(self.max_body, PUSH_MESSAGES_BODY):
            raise ValueError(
                f"ProxyConfig.max_inflight: expected >= max_body and {PUSH_MESSAGES_BODY} (one request must fit), "
                f"got {self.max_inflight}"
            )


def allowed(method: bytes, target: bytes) -> bool:
    return method == b"POST" and FLEET_PATH.fullmatch(target) is not None


async def _next_event(conn: h11.Connection, reader: asyncio.StreamReader, timeout: float) -> Any:
    """The SuperLink's next h11 event (reading as needed, each read within `timeout`)."""
    while (event := conn.next_event()) is h11.NEED_DATA:
        conn.receive_data(await asyncio.wait_for(reader.read(READ_SIZE), timeout))
    return event


class RateLimitedLog:
    """Warnings, at most one per key (a client address, "upstream") per interval; the rest are
    counted and summarised by `flush`, called every interval: no client can flood the log."""

    MAX_KEYS = 4096  # keys remembered per interval; beyond that new keys' lines are only counted

    def __init__(self, interval: float):
        self.interval = interval
        self.last: dict[str, float] = {}
        self.suppressed = 0

    def warn(self, key: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        last = self.last.get(key)
        if (last is not None and now - last < self.interval) or (last is None and len(self.last) >= self.MAX_KEYS):
            self.suppressed += 1
            return
        self.last[key] = now
        log.warning("%s: " + msg + " (for %gs, further lines about it are only counted)", key, *args, self.interval)

    def flush(self) -> None:
        now = time.monotonic()
        self.last = {key: t for key, t in self.last.items() if now - t < self.interval}
        if self.suppressed:
            log.warning("suppressed %d repeated line(s) in the last %gs", self.suppressed, self.interval)
            self.suppressed = 0


class _Held(asyncio.Protocol):
    """A freshly accepted TCP connection, reading paused: the caps are checked before any byte is
    read, and with TLS the ClientHello must stay in the socket for `loop.start_tls`."""

    def __init__(self, proxy: FleetProxy):
        self.proxy = proxy

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.pause_reading()
        self.proxy._admit(transport)


class _StreamProtocol(asyncio.StreamReaderProtocol):
    """The stock stream protocol learns that it runs over TLS only in `connection_made`; a client
    that closes right after its handshake can deliver EOF before that, and the stock protocol then
    asks to keep a TLS connection half-open, for which asyncio logs a warning: one line per client."""

    def __init__(self, reader: asyncio.StreamReader, *, tls: bool):
        super().__init__(reader)
        self.tls = tls

    def eof_received(self) -> bool:
        return bool(super().eof_received()) and not self.tls


class _Ended(Exception):
    """The exchange is over and the client connection is to be closed (already answered if it could be)."""


class FleetProxy:
    def __init__(self, config: ProxyConfig):
        self.config = config
        self.server: asyncio.Server | None = None
        self.forwarded = 0
        self.refused = 0
        self.rate_log = RateLimitedLog(config.log_interval)
        self.slots = Slots(
            config.max_connections,
            config.reserved_connections,
            config.max_connections_per_source,
            config.stranger_rate,
        )
        self.budget = ByteBudget(config.max_inflight)
        self.auth = NodeAuth(self.list_nodes, refresh=config.keys_refresh, miss_interval=config.keys_miss_interval)
        self.tasks: set[asyncio.Task] = set()
        self._background: list[asyncio.Task] = []

    async def start(self) -> None:
        c = self.config
        loop = asyncio.get_running_loop()
        asyncio.sslproto.SSLProtocol.max_size = TLS_READ_BUFFER
        self.server = await loop.create_server(lambda: _Held(self), c.listen_host, c.listen_port)
        self._background = [loop.create_task(self._summarise()), loop.create_task(self._refresh_keys())]
        names = ", ".join(str(s.getsockname()[:2]) for s in self.server.sockets)
        scheme = "https" if c.server_ssl else "http"
        up = "https" if c.upstream_ssl else "http"
        log.info(
            "fleet proxy on %s (%s) -> %s://%s:%d; only POST /v1/fleet/* signed by a registered SuperNode key is "
            "forwarded; max %d connections (%d kept for authenticated nodes, %d per source network for others), "
            "push-object body <= %d bytes, %d bytes in flight",
            names,
            scheme,
            up,
            c.upstream_host,
            c.upstream_port,
            c.max_connections,
            c.reserved_connections,
            c.max_connections_per_source,
            c.max_body,
            c.max_inflight,
        )

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        # Python 3.11's wait_closed does not wait for open connections: end them here.
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        self.rate_log.flush()

    async def _summarise(self) -> None:
        while True:
            await asyncio.sleep(self.config.log_interval)
            self.rate_log.flush()

    async def _refresh_keys(self) -> None:
        while True:
            read = await self.auth.refresh()
            # Until the SuperLink has answered once (it may start after the proxy), every second.
            await asyncio.sleep(self.config.keys_refresh if read or self.auth.keys is not None else 1.0)

    async def list_nodes(self) -> bytes:
        """The SuperLink's Control API `list-nodes` answer (a ListNodesResponse), on the internal side."""
        c = self.config
        reader, writer = await self.open_upstream()
        conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=_INCOMPLETE)
        try:
            head = h11.Request(
                method=b"POST",
                target=LIST_NODES,
                headers=[
                    (b"host", (c.upstream_server_name or c.upstream_host).encode("idna")),
                    (b"content-type", b"application/protobuf"),
                    (b"content-length", b"0"),
                    (b"connection", b"close"),
                ],
            )
            writer.write(b"".join(conn.send(e) or b"" for e in (head, h11.EndOfMessage())))
            body, status = bytearray(), 0
            while not isinstance(event := await _next_event(conn, reader, c.io_timeout), h11.EndOfMessage):
                if isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data) and len(body) + len(event.data) <= MAX_KEYS_ANSWER:
                    body += event.data
                elif not isinstance(event, h11.InformationalResponse):
                    raise OSError(
                        f"list-nodes: unexpected {type(event).__name__} (answer over {MAX_KEYS_ANSWER} bytes?)"
                    )
            if status != 200:
                raise OSError(f"list-nodes answered {status}: {bytes(body[:200])!r}")
            return bytes(body)
        finally:
            writer.close()

    def _refuse(self, ip: str, msg: str, *args: object) -> None:
        """Counted; logged at most once per source network and interval (many addresses, one line)."""
        self.refused += 1
        self.rate_log.warn(source_group(ip), "%s: " + msg, ip, *args)

    # -- connections -------------------------------------------------------------------------

    def _admit(self, transport: asyncio.Transport) -> None:
        peer = transport.get_extra_info("peername")
        ip = str(peer[0]) if peer else "?"
        refusal, evicted = self.slots.decide(ip)
        if refusal is not None:
            # Before TLS nothing can be answered: close. The client's retry comes when a slot is free.
            self._refuse(ip, "connection closed: %s", refusal)
            transport.close()
            return
        if evicted is not None:
            assert isinstance(evicted, asyncio.Task)
            evicted.cancel()  # a stranger's oldest connection gives its slot (its task closes it)
        task = asyncio.get_running_loop().create_task(self._connection(transport, ip))
        self.slots.add(task, ip)
        self.tasks.add(task)
        task.add_done_callback(self._release)

    def _release(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        self.slots.remove(task)

    async def _connection(self, transport: asyncio.Transport, ip: str) -> None:
        c = self.config
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=READ_SIZE, loop=loop)
        protocol = _StreamProtocol(reader, tls=c.server_ssl is not None)
        try:
            if c.server_ssl is not None:
                tls = await loop.start_tls(
                    transport, protocol, c.server_ssl, server_side=True, ssl_handshake_timeout=c.handshake_timeout
                )
                if tls is None:  # the client went away during the handshake
                    return
                transport = tls
            else:
                transport.set_protocol(protocol)
            # start_tls expects a protocol already connected: connect it to the transport it reads
            # (this gives the reader its flow control).
            protocol.connection_made(transport)
            transport.resume_reading()
            writer = asyncio.StreamWriter(transport, protocol, reader, loop)
            await _Client(self, reader, writer, ip).serve()
        except asyncio.CancelledError:
            # Shutdown: end normally, so that no task reports a cancellation.
            log.debug("connection from %s closed at shutdown", ip)
        except (TimeoutError, OSError, ssl.SSLError, EOFError) as exc:
            # Handshake failures and timeouts, resets, broken pipes: the client's business, not the log's.
            log.debug("connection from %s ended: %r", ip, exc)
        except Exception as exc:  # noqa: BLE001 - a proxy bug: one line (rate-limited), never a traceback per client
            self.rate_log.warn("internal", "connection from %s ended on an unexpected error: %r", ip, exc)
        finally:
            transport.close()

    async def open_upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A new connection to the SuperLink (TLS as configured)."""
        c = self.config
        kwargs: dict[str, Any] = {}
        if c.upstream_ssl is not None:
            kwargs = {"ssl": c.upstream_ssl, "server_hostname": c.upstream_server_name or c.upstream_host}
        return await asyncio.wait_for(
            asyncio.open_connection(c.upstream_host, c.upstream_port, limit=READ_SIZE, **kwargs), c.connect_timeout
        )


def _values(headers: h11._headers.Headers, name: bytes) -> list[bytes]:
    return [value for key, value in headers if key == name]  # h11 gives names lower-cased


def _forwarded_headers(headers: h11._headers.Headers) -> list[tuple[bytes, bytes]]:
    """End-to-end headers only: hop-by-hop ones, and those the Connection header names, stay here.
    Framing headers are never taken from Connection: h11 recomputes them on the other side."""
    named = {t.strip().lower() for value in _values(headers, b"connection") for t in value.split(b",")}
    drop = HOP_BY_HOP | (named - {b"content-length", b"host"})
    return [(raw, value) for raw, value in headers.raw_items() if raw.lower() not in drop]


class _Client:
    """One hospital-side connection: requests read with h11, one at a time."""

    def __init__(self, proxy: FleetProxy, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ip: str):
        self.proxy, self.config = proxy, proxy.config
        self.reader, self.writer, self.ip = reader, writer, ip
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_INCOMPLETE)
        self.head_tail = b""  # the end of what was read of the current head (HUGE_LENGTH across reads)
        self.huge_length = False
        self.body_started, self.body_received = 0.0, 0  # the current request body: when, how much

    async def serve(self) -> None:
        try:
            while True:
                request = await self._read_head()
                if request is None:
                    return
                await self._exchange(request)
                if self.conn.our_state is not h11.DONE or self.conn.their_state is not h11.DONE:
                    # A Connection: close from either side, or an answer before the whole body.
                    await self._linger()
                    return
                self.conn.start_next_cycle()
        except _Ended:
            return

    # -- reading the client --------------------------------------------------------------

    async def _feed(self, timeout: float) -> bytes:
        try:
            data = await asyncio.wait_for(self.reader.read(READ_SIZE), max(timeout, 0.0))
        except TimeoutError:  # an OSError too, but the caller's to answer
            raise
        except OSError as exc:  # reset: nobody left to answer
            raise _Ended from exc
        self.conn.receive_data(data)  # b"": end of stream, which h11 turns into an event or an error
        return data

    def _scan_head(self, data: bytes) -> None:
        window = self.head_tail + data
        self.huge_length = self.huge_length or HUGE_LENGTH.search(window) is not None
        self.head_tail = window[-128:]

    async def _read_head(self) -> h11.Request | None:
        """The next request head; None when the client closed or stayed idle."""
        loop = asyncio.get_running_loop()
        started = bool(self.conn.trailing_data[0])  # a pipelined request already begun
        deadline = loop.time() + (self.config.head_timeout if started else self.config.idle_timeout)
        self.head_tail, self.huge_length = b"", False
        while True:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as exc:
                if self.conn.trailing_data[1]:  # the client left halfway through a head: nobody to answer
                    raise _Ended from exc
                if self.huge_length:
                    await self._fail(413, "a Content-Length of 21 digits or more: far over any Fleet method's limit")
                if exc.error_status_hint == 431:
                    await self._fail(431, f"request head over {MAX_HEAD // 1024} KiB")
                await self._fail(501 if exc.error_status_hint == 501 else 400, f"bad request: {exc}")
            if isinstance(event, h11.Request):
                return event
            if event is not h11.NEED_DATA:  # ConnectionClosed: the client is done
                return None
            try:
                self._scan_head(await self._feed(deadline - loop.time()))
            except TimeoutError:
                if started:  # slow headers: nothing can be answered to a half-sent head
                    self.proxy._refuse(
                        self.ip, "request head not complete within %gs: connection closed", self.config.head_timeout
                    )
                return None
            if not started and self.conn.trailing_data[0]:
                started = True
                deadline = loop.time() + self.config.head_timeout

    async def _body_event(self) -> h11.Data | h11.EndOfMessage:
        """The next piece of the request body (bounded by READ_SIZE, the body timeout and rate)."""
        while True:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as exc:
                if self.conn.trailing_data[1]:  # the client left halfway through a body: nobody to answer
                    raise _Ended from exc
                # Inside a body, h11's 431 means an over-long chunk-size line: plain bad framing.
                why = f"a chunk-size line over {MAX_HEAD // 1024} KiB" if exc.error_status_hint == 431 else str(exc)
                await self._fail(400, f"bad request body: {why}")
            if isinstance(event, h11.Data):
                self.body_received += len(event.data)
            if isinstance(event, (h11.Data, h11.EndOfMessage)):
                return event
            # Otherwise NEED_DATA: a body cut short is an h11 error, never a ConnectionClosed event.
            wait, why = self._body_wait()
            try:
                await self._feed(wait)
            except TimeoutError:
                await self._fail(408, why)

    def _body_wait(self) -> tuple[float, str]:
        """How long the next piece of body may take: the silence limit, or less where the body has
        fallen behind its minimum rate (a total deadline that grows with what has arrived)."""
        c = self.config
        elapsed = asyncio.get_running_loop().time() - self.body_started
        behind = c.body_grace + self.body_received / c.min_body_rate - elapsed
        if behind < c.body_timeout:
            return behind, f"request body slower than {c.min_body_rate:g} bytes/s after {c.body_grace:g}s"
        return c.body_timeout, f"request body stalled for {c.body_timeout:g}s"

    # -- answering the client -------------------------------------------------------------

    async def _send(self, *events: h11.Event) -> None:
        for event in events:
            data = self.conn.send(event)
            if data:
                self.writer.write(data)
        try:
            # A client that stops reading answers is treated like one that stops sending a body.
            await asyncio.wait_for(self.writer.drain(), self.config.body_timeout)
        except (TimeoutError, OSError) as exc:
            raise _Ended from exc

    async def _fail(self, status: int, text: str, *, log_it: bool = True, json_body: bytes | None = None) -> NoReturn:
        """Answer `status` (if no answer has begun), close the connection, end the exchange. The
        answer is `text`, or `json_body` (the SuperLink's own format) with `text` only logged."""
        text = text[:300]  # h11's messages quote the client's bytes
        if log_it:
            self.proxy._refuse(self.ip, "%d %s", status, text)
        if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            body = json_body if json_body is not None else (text + "\n").encode("utf-8", "replace")
            kind = b"application/json" if json_body is not None else b"text/plain; charset=utf-8"
            try:
                await self._send(
                    h11.Response(
                        status_code=status,
                        reason=http.HTTPStatus(status).phrase.encode(),
                        headers=[
                            (b"content-type", kind),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"),
                        ],
                    ),
                    h11.Data(data=body),
                    h11.EndOfMessage(),
                )
                await self._linger()
            except (TimeoutError, _Ended, OSError, h11.LocalProtocolError):
                pass  # the client is gone or the answer cannot be framed: closing says the rest
        raise _Ended

    def _request_read(self) -> bool:
        """Whether the client's request has been read to its end (discarding body already received)."""
        try:
            while self.conn.their_state is h11.SEND_BODY:
                if self.conn.next_event() is h11.NEED_DATA:
                    return False
        except h11.RemoteProtocolError:
            return False
        return self.conn.their_state is not h11.ERROR

    async def _linger(self) -> None:
        """Closing a socket with unread input sends a TCP reset, which can destroy the answer before
        the client reads it. If the client may still be sending, read and discard for a moment."""
        if self._request_read():
            return
        if self.writer.can_write_eof():
            self.writer.write_eof()  # plain TCP: the client sees the answer end at once
        loop = asyncio.get_running_loop()
        end, left = loop.time() + LINGER_TOTAL, LINGER_BYTES
        while left > 0:
            data = await asyncio.wait_for(self.reader.read(READ_SIZE), max(min(LINGER_IDLE, end - loop.time()), 0.0))
            if not data:
                return
            left -= len(data)

    # -- one request ----------------------------------------------------------------------

    async def _exchange(self, request: h11.Request) -> None:
        headers, c = request.headers, self.config
        if (
            not allowed(request.method, request.target)
            or request.http_version != b"1.1"
            or _values(headers, b"upgrade")
        ):
            self.proxy._refuse(
                self.ip,
                "403 %s %r HTTP/%s: only POST /v1/fleet/* is served here",
                request.method[:20].decode("latin-1"),
                request.target[:200],
                request.http_version.decode("latin-1"),
            )
            await self._fail(
                403,
                "forbidden: this endpoint serves the Flower Fleet API only (POST /v1/fleet/<method>, HTTP/1.1)",
                log_it=False,
            )
        method = request.target.rpartition(b"/")[2]
        cap = body_cap(method, c.max_body)
        if cap is None:
            await self._fail(404, f"no Fleet method {method.decode('ascii')!r}")
        length = _values(headers, b"content-length")  # h11 has refused differing values and collapsed equal ones
        if length and _values(headers, b"transfer-encoding"):
            await self._fail(400, "bad request: both Transfer-Encoding and Content-Length")
        if length and int(length[0]) > cap:
            await self._fail(413, f"{method.decode()} body of {int(length[0])} bytes: the limit is {cap}")
        # Authenticated before any body byte is read or the SuperLink is reached.
        refusal = await self.proxy.auth.check(method, list(headers))
        if refusal is not None:
            await self._fail(refusal.status, f"{method.decode()}: {refusal.reason}", json_body=refusal.body)
        self.proxy.slots.trust(asyncio.current_task())
        # Chunked: its length is known only as it arrives, so its method's cap; neither framing: no body.
        need = int(length[0]) if length else cap if _values(headers, b"transfer-encoding") else 0
        if not await self.proxy.budget.acquire(need, c.body_timeout):
            await self._fail(503, f"{self.proxy.budget.used} body bytes in flight to the aggregator: retry")
        try:
            if self.conn.they_are_waiting_for_100_continue:
                await self._send(h11.InformationalResponse(status_code=100, headers=[]))
            self.body_started, self.body_received = asyncio.get_running_loop().time(), 0
            first = await self._body_event()
            await _Upstream(self, request, first, cap).relay()
        finally:
            self.proxy.budget.release(need)
        self.proxy.forwarded += 1


class _Upstream:
    """One request relayed to the SuperLink on a connection of its own (never reused: no race with
    the SuperLink's keep-alive timeout), written by h11 from the parsed request."""

    def __init__(self, client: _Client, request: h11.Request, first: h11.Data | h11.EndOfMessage, cap: int):
        self.client, self.config = client, client.config
        self.request, self.first, self.cap = request, first, cap
        self.conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=_INCOMPLETE)

    async def relay(self) -> None:
        client, c = self.client, self.config
        try:
            reader, writer = await client.proxy.open_upstream()
        except (TimeoutError, OSError, ssl.SSLError) as exc:
            client.proxy.rate_log.warn(
                "upstream", "SuperLink %s:%d unreachable: %r", c.upstream_host, c.upstream_port, exc
            )
            await client._fail(502, "bad gateway: the aggregator is not reachable right now", log_it=False)
        # Sent and received at once: the SuperLink may answer before it has read the whole body
        # (its authentication's 401) and then close; that answer must still reach the client.
        sending = asyncio.ensure_future(self._send_request(writer))
        receiving = asyncio.ensure_future(self._relay_response(reader))
        try:
            await asyncio.wait((sending, receiving), return_when=asyncio.FIRST_EXCEPTION)
            if sending.done() and not receiving.done():
                failed = sending.exception()
                if isinstance(failed, _Ended):
                    raise _Ended  # the client failed (and was answered, if it could be)
                if failed is not None:
                    log.debug("the SuperLink stopped reading a request from %s: %r", client.ip, failed)
                await receiving
            else:
                receiving.result()  # done first: its answer relayed (or its failure raised here)
        except (TimeoutError, OSError, ssl.SSLError, h11.ProtocolError) as exc:
            timed_out = isinstance(exc, asyncio.TimeoutError)
            client.proxy.rate_log.warn(
                "upstream", "SuperLink %s:%d failed a request: %r", c.upstream_host, c.upstream_port, exc
            )
            await client._fail(
                504 if timed_out else 502,
                "the aggregator did not answer in time" if timed_out else "bad gateway",
                log_it=False,
            )
        finally:
            for task in (sending, receiving):
                task.cancel()
            await asyncio.gather(sending, receiving, return_exceptions=True)
            writer.close()

    async def _write(self, writer: asyncio.StreamWriter, event: h11.Event) -> None:
        data = self.conn.send(event)
        assert data is not None  # h11 sends nothing only for ConnectionClosed, never sent here
        writer.write(data)
        await asyncio.wait_for(writer.drain(), self.config.io_timeout)

    async def _send_request(self, writer: asyncio.StreamWriter) -> None:
        client, limit = self.client, self.cap
        headers = _forwarded_headers(self.request.headers)
        if _values(self.request.headers, b"transfer-encoding"):
            headers.append((b"transfer-encoding", b"chunked"))
        headers.append((b"connection", b"close"))
        await self._write(writer, h11.Request(method=b"POST", target=self.request.target, headers=headers))
        event, received = self.first, 0
        while isinstance(event, h11.Data):
            received += len(event.data)
            if received > limit:  # a chunked body: its length is known only as it arrives
                await client._fail(413, f"request body over {limit} bytes")
            await self._write(writer, event)
            event = await client._body_event()
        await self._write(writer, h11.EndOfMessage())  # trailers, if any, are not forwarded

    async def _relay_response(self, reader: asyncio.StreamReader) -> None:
        client = self.client
        while True:
            event = await _next_event(self.conn, reader, self.config.io_timeout)
            if isinstance(event, h11.InformationalResponse):
                continue  # 1xx are hop-by-hop (no Expect is sent upstream)
            if isinstance(event, h11.Response):
                # No Content-Length: h11 frames the body for the client itself (chunked).
                await client._send(
                    h11.Response(
                        status_code=event.status_code, reason=event.reason, headers=_forwarded_headers(event.headers)
                    )
                )
            elif isinstance(event, h11.Data):
                await client._send(event)
            elif isinstance(event, h11.EndOfMessage):
                await client._send(h11.EndOfMessage())
                return
            else:  # ConnectionClosed before a response
                raise h11.RemoteProtocolError("the SuperLink closed the connection without an answer")


def server_context(certfile: str, keyfile: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(certfile, keyfile)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def upstream_context(cafile: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def split_hostport(value: str, what: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"{what}: expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def configure_logging() -> None:
    """Timestamped lines on stderr, for the proxy and whatever else the process logs."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)


async def serve(config: ProxyConfig, ready: asyncio.Event | None = None) -> None:
    proxy = FleetProxy(config)
    await proxy.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - non-main thread
            pass
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        await proxy.close()
        log.info("fleet proxy stopped (forwarded %d, refused %d)", proxy.forwarded, proxy.refused)


def _positive(kind: type) -> Callable[[str], int | float]:
    def parse(text: str) -> int | float:
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its "invalid int value" message
    return parse


# The limits --help offers: (flag, ProxyConfig field, parser, metavar, meaning). Each flag's default,
# shown in --help, is the field's; config_from_args passes each back to its field.
_LIMITS: tuple[tuple[str, str, Callable[[str], int | float], str, str], ...] = (
    (
        "--max-body",
        "max_body",
        _positive(int),
        "BYTES",
        "largest push-object body (other Fleet methods: 64 KiB, push-messages 1 MiB); more: 413",
    ),
    (
        "--max-inflight",
        "max_inflight",
        _positive(int),
        "BYTES",
        "body bytes being sent to the SuperLink at once, all requests together",
    ),
    ("--max-connections", "max_connections", _positive(int), "N", "open connections in all"),
    (
        "--reserved-connections",
        "reserved_connections",
        int,
        "N",
        "of those, kept for connections and addresses that authenticated as a registered SuperNode",
    ),
    (
        "--max-connections-per-source",
        "max_connections_per_source",
        _positive(int),
        "N",
        "connections not authenticated yet from one source network, /24 (IPv4) or /64 (IPv6)",
    ),
    (
        "--stranger-rate",
        "stranger_rate",
        _positive(float),
        "N",
        "new connections a second from addresses that have not authenticated, all together; more are "
        "closed before the TLS handshake",
    ),
    (
        "--min-body-rate",
        "min_body_rate",
        _positive(float),
        "BYTES_PER_S",
        "a request body must keep up this rate after --body-grace seconds; slower: 408",
    ),
    *(
        (flag, field, _positive(float), "SECONDS", f"seconds {what}")
        for flag, field, what in [
            ("--handshake-timeout", "handshake_timeout", "to complete the TLS handshake"),
            ("--head-timeout", "head_timeout", "from a request's first byte to its whole head"),
            ("--idle-timeout", "idle_timeout", "a kept-alive connection may wait for its next request"),
            ("--body-timeout", "body_timeout", "of silence while a request body arrives (then 408)"),
            ("--body-grace", "body_grace", "before --min-body-rate applies to a request body"),
            ("--upstream-timeout", "io_timeout", "for the SuperLink's answer (then 504)"),
        ]
    ),
)


def _add_limits(g: argparse._ArgumentGroup) -> None:
    d = ProxyConfig("", 0, "", 0)  # its defaults, shown in --help
    for flag, field, parse, metavar, what in _LIMITS:
        default = getattr(d, field)
        shown = f"{default:g}" if parse.__name__ == "float" else default  # _positive keeps the kind's name
        g.add_argument(flag, type=parse, default=default, dest=field, metavar=metavar, help=f"{what} (default {shown})")


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(
        prog="fleet-proxy", description="Forward only the Flower Fleet API (POST /v1/fleet/*); 403 for the rest."
    )
    p.add_argument("--listen", default="0.0.0.0:9443", help="HOST:PORT the hospitals connect to (default 0.0.0.0:9443)")
    p.add_argument(
        "--upstream", default="127.0.0.1:8000", help="the SuperLink's HOST:PORT on the aggregator's internal network"
    )
    p.add_argument("--pki", help="folder from `fedprompt pki init` (server.pem/server.key/ca.pem)")
    p.add_argument("--certfile", help="TLS certificate presented to hospitals (default: PKI/server.pem)")
    p.add_argument("--keyfile", help="its private key (default: PKI/server.key)")
    p.add_argument("--upstream-ca", help="CA that signed the SuperLink's certificate (default: PKI/ca.pem)")
    p.add_argument(
        "--upstream-name", help="name to verify in the SuperLink's certificate (default: the --upstream host)"
    )
    p.add_argument(
        "--upstream-insecure", action="store_true", help="plain HTTP to the SuperLink (only if it runs with --insecure)"
    )
    p.add_argument("--insecure", action="store_true", help="plain HTTP towards hospitals (testing only)")
    _add_limits(p.add_argument_group("limits (each refusal is answered with an HTTP status where one can be sent)"))
    return p


def config_from_args(args: argparse.Namespace) -> ProxyConfig:
    lh, lp = split_hostport(args.listen, "--listen")
    uh, up = split_hostport(args.upstream, "--upstream")
    pki = args.pki
    cert = args.certfile or (pki and os.path.join(pki, "server.pem"))
    key = args.keyfile or (pki and os.path.join(pki, "server.key"))
    ca = args.upstream_ca or (pki and os.path.join(pki, "ca.pem"))
    if not args.insecure and not (cert and key):
        raise ValueError("give --pki or --certfile/--keyfile (or --insecure for a test without TLS)")
    if not args.upstream_insecure and not ca:
        raise ValueError("give --pki or --upstream-ca (or --upstream-insecure)")
    return ProxyConfig(
        lh,
        lp,
        uh,
        up,
        server_ssl=None if args.insecure else server_context(cert, key),
        upstream_ssl=None if args.upstream_insecure else upstream_context(ca),
        upstream_server_name=args.upstream_name,
        **{field: getattr(args, field) for _, field, *_ in _LIMITS},
    )


def main(argv: list[str] | None = None) -> int:
    configure_logging()
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
    except (ValueError, OSError, ssl.SSLError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    try:
        asyncio.run(serve(config))
    except OSError as exc:
        print(f"error: cannot listen on {args.listen}: {exc}", file=sys.stderr)
        return ExitCode.FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
