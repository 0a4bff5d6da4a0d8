"""Bulyan: Multi-Krum's n - 2f best, then the coordinate-wise mean of the n - 4f values nearest their median
(Flower skips a round with fewer than 4f + 3 updates; min_hospitals >= 4f + 3 rules that out, common/config.py)."""

from __future__ import annotations

from flwr.serverapp.strategy import Bulyan

from fedprompt.common.config import BulyanSettings

from .registry import Sampling, register


@register(BulyanSettings)
def bulyan(settings: BulyanSettings, sampling: Sampling) -> Bulyan:
    return Bulyan(num_malicious_nodes=settings.malicious_hospitals, **sampling)
