"""Gaussian noise for every DP release of a site, drawn from the OS's cryptographic generator.

torch's generators are Mersenne Twisters: 624 consecutive outputs determine all later ones, so noise
drawn from one is only as unpredictable as its seed, and a seed repeated (two processes, a restored
snapshot) repeats the noise exactly. Here every value comes from fresh bytes of `os.urandom`
(getrandom(2), the kernel CSPRNG): no state lives in the process, so two processes, forked or
spawned, never share a stream.

Bytes to normals: 53 random bits give a uniform u = (k + 1/2) / 2^53 in (0, 1) (never 0 nor 1),
and z = Phi^-1(u) (the inverse CDF, torch.special.ndtri, in float64). The inverse CDF rather than
Box-Muller because it is monotone in u: P(z <= t) differs from the Gaussian's Phi(t) by at most
2^-53 plus ndtri's own error (about 1e-15 relative) at every t, one explicit bound; Box-Muller's
error (a log and a cosine of two uniforms) has no such one-line statement. The draws reach at most
|z| = Phi^-1(2^-54) ~ 8.3 standard deviations: the tail beyond is cut, which is a probability of
about 1e-16 per value.

Floating-point attacks (Mironov 2012 on the Laplace mechanism; Jin et al. 2021, arXiv 2112.05307,
on Opacus' Gaussian): a mechanism that adds float noise to a float value leaves holes in the set of
outputs it can reach, and which holes depends on the true value, so one output can rule a value
out. Here the noise is drawn and added in float64 (52-bit mantissa) and the sum is rounded ONCE to
the released dtype (float32: 23 bits), so every released value is the rounding of a float64 sum
whose noise has, in the bulk of the distribution, about 2^29 distinct values per float32 step: the
holes of the float64 noise lie far below the released resolution. Residual risk (docs/privacy.md):
this is not a proven discrete mechanism (the discrete Gaussian of Canonne, Kamath and Steinke 2020
with its own accounting would be); the released distribution differs from the accounted Gaussian by
the 2^-53 discretisation of the CDF and the cut tail, which the accounting treats as nothing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

_MANTISSA_BITS = 53
_scale = 1.0  # 1 except inside `weakened` (the audit's simulated noise bug)


@contextmanager
def weakened(factor: float) -> Iterator[None]:
    """Inside, every Gaussian drawn here is `factor` times its std while the ledger still charges the
    calibrated sigma: the noise bug `fedprompt audit` simulates, on its throwaway copy of the site,
    to show it can see one (client/audit.py; nothing else enters it, tests/test_audit.py checks)."""
    global _scale
    if not 0 <= factor <= 1:
        raise ValueError(f"a weakened noise is a factor in [0, 1], got {factor}")
    before, _scale = _scale, factor
    try:
        yield
    finally:
        _scale = before


def uniforms(n: int) -> torch.Tensor:
    """n float64 uniforms in (0, 1) from os.urandom: (k + 1/2) / 2^53 for a random 53-bit k."""
    bits = np.frombuffer(os.urandom(8 * n), dtype=np.uint64) >> np.uint64(64 - _MANTISSA_BITS)
    return torch.from_numpy((bits.astype(np.float64) + 0.5) * 2.0**-_MANTISSA_BITS)


def gaussian(
    shape: torch.Size | tuple[int, ...],
    std: float,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """N(0, std^2) values of `shape` from the OS's CSPRNG (inverse CDF in float64, then cast once).

    Drawn on the CPU and moved: an accelerator has no access to the kernel's generator, and the
    released tensors of this project are tens of thousands of values (milliseconds)."""
    n, std = int(np.prod(shape, dtype=np.int64)), std * _scale
    if std == 0 or n == 0:
        return torch.zeros(shape, dtype=dtype, device=device)
    z = torch.special.ndtri(uniforms(n)) * std
    return z.reshape(shape).to(device=device, dtype=dtype)


def add_gaussian(value: torch.Tensor, std: float) -> torch.Tensor:
    """value + N(0, std^2 I), the sum formed in float64 and rounded once to value's dtype (see above)."""
    noise = gaussian(value.shape, std, torch.float64, value.device)
    return (value.to(torch.float64) + noise).to(value.dtype)


class SecureNoiseDPOptimizer(DPOptimizer):
    """Opacus' DPOptimizer with its noise drawn from the OS's CSPRNG (client/secure_noise.py)
    instead of a torch generator. As Opacus' add_noise (opacus 1.6): N(0, (noise_multiplier x
    max_grad_norm)^2) per coordinate added to the summed clipped gradient, which scale_grad then
    divides by expected_batch_size; the sum is formed in float64 and rounded once. A `generator`
    given (reproducible tests and benchmarks) keeps Opacus' own draw."""

    def add_noise(self) -> None:
        if self.generator is not None:
            super().add_noise()
            return
        std = self.noise_multiplier * self.max_grad_norm
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            p.grad = add_gaussian(p.summed_grad, std).view_as(p)
            _mark_as_processed(p.summed_grad)
