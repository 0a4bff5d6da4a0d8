"""FedAdam: the mean update, applied by a server-side Adam optimiser."""

from __future__ import annotations

from flwr.serverapp.strategy import FedAdam

from fedprompt.common.config import FedAdamSettings

from .registry import Sampling, register


@register(FedAdamSettings)
def fedadam(settings: FedAdamSettings, sampling: Sampling) -> FedAdam:
    return FedAdam(eta=settings.server_lr, **sampling)
