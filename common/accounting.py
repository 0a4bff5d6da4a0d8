"""Privacy accounting as pure functions: the epsilon of a (sigma, q, steps) history, and the noise
that reaches a target epsilon. One place for the site's ledger, its calibration, the aggregator's
bounds (common/schedule.py), `fedprompt plan`, the audit and the benchmarks.

A history is a sequence of (sigma, q, steps): `steps` steps of the Poisson-subsampled Gaussian
mechanism at rate q and noise multiplier sigma (None: a non-private round, epsilon infinite).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable

History = tuple[tuple[float, float, int], ...]

# Above this epsilon the PRV accountant's domain grows without bound: RDP answers alone.
PRV_CEILING = 100.0


def accountant_history(
    steps: Iterable[tuple[float | None, float, int]],
) -> list[tuple[float | None, float, int]]:
    """(sigma, q, steps) triples as Opacus's accountant would hold them had it stepped through them."""
    merged: list[tuple[float | None, float, int]] = []
    for sigma, q, n in steps:
        if merged and merged[-1][:2] == (sigma, q):
            merged[-1] = (sigma, q, merged[-1][2] + n)
        else:
            merged.append((sigma, q, n))
    return merged


def compute_epsilon(mechanism: str, steps: Iterable[tuple[float | None, float, int]], delta: float) -> float:
    """Epsilon of a (sigma, q, steps) history at `delta`, by Opacus's PRV or RDP accountant.

    A sigma of None is a non-private round: the epsilon is infinite, whatever else the history holds.
    """
    steps = list(steps)
    if any(sigma is None for sigma, _, _ in steps):
        return math.inf
    history = accountant_history(steps)
    if not history:
        return 0.0
    return _epsilon(mechanism, tuple(history), delta)


def json_epsilon(epsilon: float) -> float | str:
    """An epsilon fit for JSON: the number, or the string "inf" once a site trained without DP."""
    return "inf" if epsilon == math.inf else epsilon


@functools.lru_cache(maxsize=256)
def _epsilon(mechanism: str, history: History, delta: float) -> float:
    """compute_epsilon of a merged, private history, remembered in this process: a site's ledger, its
    projections and the audit's runs ask for the same histories again (seconds each on PRV)."""
    # Imported here: opacus pulls in torch (seconds), and the CLI should start fast.
    from opacus.accountants import PRVAccountant, RDPAccountant

    rdp = RDPAccountant()
    rdp.history = list(history)
    rdp_eps = float(rdp.get_epsilon(delta))
    if mechanism == "rdp" or rdp_eps > PRV_CEILING:
        return rdp_eps
    prv = PRVAccountant()
    prv.history = list(history)
    prv_eps = float(prv.get_epsilon(delta))
    return prv_eps if math.isfinite(prv_eps) else rdp_eps


@functools.lru_cache(maxsize=64)
def calibrate_noise(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "prv",
    after: History = (),
) -> float:
    """Noise multiplier for `steps` steps at `sample_rate` that, composed after the mechanisms in
    `after` (e.g. a one-shot release earlier in the same run), reaches `target_epsilon`.

    Without `after` this is Opacus's own calibration. With it, Opacus has none for a composition, so
    we bisect on compute_epsilon of the whole history (monotone in sigma), to the same tolerance.
    """
    from opacus.accountants.utils import get_noise_multiplier

    if not after:
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=accountant,
                epsilon_tolerance=0.01,
            )
        )

    def eps(sigma: float) -> float:
        return compute_epsilon(accountant, [*after, (sigma, sample_rate, steps)], delta)

    if compute_epsilon(accountant, after, delta) >= target_epsilon:
        raise ValueError(f"the earlier release alone spends epsilon {target_epsilon:g} or more")
    low, high = 0.0, 10.0
    while eps(high) > target_epsilon:
        low, high = high, 2 * high
    while True:
        mid = (low + high) / 2
        e = eps(mid)
        if e > target_epsilon:
            low = mid
        elif e < target_epsilon - 0.01:
            high = mid
        else:
            return mid
