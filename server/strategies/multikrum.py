"""Multi-Krum: the weighted mean of the m updates Krum scores best."""

from __future__ import annotations

from flwr.serverapp.strategy import MultiKrum

from fedprompt.common.config import MultiKrumSettings

from .registry import Sampling, register


@register(MultiKrumSettings)
def multikrum(settings: MultiKrumSettings, sampling: Sampling) -> MultiKrum:
    return MultiKrum(
        num_malicious_nodes=settings.malicious_hospitals, num_nodes_to_select=settings.selected_hospitals, **sampling
    )
