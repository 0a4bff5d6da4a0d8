"""Shorter waits for message objects in Flower 1.42's processes (pinned in pyproject.toml).

A Flower message travels as a head plus content objects that are pushed after it. The process
that pulls a message can see the head before its objects have all arrived; Flower's
`pull_objects` then retries after 1 s, 2 s, 4 s ... (`PULL_INITIAL_BACKOFF`, `PULL_BACKOFF_CAP`).
With warm hospital workers a round takes a few seconds, so those backoffs were a large part of
it (benchmarks/round.py). The calling modules import `pull_objects` by name; this rebinds that
name in one module to the same function with a short backoff (never a shorter total timeout).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Protocol

INITIAL_BACKOFF_S = 0.05  # a pull on loopback or a LAN costs milliseconds
BACKOFF_CAP_S = 0.25


class _PullsObjects(Protocol):
    """A Flower module that imports `pull_objects` by name."""

    pull_objects: Callable[..., Any]


def shorten_object_pull_backoff(module: _PullsObjects) -> None:
    """`module.pull_objects` with INITIAL_BACKOFF_S / BACKOFF_CAP_S unless a caller sets its own."""
    from flwr.supercore.inflatable.inflatable_utils import pull_objects

    @functools.wraps(pull_objects)
    def quick(*args, **kwargs):
        kwargs.setdefault("initial_backoff", INITIAL_BACKOFF_S)
        kwargs.setdefault("backoff_cap", BACKOFF_CAP_S)
        return pull_objects(*args, **kwargs)

    module.pull_objects = quick
