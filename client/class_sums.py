"""The one-shot release of a run's first round: each class's sum of the site's unit-norm features.

One DP unit (a record, or a patient's records together) adds a matrix M_u = sum over its records of
onehot(label) (x) feature to the [labels, hidden] sums. Each M_u is clipped to Frobenius norm 1 (a
record's already has norm 1: its feature is unit-length), so the sums have L2 sensitivity 1 under
adding or removing a unit, and one Gaussian release with noise sigma is accounted as one step of the
subsampled Gaussian at q = 1 (the ledger's (sigma, 1.0, 1)). The noisy sums are divided by the site's
declared size (public), as DP-SGD's sums are by the expected batch.
"""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from fedprompt.common.features import PAD_LABEL

from .secure_noise import gaussian


def unit_contributions(features: TensorDataset, num_labels: int) -> torch.Tensor:
    """[units, labels, hidden]: each DP unit's per-class feature sums, clipped to Frobenius norm 1.

    `features` holds (x, y) as common/features.py makes them: [N, H] and [N] per record, or
    [P, T, H] and [P, T] (padded with PAD_LABEL) per patient (group_by_patient)."""
    x, y = features.tensors
    if y.dim() == 1:
        x, y = x.unsqueeze(1), y.unsqueeze(1)
    valid = y != PAD_LABEL
    onehot = torch.nn.functional.one_hot(y.clamp(min=0), num_labels).float() * valid.unsqueeze(-1)
    m = torch.einsum("utc,uth->uch", onehot, x.float())
    norms = m.flatten(1).norm(dim=1).clamp(min=1.0)
    return m / norms[:, None, None]


def noisy_class_sums(
    features: TensorDataset,
    num_labels: int,
    sigma: float,
    declared_size: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(sum of the clipped unit contributions + N(0, sigma^2 I)) / declared_size, float32 [labels, hidden].
    The noise comes from the OS's CSPRNG (client/secure_noise.py); a seeded `generator` (benchmarks)
    makes it reproducible. Sum and noise in float64, rounded once to float32."""
    sums = unit_contributions(features, num_labels).sum(0).double()
    if generator is None:
        noise = gaussian(sums.shape, sigma, torch.float64)
    else:
        noise = torch.randn(sums.shape, generator=generator, dtype=torch.float64) * sigma
    return ((sums + noise) / declared_size).float()
