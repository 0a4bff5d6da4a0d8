"""Fleet-only reverse proxy: the one door from the hospitals' network to the aggregator.

Flower 1.42's SuperLink serves three APIs on ONE port: Fleet (`/v1/fleet/...`, what SuperNodes
speak), Control (`/v1/control/...`, what `flwr run`/`flwr supernode register` speak) and Runtime
(`/v1/runtime/...`, what the ServerApp process speaks). The open-source Control API has no
authentication: whoever reaches it can submit an app that then runs at every hospital. So the
SuperLink listens on the aggregator's internal network only, and hospitals reach it through this
proxy, which forwards `POST /v1/fleet/<method>` and answers everything else with 403.

What the SuperNode speaks (read from flwr 1.42: `flwr/supernode/fleet_http_client.py`,
`flwr/supercore/protobuf/client.py`): protobuf bodies over plain HTTP/1.1 (httpx, no HTTP/2,
30 s read timeout), POST to `/v1/fleet/<kebab-case-rpc>`, inside TLS; SuperNode authentication
travels in request headers (public key, timestamp, signature), which this proxy passes unchanged.
Only the Control API streams responses; Fleet answers are single protobuf messages.

Why h11 + asyncio and not nginx/HAProxy: the proxy ships inside the `fedprompt` package, so
`fedprompt aggregator start` and the container run one Python process that the tests start as-is,
with the same TLS files; no proxy engine is installed on the aggregator or in the test
environment. Parsing is not hand-written: h11 (a maintained, RFC 9112 parser) reads the
hospitals' HTTP/1.1, and a second h11 connection writes a fresh request to the SuperLink, so the
SuperLink never sees the client's raw framing and nothing can be smuggled behind an allowed
request. Every request on a kept-alive connection is checked, not just the first.

Bounds, so that no unauthenticated client can exhaust the aggregator (see `ProxyConfig`): a cap
on open connections per client address and in total, checked before the TLS handshake; timeouts
for the handshake, the request head, keep-alive idleness and a stalled body; a request body
limit; bodies and chunks relayed in pieces of at most READ_SIZE with backpressure, never
buffered whole; the upstream connection opened only once the head is accepted and the body has
begun. Refusals are logged at most once per client address per `log_interval`, then summarised.

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
from typing import Any, NoReturn, cast

import h11

log = logging.getLogger("fedprompt.fleet_proxy")

# Exact method paths only (fullmatch: a trailing newline does not pass): no query, no %, no dots.
FLEET_PATH = re.compile(rb"/v1/fleet/[a-z0-9][a-z0-9-]{0,63}")
READ_SIZE = 16 * 1024  # one read from a socket (a TLS record's worth); the stream buffer pauses reading at 2x
# A request or response head, or one chunk-size line, that cannot fit in MAX_HEAD is refused: h11
# refuses an incomplete event over MAX_HEAD - READ_SIZE before the next read, so its buffer never
# holds more than MAX_HEAD (shorter ones always pass; 48-64 KiB ones may, depending on how they arrive).
MAX_HEAD = 64 * 1024
_INCOMPLETE = MAX_HEAD - READ_SIZE
# Flower 1.42 sends tensors with `/v1/fleet/push-object`, one object per request, arrays split in
# chunks of FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE (5 MiB); other records (configs, metrics) are not
# split. This project's messages are 14 KB to a few MB: 64 MiB leaves room without letting one
# request make the SuperLink (which reads a body whole) hold much more.
DEFAULT_MAX_BODY = 64 * 1024 * 1024
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


@dataclass(frozen=True)
class ProxyConfig:
    listen_host: str
    listen_port: int
    upstream_host: str
    upstream_port: int
    server_ssl: ssl.SSLContext | None = None  # None: plain HTTP towards hospitals (tests only)
    upstream_ssl: ssl.SSLContext | None = None  # None: plain HTTP towards the SuperLink
    upstream_server_name: str | None = None  # TLS name to verify (default: upstream_host)
    max_body: int = DEFAULT_MAX_BODY  # request body bytes; more: 413
    # A hospital's SuperNode holds one or two connections; 32 leaves room for sites behind one NAT
    # address. 512 in all bounds the proxy's memory (~60 KB per idle TLS connection, a few 100 KB
    # while a body streams) and the number of requests the SuperLink holds at once.
    max_connections_per_ip: int = 32
    max_connections: int = 512
    handshake_timeout: float = 10.0  # TCP accepted -> TLS established
    head_timeout: float = 15.0  # first byte of a request -> its whole head (slow-header clients)
    idle_timeout: float = 30.0  # keep-alive wait for the next request (SuperNodes poll every ~3 s)
    body_timeout: float = 30.0  # longest silence while a request body arrives, or a client reads an answer
    io_timeout: float = 300.0  # the SuperLink's answer, and each write to it (generous: long-polls)
    connect_timeout: float = 10.0  # opening the upstream connection
    log_interval: float = 60.0  # at most one refusal line per client address per interval

    def __post_init__(self) -> None:
        for name in (
            "max_body",
            "max_connections_per_ip",
            "max_connections",
            "handshake_timeout",
            "head_timeout",
            "idle_timeout",
            "body_timeout",
            "io_timeout",
            "connect_timeout",
            "log_interval",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"ProxyConfig.{name}: expected > 0, got {getattr(self, name)}")


def allowed(method: bytes, target: bytes) -> bool:
    return method == b"POST" and FLEET_PATH.fullmatch(target) is not None


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
        self.open_per_ip: dict[str, int] = {}
        self.tasks: set[asyncio.Task] = set()
        self._summary: asyncio.Task | None = None

    async def start(self) -> None:
        c = self.config
        loop = asyncio.get_running_loop()
        asyncio.sslproto.SSLProtocol.max_size = TLS_READ_BUFFER
        self.server = await loop.create_server(lambda: _Held(self), c.listen_host, c.listen_port)
        self._summary = loop.create_task(self._summarise())
        names = ", ".join(str(s.getsockname()[:2]) for s in self.server.sockets)
        scheme = "https" if c.server_ssl else "http"
        up = "https" if c.upstream_ssl else "http"
        log.info(
            "fleet proxy on %s (%s) -> %s://%s:%d; only POST /v1/fleet/* is forwarded; max %d connections "
            "(%d per address), body <= %d bytes",
            names,
            scheme,
            up,
            c.upstream_host,
            c.upstream_port,
            c.max_connections,
            c.max_connections_per_ip,
            c.max_body,
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
        if self._summary is not None:
            self._summary.cancel()
            await asyncio.gather(self._summary, return_exceptions=True)
        self.rate_log.flush()

    async def _summarise(self) -> None:
        while True:
            await asyncio.sleep(self.config.log_interval)
            self.rate_log.flush()

    def _refuse(self, ip: str, msg: str, *args: object) -> None:
        self.refused += 1
        self.rate_log.warn(ip, msg, *args)

    # -- connections -------------------------------------------------------------------------

    def _admit(self, transport: asyncio.Transport) -> None:
        c = self.config
        peer = transport.get_extra_info("peername")
        ip = str(peer[0]) if peer else "?"
        open_here, open_all = self.open_per_ip.get(ip, 0), len(self.tasks)
        if open_here >= c.max_connections_per_ip or open_all >= c.max_connections:
            # Before TLS nothing can be answered: close. The client's retry comes when a slot is free.
            self._refuse(
                ip,
                "connection closed: %d open from this address (cap %d), %d in all (cap %d)",
                open_here,
                c.max_connections_per_ip,
                open_all,
                c.max_connections,
            )
            transport.close()
            return
        self.open_per_ip[ip] = open_here + 1
        task = asyncio.get_running_loop().create_task(self._connection(transport, ip))
        self.tasks.add(task)
        task.add_done_callback(lambda t: self._release(t, ip))

    def _release(self, task: asyncio.Task, ip: str) -> None:
        self.tasks.discard(task)
        left = self.open_per_ip[ip] - 1
        if left:
            self.open_per_ip[ip] = left
        else:
            del self.open_per_ip[ip]

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

    async def _feed(self, timeout: float) -> None:
        try:
            data = await asyncio.wait_for(self.reader.read(READ_SIZE), max(timeout, 0.0))
        except TimeoutError:  # an OSError too, but the caller's to answer
            raise
        except OSError as exc:  # reset: nobody left to answer
            raise _Ended from exc
        self.conn.receive_data(data)  # b"": end of stream, which h11 turns into an event or an error

    async def _read_head(self) -> h11.Request | None:
        """The next request head; None when the client closed or stayed idle."""
        loop = asyncio.get_running_loop()
        started = bool(self.conn.trailing_data[0])  # a pipelined request already begun
        deadline = loop.time() + (self.config.head_timeout if started else self.config.idle_timeout)
        while True:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as exc:
                if self.conn.trailing_data[1]:  # the client left halfway through a head: nobody to answer
                    raise _Ended from exc
                if exc.error_status_hint == 431:
                    await self._fail(431, f"request head over {MAX_HEAD // 1024} KiB")
                await self._fail(501 if exc.error_status_hint == 501 else 400, f"bad request: {exc}")
            if isinstance(event, h11.Request):
                return event
            if event is not h11.NEED_DATA:  # ConnectionClosed: the client is done
                return None
            try:
                await self._feed(deadline - loop.time())
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
        """The next piece of the request body (bounded by READ_SIZE and the body timeout)."""
        while True:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as exc:
                if self.conn.trailing_data[1]:  # the client left halfway through a body: nobody to answer
                    raise _Ended from exc
                # Inside a body, h11's 431 means an over-long chunk-size line: plain bad framing.
                why = f"a chunk-size line over {MAX_HEAD // 1024} KiB" if exc.error_status_hint == 431 else str(exc)
                await self._fail(400, f"bad request body: {why}")
            if isinstance(event, (h11.Data, h11.EndOfMessage)):
                return event
            # Otherwise NEED_DATA: a body cut short is an h11 error, never a ConnectionClosed event.
            try:
                await self._feed(self.config.body_timeout)
            except TimeoutError:
                await self._fail(408, f"request body stalled for {self.config.body_timeout:g}s")

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

    async def _fail(self, status: int, text: str, *, log_it: bool = True) -> NoReturn:
        """Answer `status` (if no answer has begun), close the connection, end the exchange."""
        text = text[:300]  # h11's messages quote the client's bytes
        if log_it:
            self.proxy._refuse(self.ip, "%d %s", status, text)
        if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            body = (text + "\n").encode("utf-8", "replace")
            try:
                await self._send(
                    h11.Response(
                        status_code=status,
                        reason=http.HTTPStatus(status).phrase.encode(),
                        headers=[
                            (b"content-type", b"text/plain; charset=utf-8"),
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
        headers = request.headers
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
        length = _values(headers, b"content-length")  # h11 has refused differing values and collapsed equal ones
        if length and _values(headers, b"transfer-encoding"):
            await self._fail(400, "bad request: both Transfer-Encoding and Content-Length")
        if length and int(length[0]) > self.config.max_body:
            await self._fail(413, f"request body of {int(length[0])} bytes: the limit is {self.config.max_body}")
        if self.conn.they_are_waiting_for_100_continue:
            await self._send(h11.InformationalResponse(status_code=100, headers=[]))
        # Open the upstream connection only once the body has begun: a head alone costs the SuperLink nothing.
        first = await self._body_event()
        await _Upstream(self, request, first).relay()
        self.proxy.forwarded += 1


class _Upstream:
    """One request relayed to the SuperLink on a connection of its own (never reused: no race with
    the SuperLink's keep-alive timeout), written by h11 from the parsed request."""

    def __init__(self, client: _Client, request: h11.Request, first: h11.Data | h11.EndOfMessage):
        self.client, self.config = client, client.config
        self.request, self.first = request, first
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
        client, limit = self.client, self.config.max_body
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

    async def _upstream_event(self, reader: asyncio.StreamReader) -> h11.Event | type[h11.PAUSED]:
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:  # (a sentinel class: the type checker does not narrow on it)
                return cast("h11.Event | type[h11.PAUSED]", event)
            self.conn.receive_data(await asyncio.wait_for(reader.read(READ_SIZE), self.config.io_timeout))

    async def _relay_response(self, reader: asyncio.StreamReader) -> None:
        client = self.client
        while True:
            event = await self._upstream_event(reader)
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


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    d = ProxyConfig("", 0, "", 0)  # its defaults, shown in --help
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
    g = p.add_argument_group("limits (each refusal is answered with an HTTP status where one can be sent)")
    g.add_argument(
        "--max-body",
        type=_positive(int),
        default=d.max_body,
        metavar="BYTES",
        help=f"largest request body; more: 413 (default {d.max_body})",
    )
    g.add_argument(
        "--max-connections",
        type=_positive(int),
        default=d.max_connections,
        metavar="N",
        help=f"open connections in all; more are closed at once (default {d.max_connections})",
    )
    g.add_argument(
        "--max-connections-per-ip",
        type=_positive(int),
        default=d.max_connections_per_ip,
        metavar="N",
        help=f"open connections from one client address (default {d.max_connections_per_ip})",
    )
    for flag, field, what in [
        ("--handshake-timeout", "handshake_timeout", "to complete the TLS handshake"),
        ("--head-timeout", "head_timeout", "from a request's first byte to its whole head"),
        ("--idle-timeout", "idle_timeout", "a kept-alive connection may wait for its next request"),
        ("--body-timeout", "body_timeout", "of silence while a request body arrives (then 408)"),
        ("--upstream-timeout", "io_timeout", "for the SuperLink's answer (then 504)"),
    ]:
        g.add_argument(
            flag,
            type=_positive(float),
            default=getattr(d, field),
            metavar="SECONDS",
            help=f"seconds {what} (default {getattr(d, field):g})",
        )
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
        max_body=args.max_body,
        max_connections=args.max_connections,
        max_connections_per_ip=args.max_connections_per_ip,
        handshake_timeout=args.handshake_timeout,
        head_timeout=args.head_timeout,
        idle_timeout=args.idle_timeout,
        body_timeout=args.body_timeout,
        io_timeout=args.upstream_timeout,
    )


def main(argv: list[str] | None = None) -> int:
    configure_logging()
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
    except (ValueError, OSError, ssl.SSLError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(config))
    except OSError as exc:
        print(f"error: cannot listen on {args.listen}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
