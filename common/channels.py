"""The residual channels: what a hospital's replies say besides its DP releases, and at most how much.

One table for docs/privacy.md (tests/test_timing_pad.py checks that page against it) and the
export's model card. A bound is in bits about the site's private data: a reply field computed only
from public values (the plan, site.yaml, the ledger's charges, themselves public) counts 0. A run
is M messages the site answers: its pre-flight and each round's train message (and evaluate
message, with `evaluation: separate`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import FederationConfig, SiteConfig
from .wire import REFUSAL_CATEGORIES


# --- timing: the reply grid (client/reply_timing.py holds replies to it) ------------------------------
def grid_point(elapsed: float, base: float, limit: float | None = None) -> float:
    """Seconds after arrival at which a reply ready after `elapsed` seconds leaves: the first of
    base x 2^k not before it, or `limit` (the deadline) if that comes first; never before `elapsed`.
    base 0: as soon as it is ready."""
    if base <= 0:
        return elapsed
    point = base
    while point < elapsed:
        point *= 2
    return max(elapsed, min(point, limit)) if limit is not None else point


def grid_points(base: float, limit: float) -> int:
    """How many distinct times a reply can leave at when the deadline is `limit` seconds after
    arrival (the grid points before it, and the deadline): the timing channel is log2 of this."""
    if base <= 0:
        raise ValueError("without a grid (reply_after_s 0) the timing channel is not bounded")
    count, point = 1, base
    while point < limit:
        count, point = count + 1, point * 2
    return count


DEFAULT_REPLY_AFTER_S = float(SiteConfig.model_fields["reply_after_s"].default)
DEFAULT_ROUND_TIMEOUT_S = float(FederationConfig.model_fields["round_timeout"].default)
# The round timeout bounds the deadline (the executor answers a margin before it): K is at most this.
TIMING_BITS = math.log2(grid_points(DEFAULT_REPLY_AFTER_S, DEFAULT_ROUND_TIMEOUT_S))
STATUS_BITS = math.log2(len(REFUSAL_CATEGORIES) + 1)  # "ok" or one category
DECLARED_SIZE_BITS = math.log2(9 * 9)  # 1 significant digit, 1 to 9e8: 81 values


@dataclass(frozen=True)
class Channel:
    name: str
    leaves: str  # what the aggregator sees
    bound: str  # bits about the site's private data


CHANNELS = (
    Channel(
        "timing",
        "when a reply leaves: a point of the grid `reply_after_s` x 2^k after the message arrived, or the "
        "deadline (client/reply_timing.py); its Flower time stamp floored to the second",
        f"log2 K a message, K the grid points before the round timeout: K = "
        f"{grid_points(DEFAULT_REPLY_AFTER_S, DEFAULT_ROUND_TIMEOUT_S)}, {TIMING_BITS:.2f} bits at the defaults "
        f"({DEFAULT_REPLY_AFTER_S:g} s, {DEFAULT_ROUND_TIMEOUT_S:g} s); 0 in practice when `reply_after_s` "
        "exceeds the site's slowest round",
    ),
    Channel(
        "refusal categories and pre-flight answers",
        f"each reply's status: ok, or one of the {len(REFUSAL_CATEGORIES)} refusal categories (common/wire.py)",
        f"log2 {len(REFUSAL_CATEGORIES) + 1} = {STATUS_BITS:.2f} a message; only `records` (the file is "
        "unreadable or invalid), `configuration` for more units than twice the declared size, `internal` and "
        "`worker unavailable` depend on the records, the rest on the plan, site.yaml and the ledger's totals",
    ),
    Channel(
        "label-space pin",
        "a plan whose label space is not site.yaml's `labels` is refused as `configuration` before a record is read",
        "0: the refusal depends on site.yaml only, never on which labels the records hold",
    ),
    Channel(
        "ledger head",
        "the SHA-256 hashes of the site's ledger entries since the run's first (the rollback witness)",
        "0: the entries are public charges and hashes; a guessed whole records file could be confirmed only "
        "with each entry's exact time",
    ),
    Channel(
        "epsilon-spent, epsilon-cap, delta",
        "the site's ledger total, cap and delta in every private train reply",
        "0: the ledger's charges come from public values (the plan, the declared size, site.yaml)",
    ),
    Channel(
        "declared size",
        "`num-examples`, the FedAvg weight: site.yaml `weight` (it also sets q and the noise's divisor)",
        f"0 when declared; unset, the unit count to 1 significant digit: {DECLARED_SIZE_BITS:.2f} bits, the same "
        "each run while that digit holds",
    ),
    Channel(
        "reply sizes",
        "each reply's bytes on the wire",
        "0 beyond the status: fixed shapes and float32/float64 values; the ledger chain's length is the public "
        "count of the run's entries",
    ),
)


def bits_per_run(messages: int, declared: bool = True) -> float:
    """The bound on what a run of `messages` replies says beyond its DP releases, at the defaults."""
    return messages * (TIMING_BITS + STATUS_BITS) + (0.0 if declared else DECLARED_SIZE_BITS)


def table_rows() -> list[str]:
    """docs/privacy.md's rows of the residual-channel table."""
    return [f"| {c.name} | {c.leaves} | {c.bound} |" for c in CHANNELS]
