"""Fleet-only reverse proxy: the one door from the hospitals' network to the aggregator.

Flower 1.42's SuperLink serves three APIs on ONE port: Fleet (`/v1/fleet/...`, what SuperNodes
speak), Control (`/v1/control/...`, what `flwr run`/`flwr supernode register` speak) and Runtime
(`/v1/runtime/...`, what the ServerApp process speaks). The open-source Control API has no
authentication: whoever reaches it can submit an app that then runs at every hospital. So the
SuperLink listens on the aggregator's internal network only, and hospitals reach it through this
proxy, which forwards `POST /v1/fleet/<method>` and answers everything else with 403.

What the SuperNode speaks (read from flwr 1.42: `flwr/supernode/fleet_http_client.py`,
`flwr/supercore/protobuf/client.py`): protobuf bodies over plain HTTP/1.1 (httpx, no HTTP/2),
POST to `/v1/fleet/<kebab-case-rpc>`, inside TLS; SuperNode authentication travels in request
headers (public key, timestamp, signature of the timestamp), which this proxy passes unchanged.
Some responses are streamed (chunked); they are relayed chunk by chunk as they arrive.

The proxy terminates TLS (the aggregator's server certificate, so hospitals verify the same CA) and
opens its own TLS connection to the SuperLink for each request (verified against the same CA;
one upstream connection per request, so no race with the SuperLink's keep-alive timeout). Every request on a
kept-alive connection is checked, not just the first: the proxy parses HTTP/1.1 framing itself
(Content-Length or chunked; both at once, duplicates, obs-fold, Upgrade and absolute-form targets
are refused), so no request can be smuggled behind an allowed one.

Run: `fedprompt aggregator proxy ...` or `python -m fedprompt.server.fleet_proxy --help`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import signal
import ssl
import sys
from dataclasses import dataclass

log = logging.getLogger("fedprompt.fleet_proxy")

FLEET_PATH = re.compile(r"^/v1/fleet/[a-z0-9][a-z0-9-]{0,63}$")  # exact method paths only: no query, no %, no dots
MAX_HEAD = 64 * 1024
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization", "te", "trailer", "upgrade"}
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


class BadRequest(Exception):
    pass


@dataclass
class Head:
    start: str  # request line or status line
    headers: list[tuple[str, str]]

    def get(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name]


@dataclass
class ProxyConfig:
    listen_host: str
    listen_port: int
    upstream_host: str
    upstream_port: int
    server_ssl: ssl.SSLContext | None = None  # None: plain HTTP towards hospitals (tests only)
    upstream_ssl: ssl.SSLContext | None = None  # None: plain HTTP towards the SuperLink
    upstream_server_name: str | None = None  # TLS name to verify (default: upstream_host)
    head_timeout: float = 120.0  # idle keep-alive / slow request head
    io_timeout: float = 300.0  # one read or write while relaying
    connect_timeout: float = 10.0


def allowed(method: str, target: str) -> bool:
    return method == "POST" and bool(FLEET_PATH.match(target))


async def read_head(reader: asyncio.StreamReader) -> Head | None:
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial.strip():
            return None
        raise BadRequest("truncated head") from exc
    except asyncio.LimitOverrunError as exc:
        raise BadRequest("head too large") from exc
    try:
        text = raw[:-4].decode("latin-1")
    except UnicodeDecodeError as exc:  # pragma: no cover - latin-1 decodes everything
        raise BadRequest("undecodable head") from exc
    lines = text.split("\r\n")
    headers = []
    for line in lines[1:]:
        if not line or line[0] in " \t":
            raise BadRequest("obsolete line folding or empty header line")
        name, sep, value = line.partition(":")
        if not sep or not _TOKEN.match(name):
            raise BadRequest(f"malformed header line {line[:40]!r}")
        headers.append((name, value.strip(" \t")))
    return Head(lines[0], headers)


def body_framing(head: Head, *, request: bool) -> tuple[str, int]:
    """('length', n) | ('chunked', 0) | ('close', 0) — request bodies never use 'close'."""
    te = head.get("transfer-encoding")
    cl = head.get("content-length")
    if te and cl:
        raise BadRequest("both Transfer-Encoding and Content-Length")
    if te:
        if len(te) != 1 or te[0].strip().lower() != "chunked":
            raise BadRequest(f"unsupported Transfer-Encoding {te}")
        return "chunked", 0
    if cl:
        if len(set(cl)) != 1 or not cl[0].isdigit():
            raise BadRequest(f"bad Content-Length {cl}")
        return "length", int(cl[0])
    return ("length", 0) if request else ("close", 0)


def _serialize(head: Head, drop: set[str]) -> bytes:
    lines = [head.start] + [f"{k}: {v}" for k, v in head.headers if k.lower() not in drop]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class FleetProxy:
    def __init__(self, config: ProxyConfig):
        self.config = config
        self.server: asyncio.AbstractServer | None = None
        self.forwarded = 0
        self.refused = 0

    async def start(self) -> None:
        c = self.config
        self.server = await asyncio.start_server(self._handle, c.listen_host, c.listen_port, ssl=c.server_ssl, limit=MAX_HEAD)
        names = ", ".join(str(s.getsockname()[:2]) for s in self.server.sockets)
        scheme = "https" if c.server_ssl else "http"
        up = "https" if c.upstream_ssl else "http"
        log.info("fleet proxy on %s (%s) -> %s://%s:%d; only POST /v1/fleet/* is forwarded", names, scheme, up, c.upstream_host, c.upstream_port)

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _respond(self, writer: asyncio.StreamWriter, status: int, reason: str, text: str) -> None:
        body = (text + "\n").encode()
        writer.write(
            f"HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n".encode()
            + body
        )
        try:
            await asyncio.wait_for(writer.drain(), self.config.io_timeout)
        except (OSError, asyncio.TimeoutError):
            pass

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        try:
            while True:
                try:
                    head = await asyncio.wait_for(read_head(reader), self.config.head_timeout)
                except asyncio.TimeoutError:
                    break
                except BadRequest as exc:
                    await self._respond(writer, 400, "Bad Request", f"bad request: {exc}")
                    break
                if head is None:
                    break
                parts = head.start.split(" ")
                if len(parts) != 3 or parts[2] != "HTTP/1.1":
                    await self._respond(writer, 400, "Bad Request", "HTTP/1.1 only")
                    break
                method, target, _ = parts
                if not allowed(method, target) or head.get("upgrade"):
                    self.refused += 1
                    log.warning("refused %s %s from %s: only POST /v1/fleet/* is served here", method, target[:200], peer)
                    await self._respond(writer, 403, "Forbidden", "forbidden: this endpoint serves the Flower Fleet API only")
                    break
                try:
                    kind, length = body_framing(head, request=True)
                except BadRequest as exc:
                    await self._respond(writer, 400, "Bad Request", f"bad request: {exc}")
                    break
                if not await self._forward(head, kind, length, reader, writer, method):
                    break
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, BadRequest, ssl.SSLError, ValueError, IndexError) as exc:
            log.debug("connection from %s ended: %r", peer, exc)
        except asyncio.CancelledError:
            # Shutdown cancels open connections. End this handler normally: Python 3.11's stream
            # callback calls exception() on a cancelled handler task and logs a traceback per connection.
            log.debug("connection from %s closed at shutdown", peer)
        finally:
            try:
                writer.close()
            except Exception:  # noqa: BLE001 - best effort on teardown
                pass

    async def _forward(self, head: Head, kind: str, length: int, reader, writer, method: str) -> bool:
        """One request on a fresh upstream connection (never reused: no race with the SuperLink's
        keep-alive timeout). True if the client connection may carry another request."""
        try:
            up_reader, up_writer = await self._connect()
        except (OSError, asyncio.TimeoutError, ssl.SSLError) as exc:
            log.warning("upstream %s:%d unreachable: %s", self.config.upstream_host, self.config.upstream_port, exc)
            await self._respond(writer, 502, "Bad Gateway", "the aggregator is not reachable right now")
            return False
        try:
            client_close = any("close" in v.lower() for v in head.get("connection"))
            out = _serialize(head, HOP_BY_HOP)
            up_writer.write(out[:-2] + b"connection: close\r\n\r\n")
            await self._relay_body(reader, up_writer, kind, length)
            keep = await self._relay_response(up_reader, writer, method)
            self.forwarded += 1
            return keep and not client_close
        finally:
            try:
                up_writer.close()
            except Exception:  # noqa: BLE001
                pass

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        c = self.config
        kwargs = {}
        if c.upstream_ssl is not None:
            kwargs = {"ssl": c.upstream_ssl, "server_hostname": c.upstream_server_name or c.upstream_host}
        return await asyncio.wait_for(asyncio.open_connection(c.upstream_host, c.upstream_port, limit=MAX_HEAD, **kwargs), c.connect_timeout)

    async def _read(self, coro):
        return await asyncio.wait_for(coro, self.config.io_timeout)

    async def _relay_body(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, kind: str, length: int, *, stream: bool = False) -> None:
        """Copy one message body verbatim. `stream`: no read timeout (server-streamed responses)."""
        async def rd(coro):
            return await (coro if stream else self._read(coro))

        if kind == "length":
            left = length
            while left:
                chunk = await rd(src.read(min(left, 1 << 16)))
                if not chunk:
                    raise asyncio.IncompleteReadError(b"", left)
                left -= len(chunk)
                dst.write(chunk)
                await self._read(dst.drain())
        elif kind == "chunked":
            while True:
                line = await rd(src.readuntil(b"\r\n"))
                size_text = line[:-2].split(b";", 1)[0].strip()
                if not size_text or any(ch not in b"0123456789abcdefABCDEF" for ch in size_text) or len(size_text) > 16:
                    raise BadRequest("bad chunk size")
                size = int(size_text, 16)
                dst.write(line)
                if size == 0:
                    while True:  # trailers, then the empty line
                        trailer = await rd(src.readuntil(b"\r\n"))
                        dst.write(trailer)
                        if trailer == b"\r\n":
                            break
                    await self._read(dst.drain())
                    return
                data = await rd(src.readexactly(size + 2))
                if data[-2:] != b"\r\n":
                    raise BadRequest("bad chunk terminator")
                dst.write(data)
                await self._read(dst.drain())
        else:  # until the upstream closes
            while True:
                chunk = await src.read(1 << 16)
                if not chunk:
                    break
                dst.write(chunk)
                await self._read(dst.drain())
        await self._read(dst.drain())

    async def _relay_response(self, up: asyncio.StreamReader, client: asyncio.StreamWriter, method: str) -> bool:
        """Relay one response (after any 1xx); True if the connection may be kept alive."""
        while True:
            # The SuperLink may hold a long-poll or stream open: no head timeout beyond io_timeout.
            head = await self._read(read_head(up))
            if head is None:
                raise asyncio.IncompleteReadError(b"", None)
            status = int(head.start.split(" ", 2)[1])
            if 100 <= status < 200:
                client.write(_serialize(head, HOP_BY_HOP))
                continue
            break
        kind, length = body_framing(head, request=False)
        no_body = method == "HEAD" or status in (204, 304)
        # The upstream connection is per request (we sent `connection: close`); the client's
        # connection stays open unless the body is delimited by the close itself.
        keep = kind != "close"
        # Transfer-Encoding is kept: chunked bodies are relayed verbatim.
        drop = HOP_BY_HOP | ({"transfer-encoding"} if no_body else set())
        out = _serialize(head, drop)
        if not keep:
            out = out[:-2] + b"connection: close\r\n\r\n"
        client.write(out)
        await self._read(client.drain())
        if not no_body:
            streamed = "stream" in ",".join(head.get("content-type")).lower() or kind == "chunked"
            await self._relay_body(up, client, kind, length, stream=streamed)
        return keep


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
    print(f"[fedprompt] fleet proxy listening on {config.listen_host}:{proxy.port}", flush=True)
    try:
        await stop.wait()
    finally:
        await proxy.close()
        log.info("fleet proxy stopped (forwarded %d, refused %d)", proxy.forwarded, proxy.refused)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="fleet-proxy", description="Forward only the Flower Fleet API (POST /v1/fleet/*); 403 for the rest.")
    p.add_argument("--listen", default="0.0.0.0:9443", help="HOST:PORT the hospitals connect to (default 0.0.0.0:9443)")
    p.add_argument("--upstream", default="127.0.0.1:8000", help="the SuperLink's HOST:PORT on the aggregator's internal network")
    p.add_argument("--pki", help="folder from `fedprompt pki init` (server.pem/server.key/ca.pem)")
    p.add_argument("--certfile", help="TLS certificate presented to hospitals (default: PKI/server.pem)")
    p.add_argument("--keyfile", help="its private key (default: PKI/server.key)")
    p.add_argument("--upstream-ca", help="CA that signed the SuperLink's certificate (default: PKI/ca.pem)")
    p.add_argument("--upstream-name", help="name to verify in the SuperLink's certificate (default: the --upstream host)")
    p.add_argument("--upstream-insecure", action="store_true", help="plain HTTP to the SuperLink (only if it runs with --insecure)")
    p.add_argument("--insecure", action="store_true", help="plain HTTP towards hospitals (testing only)")
    return p


def config_from_args(args: argparse.Namespace) -> ProxyConfig:
    import os

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
        lh, lp, uh, up,
        server_ssl=None if args.insecure else server_context(cert, key),
        upstream_ssl=None if args.upstream_insecure else upstream_context(ca),
        upstream_server_name=args.upstream_name,
    )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
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
