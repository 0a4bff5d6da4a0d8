"""The Fleet proxy's shares: who may hold a connection, how large each Fleet method's body may be,
and how many body bytes the SuperLink may be sent at once (it reads each body whole)."""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections import Counter, OrderedDict
from collections.abc import Hashable

# Flower 1.42's Fleet routes (flwr/superlink/routers/fleet/router.py) and the largest body each
# needs. push-object carries one object: an array chunk of at most FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE
# (5 MiB) or a whole small record (metrics, configs: KBs here); its cap is ProxyConfig.max_body.
# push-messages carries message headers and object trees (64-byte ids per object); the others
# name a node, a run or a few objects, and a public key (~220 bytes).
SMALL_BODY = 64 * 1024
PUSH_MESSAGES_BODY = 1024 * 1024
SMALL_METHODS = frozenset(
    {
        b"register-node",
        b"activate-node",
        b"deactivate-node",
        b"unregister-node",
        b"send-node-heartbeat",
        b"pull-messages",
        b"get-run",
        b"get-fab",
        b"pull-object",
        b"confirm-message-received",
    }
)


def body_cap(method: bytes, max_object: int) -> int | None:
    """The largest body of this Fleet method; None for a method Flower does not have."""
    if method == b"push-object":
        return max_object
    if method == b"push-messages":
        return PUSH_MESSAGES_BODY
    return SMALL_BODY if method in SMALL_METHODS else None


def source_group(ip: str) -> str:
    """The network a per-source limit counts: /24 for IPv4 (and IPv4-mapped IPv6), /64 for IPv6,
    so that one host with many addresses counts once."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    prefix = 24 if addr.version == 4 else 64
    return str(ipaddress.ip_network(f"{addr}/{prefix}", strict=False))


class Slots:
    """Connections, counted before the TLS handshake (nothing is known yet but the address).

    A connection is a stranger's until one of its requests authenticates. Strangers share
    `total - reserved` slots and at most `per_source` per network (`source_group`); the reserved
    ones are for connections that authenticated and for addresses that authenticated within
    `known_ttl`. When the strangers' share (or the whole) is full, a new connection takes the slot
    of the oldest stranger, which is closed: holding slots does not lock anyone out, and a
    hospital's new connection authenticates within its first request. Strangers may open at most
    `stranger_rate` connections a second (all together, bursts of as many): a TLS handshake costs
    the proxy milliseconds of CPU, which a flood of new connections would take from the hospitals."""

    KNOWN_MAX = 1024  # addresses remembered (only authenticated requests add one)

    def __init__(self, total: int, reserved: int, per_source: int, stranger_rate: float, known_ttl: float = 86400.0):
        self.total, self.per_source, self.known_ttl = total, per_source, known_ttl
        self.strangers_max = total - reserved
        self.stranger_rate, self.tokens, self.refilled = stranger_rate, stranger_rate, time.monotonic()
        self.open: dict[Hashable, str] = {}  # token -> address
        self.strangers: OrderedDict[Hashable, str] = OrderedDict()  # token -> network, oldest first
        self.per_group: Counter[str] = Counter()
        self.known: OrderedDict[str, float] = OrderedDict()  # address -> when it last authenticated

    def is_known(self, ip: str) -> bool:
        seen = self.known.get(ip)
        return seen is not None and time.monotonic() - seen < self.known_ttl

    def decide(self, ip: str) -> tuple[str | None, Hashable | None]:
        """(why it is refused, or None; the stranger whose slot it takes, or None)."""
        stranger = not self.is_known(ip)
        group = source_group(ip)
        if stranger and self.per_group[group] >= self.per_source:
            return f"{self.per_group[group]} connections from {group} not authenticated (cap {self.per_source})", None
        if stranger and not self._take_token():
            return f"over {self.stranger_rate:g} new connections a second from addresses not authenticated", None
        full = len(self.open) >= self.total or (stranger and len(self.strangers) >= self.strangers_max)
        if not full:
            return None, None
        if not self.strangers:
            return f"{len(self.open)} connections open, all authenticated (cap {self.total})", None
        victim = next(iter(self.strangers))
        self.remove(victim)
        return None, victim

    def _take_token(self) -> bool:
        now = time.monotonic()
        self.tokens = min(max(self.stranger_rate, 1.0), self.tokens + (now - self.refilled) * self.stranger_rate)
        self.refilled = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True

    def add(self, token: Hashable, ip: str) -> None:
        self.open[token] = ip
        if not self.is_known(ip):
            group = source_group(ip)
            self.strangers[token] = group
            self.per_group[group] += 1

    def trust(self, token: Hashable) -> None:
        """A request on this connection authenticated: it is no stranger, nor is its address."""
        ip = self.open.get(token)
        if ip is None:
            return
        self._forget_stranger(token)
        self.known[ip] = time.monotonic()
        self.known.move_to_end(ip)
        while len(self.known) > self.KNOWN_MAX:
            self.known.popitem(last=False)

    def remove(self, token: Hashable) -> None:
        self.open.pop(token, None)
        self._forget_stranger(token)

    def _forget_stranger(self, token: Hashable) -> None:
        group = self.strangers.pop(token, None)
        if group is not None:
            self.per_group[group] -= 1
            if not self.per_group[group]:
                del self.per_group[group]


class ByteBudget:
    """Body bytes being sent to the SuperLink at once (each request holds its declared length, or
    its method's cap when chunked, until answered): the SuperLink holds at most `limit` of them."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0
        self._waiters: list[asyncio.Future[None]] = []

    async def acquire(self, n: int, timeout: float) -> bool:
        """Wait until `n` bytes fit (at most `timeout` s); False if they did not."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.used + n > self.limit:
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, deadline - loop.time())
            except TimeoutError:
                return False
            finally:
                self._waiters.remove(waiter)
        self.used += n
        return True

    def release(self, n: int) -> None:
        self.used -= n
        for waiter in self._waiters:  # each rechecks whether it fits now
            if not waiter.done():
                waiter.set_result(None)
