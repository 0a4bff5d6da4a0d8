"""SuperNode authentication at the Fleet proxy: a request that is not signed by a registered key
is answered here and never reaches the SuperLink.

What Flower 1.42 does (read in the installed source): the SuperNode signs every Fleet request
(`flwr/supernode/node_auth_http_interceptor.py`) with three headers: `flwr-public-key` (base64 of
its PEM public key), `flwr-timestamp` (ISO time, now) and `flwr-signature` (base64 ECDSA-SHA256
over the timestamp). The SuperLink (`flwr/superlink/routers/fleet/node_auth.py`) checks that the
timestamp is within (-5 s, +305 s) of its clock, that the signature verifies, and that the key is
the one registered for the node the body names. The proxy makes the same checks with Flower's own
constants and primitives, except the node id inside the body (the SuperLink still checks it): the
key must be one the SuperLink holds as registered (`flwr supernode register`, which is what
`fedprompt aggregator register` runs).

The registered keys are read from the SuperLink itself, on the internal network: its Control API's
`list-nodes` (no body, unauthenticated in the open-source build, never reachable from the hospitals'
side). Read at start, every `refresh` seconds, and when a request names a key not known yet (at most
once per `miss_interval`: a hospital registered a moment ago gets in within seconds; strangers cannot
make the proxy poll faster).

Refusals are the SuperLink's own answers, so a SuperNode behaves as if it had reached it: bad or
missing headers 401 (the SuperNode stops); an unregistered key 412 "Failed to activate SuperNode"
(code 2004) on activate-node, 412 "registration disabled" (code 2001) on register-node, 401 elsewhere.
Keys not readable yet (the SuperLink not up): 503, which the SuperNode retries.
"""

from __future__ import annotations

import binascii
import datetime
import json
import logging
import time
from base64 import b64decode, b64encode
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import ec
from flwr.common.constant import SYSTEM_TIME_TOLERANCE, TIMESTAMP_HEADER, TIMESTAMP_TOLERANCE
from flwr.proto.control_pb2 import ListNodesResponse  # pylint: disable=E0611
from flwr.supercore.constant import FLEET_HTTP_PUBLIC_KEY_HEADER, FLEET_HTTP_SIGNATURE_HEADER, NodeStatus
from flwr.supercore.date import now
from flwr.supercore.error import ApiErrorCode, FlowerError
from flwr.supercore.error.catalog import API_ERROR_MAP
from flwr.supercore.primitives.asymmetric import (
    bytes_to_public_key,
    public_key_to_bytes,
    sign_message,
    verify_signature,
)

log = logging.getLogger("fedprompt.fleet_proxy")

LIST_NODES = b"/v1/control/list-nodes"
AUTH_HEADERS = tuple(h.encode() for h in (FLEET_HTTP_PUBLIC_KEY_HEADER, TIMESTAMP_HEADER, FLEET_HTTP_SIGNATURE_HEADER))


@dataclass(frozen=True)
class Refusal:
    """An answer in the SuperLink's own format (JSON), and why, for the proxy's log."""

    status: int
    body: bytes
    reason: str


def _http_exception(reason: str) -> Refusal:
    # FastAPI's HTTPException body, as the SuperLink's node authentication answers.
    return Refusal(401, json.dumps({"detail": "Invalid SuperNode authentication"}).encode(), reason)


def _flower_error(code: ApiErrorCode, reason: str) -> Refusal:
    spec = API_ERROR_MAP[code]
    return Refusal(
        spec.http_status_code, json.dumps(FlowerError(code, reason).to_json(spec.public_message)).encode(), reason
    )


UNAVAILABLE = Refusal(
    503, b'{"detail": "the aggregator is starting: retry"}', "the registered keys are not readable yet"
)


def _unregistered(method: bytes) -> Refusal:
    if method == b"activate-node":
        return _flower_error(ApiErrorCode.FLEET_NODE_ACTIVATION_FAILED, "key not registered")
    if method == b"register-node":
        return _flower_error(
            ApiErrorCode.FLEET_SUPERNODE_REGISTRATION_DISABLED, "self-registration (key not registered)"
        )
    return _http_exception("key not registered")


def _one(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes:
    values = [value for key, value in headers if key == name]
    if len(values) != 1:
        raise ValueError(f"{len(values)} {name.decode()} header(s)")
    return values[0]


def parse_keys(body: bytes) -> dict[bytes, ec.EllipticCurvePublicKey]:
    """The registered (not unregistered) nodes' public keys in a `list-nodes` answer."""
    reply = ListNodesResponse()
    reply.ParseFromString(body)
    return {
        node.public_key: bytes_to_public_key(node.public_key)
        for node in reply.nodes_info
        if node.public_key and node.status != NodeStatus.UNREGISTERED
    }


class NodeAuth:
    """The registered keys, and the check of one request's headers against them."""

    def __init__(self, fetch: Callable[[], Awaitable[bytes]], *, refresh: float, miss_interval: float):
        self.fetch, self.refresh_interval, self.miss_interval = fetch, refresh, miss_interval
        self.keys: dict[bytes, ec.EllipticCurvePublicKey] | None = None  # None: never read
        self.read_at = -float("inf")  # monotonic time of the last attempt to read them
        self.failing = False  # the last attempt failed (logged once, not at every retry)

    async def refresh(self) -> bool:
        """Read the registered keys from the SuperLink; False (keys kept) if it cannot be read."""
        self.read_at = time.monotonic()
        try:
            keys = parse_keys(await self.fetch())
        except Exception as exc:  # noqa: BLE001 - unreachable, refused, malformed: the old keys stay
            if not self.failing:
                log.warning("cannot read the registered SuperNode keys from the SuperLink (retrying): %r", exc)
            self.failing = True
            return False
        if self.failing:
            log.info("the registered SuperNode keys are readable again")
        self.failing = False
        if keys.keys() != (self.keys or {}).keys():
            log.info("%d registered SuperNode key(s)", len(keys))
        self.keys = keys
        return True

    async def _lookup(self, public_key: bytes) -> ec.EllipticCurvePublicKey | Refusal | None:
        """The registered key, None if not registered, UNAVAILABLE if the keys cannot be read."""
        if self.keys is not None and public_key in self.keys:
            return self.keys[public_key]
        if time.monotonic() - self.read_at >= self.miss_interval and not await self.refresh():
            return UNAVAILABLE
        if self.keys is None:
            return UNAVAILABLE
        return self.keys.get(public_key)

    async def check(self, method: bytes, headers: list[tuple[bytes, bytes]]) -> Refusal | None:
        """None if the headers carry a fresh timestamp signed by a registered key, else the refusal."""
        try:
            public_key = b64decode(_one(headers, AUTH_HEADERS[0]), validate=True)
            timestamp = _one(headers, AUTH_HEADERS[1]).decode("ascii")
            signature = b64decode(_one(headers, AUTH_HEADERS[2]), validate=True)
            age = (now() - datetime.datetime.fromisoformat(timestamp)).total_seconds()
        except (ValueError, TypeError, UnicodeError, binascii.Error) as exc:
            return _http_exception(f"no valid authentication headers ({exc})")
        if not -SYSTEM_TIME_TOLERANCE < age < TIMESTAMP_TOLERANCE + SYSTEM_TIME_TOLERANCE:
            return _http_exception(f"timestamp {age:.0f}s old, outside the allowed window")
        key = await self._lookup(public_key)
        if isinstance(key, Refusal):
            return key
        if key is None:
            return _unregistered(method)
        if not verify_signature(key, timestamp.encode("ascii"), signature):
            return _http_exception("invalid signature")
        return None


def signed_headers(private_key: ec.EllipticCurvePrivateKey) -> list[tuple[bytes, bytes]]:
    """The headers a SuperNode signs each request with (as flwr's NodeAuthHttpInterceptor), for the
    tools that speak for a registered node: the flood benchmark and the tests."""
    timestamp = now().isoformat()
    values = (
        b64encode(public_key_to_bytes(private_key.public_key())),
        timestamp.encode("ascii"),
        b64encode(sign_message(private_key, timestamp.encode("ascii"))),
    )
    return list(zip(AUTH_HEADERS, values, strict=True))
