"""When a reply leaves the site, and the time stamp it carries.

How long a site takes to answer grows with its records (a run's first round encodes every record
once), so a reply does not leave when it is ready: the hospital's executor holds it until the first
point of a fixed grid counted from the message's arrival, `site.yaml: reply_after_s` x 2^k
(k = 0, 1, ...), or the message's deadline if that comes first. The aggregator then learns which
grid point a reply hit, never the processing time: at most log2 of the grid's points a message
(common/channels.py, docs/privacy.md), nothing in practice when `reply_after_s` is above the
site's slowest round.

Flower stamps a reply with its creation time to the microsecond (`Metadata.created_at`) and a TTL
derived from it; `coarse_stamp` floors the stamp to the whole second and keeps the expiry of the
message replied to, so no field carries a sub-second time of the site's.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from flwr.app import Message

from fedprompt.common.channels import DEFAULT_REPLY_AFTER_S, grid_point
from fedprompt.common.config import SiteConfig
from fedprompt.common.errors import InputError


def site_grid(site: Path) -> float:
    """site.yaml's `reply_after_s`; the default where site.yaml cannot be read (that message's
    refusal is held like any reply)."""
    try:
        return SiteConfig.load(site).reply_after_s
    except (InputError, OSError):
        return DEFAULT_REPLY_AFTER_S


def hold(received: float, base: float, deadline: float | None = None) -> float:
    """Wait (monotonic clock: `received` and `deadline` are time.monotonic() values) until this
    reply's grid point; returns it, in seconds after arrival."""
    point = grid_point(time.monotonic() - received, base, None if deadline is None else deadline - received)
    while (left := received + point - time.monotonic()) > 0:
        time.sleep(left)
    return point


def coarse_stamp(reply: Message, to: Message) -> Message:
    """`reply` with its creation time floored to the whole second, its TTL ending where the message
    it answers expires (as Flower sets it, from that floored time). Returns `reply`."""
    created = float(math.floor(reply.metadata.created_at))
    reply.metadata.created_at = created
    reply.metadata.ttl = to.metadata.created_at + to.metadata.ttl - created
    return reply
