"""FedProx: FedAvg's aggregation; each site adds the proximal term (its weight travels in the round plan)."""

from __future__ import annotations

from flwr.serverapp.strategy import FedProx

from fedprompt.common.config import FedProxSettings

from .registry import Sampling, register


@register(FedProxSettings)
def fedprox(settings: FedProxSettings, sampling: Sampling) -> FedProx:
    return FedProx(proximal_mu=settings.proximal_mu, **sampling)
