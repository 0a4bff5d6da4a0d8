"""The strategy registry: each strategy's name -> its settings model (common/config.py) and the builder
that makes its Flower strategy. A strategy registers itself in its own module (this package)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypedDict, TypeVar, get_args

from flwr.serverapp.strategy import Strategy

from fedprompt.common.config import FederationConfig, StrategyBase


class Sampling(TypedDict):
    """Whom every strategy samples: all connected nodes, once enough are (build_strategy)."""

    fraction_train: float
    fraction_evaluate: float
    min_train_nodes: int
    min_evaluate_nodes: int
    min_available_nodes: int


S = TypeVar("S", bound=StrategyBase)
Builder = Callable[[S, Sampling], Strategy]


class Entry(TypedDict):
    settings: type[StrategyBase]
    build: Builder[Any]


REGISTRY: dict[str, Entry] = {}


def register(settings: type[S]) -> Callable[[Builder[S]], Builder[S]]:
    """Register the decorated builder for `settings`' strategy (the name its `name` Literal holds)."""

    def add(build: Builder[S]) -> Builder[S]:
        (name,) = get_args(settings.model_fields["name"].annotation)
        assert name not in REGISTRY, f"strategy {name!r} registered twice"
        REGISTRY[name] = Entry(settings=settings, build=build)
        return build

    return add


def build_strategy(fed: FederationConfig, wait_for: int | None = None) -> Strategy:
    """`wait_for`: hospitals to wait for before a round starts (default: min_hospitals).
    Flower samples whoever is connected once that many are, so a simulation waits for all."""
    available = max(fed.min_hospitals, wait_for or 0)
    sampling = Sampling(
        fraction_train=1.0,
        fraction_evaluate=1.0,
        min_train_nodes=available,
        min_evaluate_nodes=available,
        min_available_nodes=available,
    )
    return REGISTRY[fed.strategy.name]["build"](fed.strategy, sampling)
