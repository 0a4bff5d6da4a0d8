"""FedMedian: the coordinate-wise median of the updates."""

from __future__ import annotations

from flwr.serverapp.strategy import FedMedian

from fedprompt.common.config import FedMedianSettings

from .registry import Sampling, register


@register(FedMedianSettings)
def fedmedian(settings: FedMedianSettings, sampling: Sampling) -> FedMedian:
    return FedMedian(**sampling)
