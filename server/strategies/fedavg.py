"""FedAvg: the mean of the updates, weighted by the sites' declared sizes."""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg

from fedprompt.common.config import FedAvgSettings

from .registry import Sampling, register


@register(FedAvgSettings)
def fedavg(settings: FedAvgSettings, sampling: Sampling) -> FedAvg:
    return FedAvg(**sampling)
