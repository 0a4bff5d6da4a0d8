"""The aggregation strategies, one module each, registered by name (registry.py): a strategy is its
settings model in common/config.py and its builder here. `build_strategy` makes the configured one."""

from . import bulyan, fedadam, fedavg, fedmedian, fedprox, fedtrimmedavg, krum, multikrum
from .registry import REGISTRY, build_strategy, register

__all__ = [
    "REGISTRY",
    "build_strategy",
    "register",
    "bulyan",
    "fedadam",
    "fedavg",
    "fedmedian",
    "fedprox",
    "fedtrimmedavg",
    "krum",
    "multikrum",
]
