"""The head built from the sites' one-shot class-sum release (round 1; client/class_sums.py).

The aggregator's weighted mean of the replies (weights = declared sizes, each reply already divided
by its own declared size) is sum(S) / sum(w): every site's noisy class sums added up, over the total
declared size. Each label's row of the new head is the direction of those sums plus `prior` records'
worth of the label text's embedding, prior = label_prior x sigma x sqrt(sites): about 3x the norm
of the noise summed into a row (sigma x sqrt(sites x hidden)) at the default 60, so that a class the
noise swamps, or few sites hold, falls back towards its zero-shot prototype. Chosen on the public
corpus across six regimes (BENCHMARKS.md): a fixed prior lost 8-12 points at epsilon 1. Post-processing
of released values only: free.
"""

from __future__ import annotations

import math

import torch

# Without noise (a non-private run) the label text still counts as one record of its class: a class no
# site holds keeps its zero-shot row instead of a zero one.
NOISELESS_PRIOR = 1.0


def label_weight(label_prior: float, sigma: float, sites: int) -> float:
    """How many records' worth of each label's embedding joins its class sums."""
    return max(label_prior * sigma * math.sqrt(sites), NOISELESS_PRIOR)


def head_from_class_sums(
    mean_sums: torch.Tensor, total_weight: float, label_prototypes: torch.Tensor, prior: float, logit_scale: float
) -> torch.Tensor:
    """[labels, hidden] head weight: logit_scale x unit rows of (sums + prior x prototype)."""
    rows = mean_sums.double() * total_weight + prior * label_prototypes.double()
    return (torch.nn.functional.normalize(rows, dim=-1) * logit_scale).float()
