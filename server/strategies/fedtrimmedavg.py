"""FedTrimmedAvg: the coordinate-wise mean after cutting trim_beta of the values at each end."""

from __future__ import annotations

from flwr.serverapp.strategy import FedTrimmedAvg

from fedprompt.common.config import FedTrimmedAvgSettings

from .registry import Sampling, register


@register(FedTrimmedAvgSettings)
def fedtrimmedavg(settings: FedTrimmedAvgSettings, sampling: Sampling) -> FedTrimmedAvg:
    return FedTrimmedAvg(beta=settings.trim_beta, **sampling)
