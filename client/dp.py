"""DP-SGD building blocks on Opacus 1.6: calibration, wrapping, and the batch-size guard.

The trainer and the self-test share these so that what is checked is what trains.
We assemble GradSampleModule + DPOptimizer + DPDataLoader ourselves rather than calling
`PrivacyEngine.make_private`: that ties the sampler and the noise to one generator and keeps
its own per-call accountant, while the site's cumulative account lives in the ledger.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from opacus import GradSampleModule
from opacus.data_loader import DPDataLoader
from opacus.optimizers import DPOptimizer
from torch.utils.data import TensorDataset

import fedprompt.common.grad_samplers  # noqa: F401  (registers the SoftPrompt sampler)

from .secure_noise import SecureNoiseDPOptimizer


class PerSampleGradientError(RuntimeError):
    """A trainable parameter's per-sample gradient does not have one row per sample.

    This is how a parameter broadcast over the batch (PEFT's prompt-tuning path, position
    ids of shape [1, L]) shows up: Opacus would clip a batch-summed gradient as if it were
    one sample and the reported epsilon would be false.
    """


def entropy_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from OS entropy, for sampling and shuffling only: which records form a
    batch is not what DP hides (the accounting assumes the aggregator may know the sampling
    scheme, and the batch never leaves), so a seeded Mersenne Twister is enough there. Noise is
    drawn from the CSPRNG (client/secure_noise.py); a re-seeded process must not repeat either."""
    gen = torch.Generator(device=device)
    gen.manual_seed(int.from_bytes(os.urandom(8), "little"))
    return gen


class NoiseMemo:
    """Calibrated noise multipliers remembered in a file at the site (calibration is a pure function).

    A deployment starts a fresh ClientApp process for every message and one calibration takes
    seconds (10 s on a busy 2-core host): without the file every round pays it again. A wrong
    value could only change how fast the budget goes, never exceed the cap: the ledger accounts
    the sigma actually used. An unreadable file means calibrating; an unwritable one is ignored.
    """

    def __init__(self, path: Path):
        self.path = path

    @staticmethod
    def _key(args: tuple) -> str:
        import opacus

        return json.dumps([*args, opacus.__version__])

    def _read(self) -> dict:
        try:
            known = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return known if isinstance(known, dict) else {}

    def get(self, args: tuple) -> float | None:
        """Sigma remembered for calibrate_noise(*args), or None."""
        sigma = self._read().get(self._key(args))
        return sigma if isinstance(sigma, float) and math.isfinite(sigma) and sigma > 0 else None

    def put(self, args: tuple, sigma: float) -> None:
        known = self._read()
        if known.get(self._key(args)) == sigma:
            return
        from fedprompt.common.atomic import atomic_write

        try:
            atomic_write(self.path, json.dumps({**known, self._key(args): sigma}, indent=0).encode())
        except OSError:
            pass


def check_per_sample_shapes(params: Sequence[torch.Tensor], batch_size: int) -> None:
    """Raise unless every trainable parameter holds exactly one gradient row per sample."""
    for p in params:
        gs = getattr(p, "grad_sample", None)
        if isinstance(gs, list):  # several physical batches accumulated: check the newest
            gs = gs[-1] if gs else None
        if gs is None:
            raise PerSampleGradientError(f"parameter {tuple(p.shape)} has no per-sample gradient")
        if gs.shape[0] != batch_size or tuple(gs.shape[1:]) != tuple(p.shape):
            raise PerSampleGradientError(
                f"per-sample gradient of shape {tuple(gs.shape)} for a parameter {tuple(p.shape)} "
                f"in a batch of {batch_size}: the parameter is broadcast over the batch, refusing to step"
            )


def noise_only_step(optimizer: DPOptimizer, params: list[torch.nn.Parameter]) -> None:
    """An empty Poisson batch still is a DP step: clip nothing, add noise, and count it."""
    for p in params:
        # Opacus' per-sample gradient attribute, unknown to torch's types
        p.grad_sample = torch.zeros(0, *p.shape, device=p.device, dtype=p.dtype)  # type: ignore[attr-defined]
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def wrap_private(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    dataset: TensorDataset,
    *,
    sample_rate: float,
    noise_multiplier: float,
    max_grad_norm: float,
    noise_generator: torch.Generator | None = None,
    sample_generator: torch.Generator | None = None,
    expected_batch: float | None = None,
) -> tuple[GradSampleModule, DPOptimizer, DPDataLoader]:
    """Hook the trainable layers, make the optimizer clip-and-noise, make batches Poisson.
    `expected_batch`: what the noisy sum is divided by; a site passes its public one
    (common/schedule.Sampling); None: sample_rate x len(dataset), for the self-test and benchmarks.
    `noise_generator`: None (a site) draws the noise from the OS's CSPRNG (client/secure_noise.py);
    a seeded generator (tests, benchmarks) makes it reproducible."""
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=True)
    dp_opt = SecureNoiseDPOptimizer(
        optimizer,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        # A public constant (common/schedule.Sampling): Opacus divides the noisy sum by it, so the
        # released noise scale must not follow the site's true record count.
        expected_batch_size=expected_batch or sample_rate * len(dataset),  # a float: Opacus only divides by it
        loss_reduction="mean",
        generator=noise_generator,  # None: the CSPRNG (SecureNoiseDPOptimizer), what a site uses
    )
    loader = DPDataLoader(
        dataset,
        sample_rate=sample_rate,
        generator=sample_generator if sample_generator is not None else entropy_generator(),
    )
    return gsm, dp_opt, loader
