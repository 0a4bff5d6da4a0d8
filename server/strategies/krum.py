"""Krum: the one update closest to its n - f - 2 nearest others (min_hospitals > 2f + 2, common/config.py)."""

from __future__ import annotations

from flwr.serverapp.strategy import Krum

from fedprompt.common.config import KrumSettings

from .registry import Sampling, register


@register(KrumSettings)
def krum(settings: KrumSettings, sampling: Sampling) -> Krum:
    return Krum(num_malicious_nodes=settings.malicious_hospitals, **sampling)
