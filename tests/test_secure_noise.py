"""The DP noise of every release comes from the OS's CSPRNG (client/secure_noise.py): the right
distribution, a stream no two processes share, and the three releases (DP-SGD steps, the
class-sums release, the noised evaluation counts) drawing from it rather than from torch's RNG."""

from __future__ import annotations

import multiprocessing
import os

import numpy as np
import pytest
import torch
from scipy import stats
from torch.utils.data import TensorDataset

from fedprompt.client.class_sums import noisy_class_sums, unit_contributions
from fedprompt.client.dp import wrap_private
from fedprompt.client.hospital import EVAL_COUNT_SENSITIVITY, noised_counts
from fedprompt.client.secure_noise import SecureNoiseDPOptimizer, gaussian
from fedprompt.common.metrics import ClassCounts

N = 1_000_000


def test_a_million_draws_are_standard_normal():
    z = gaussian((N,), 1.0).numpy()
    assert z.dtype == np.float64
    se = 1 / N**0.5
    assert abs(z.mean()) < 5 * se  # 0.005
    assert abs(z.std() - 1) < 5 * se / 2**0.5  # the std's standard error is 1 / sqrt(2N)
    assert abs((np.abs(z) > 1.959964).mean() - 0.05) < 5 * (0.05 * 0.95 / N) ** 0.5  # the tails' mass
    assert stats.kstest(z, "norm").pvalue > 1e-4  # the whole CDF, not just two moments
    assert np.abs(z).max() < 8.3  # the inverse CDF of 53-bit uniforms reaches ~8.3 at most
    scaled = gaussian((1000, 1000), 3.0, torch.float32)
    assert scaled.shape == (1000, 1000) and scaled.dtype == torch.float32
    assert abs(float(scaled.double().std()) - 3.0) < 5 * 3.0 / (2 * N) ** 0.5
    assert not gaussian((4, 5), 0.0).any()


def _first_values(out) -> None:
    out.put((os.getpid(), gaussian((1000,), 1.0).tolist()))


@pytest.mark.subprocess
@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_two_processes_never_share_a_stream(method):
    """Two processes draw their first 1,000 values each: no value in common (a forked child would
    share its parent's torch generator state; the CSPRNG keeps none in the process)."""
    ctx = multiprocessing.get_context(method)
    out = ctx.Queue()
    procs = [ctx.Process(target=_first_values, args=(out,)) for _ in range(2)]
    for p in procs:
        p.start()
    (pid_a, a), (pid_b, b) = out.get(timeout=120), out.get(timeout=120)
    for p in procs:
        p.join(timeout=60)
    assert pid_a != pid_b and os.getpid() not in (pid_a, pid_b)
    assert len(set(a)) == len(set(b)) == 1000
    assert not set(a) & set(b)


def test_a_dp_step_on_zero_gradients_moves_a_parameter_by_the_accounted_noise():
    """Opacus' step: (summed clipped gradients + N(0, (sigma C)^2)) / expected batch, times lr.
    With zero inputs every per-sample gradient is 0, so the move is the noise alone."""
    lr, sigma, clip, expected = 0.5, 1.3, 0.7, 10.0
    layer = torch.nn.Linear(200, 100, bias=False)
    torch.nn.init.zeros_(layer.weight)
    model = torch.nn.Sequential(layer)
    data = TensorDataset(torch.zeros(40, 200), torch.zeros(40, dtype=torch.long))
    gsm, opt, _ = wrap_private(
        model,
        torch.optim.SGD(model.parameters(), lr=lr),
        data,
        sample_rate=0.25,
        noise_multiplier=sigma,
        max_grad_norm=clip,
        expected_batch=expected,
    )
    assert isinstance(opt, SecureNoiseDPOptimizer) and opt.generator is None  # the site's default path

    def step() -> torch.Tensor:
        before = layer.weight.detach().clone()
        torch.manual_seed(0)  # the global RNG, seeded alike before each step
        state = torch.get_rng_state()
        gsm(torch.zeros(8, 200)).sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        assert torch.equal(torch.get_rng_state(), state)  # the noise took nothing from torch's RNG
        return (layer.weight.detach() - before).flatten().double()

    first, second = step(), step()
    std = lr * sigma * clip / expected
    for move in (first, second):  # 20,000 coordinates: the std's standard error is 0.5%
        assert abs(float(move.std()) / std - 1) < 0.03
        assert abs(float(move.mean())) < 5 * std / len(move) ** 0.5
    assert not torch.equal(first, second)


def test_the_class_sums_release_draws_from_the_csprng():
    labels, hidden, sigma, declared = 20, 500, 2.0, 4.0
    x = torch.nn.functional.normalize(torch.randn(300, hidden), dim=-1)
    data = TensorDataset(x, torch.arange(300) % labels)
    exact = unit_contributions(data, labels).sum(0).double() / declared
    releases = []
    for _ in range(2):
        torch.manual_seed(0)
        state = torch.get_rng_state()
        releases.append(noisy_class_sums(data, labels, sigma, declared))
        assert torch.equal(torch.get_rng_state(), state)
    for released in releases:
        assert released.dtype == torch.float32
        noise = (released.double() - exact) * declared  # 10,000 values of std sigma
        assert abs(float(noise.std()) / sigma - 1) < 0.04
    assert not torch.equal(releases[0], releases[1])


def test_the_noised_evaluation_counts_draw_from_the_csprng():
    counts = ClassCounts([10] * 50, [3] * 50, [2] * 50)
    draws = []
    for _ in range(2):
        torch.manual_seed(0)
        state = torch.get_rng_state()
        draws.append(noised_counts(counts, 2.0))
        assert torch.equal(torch.get_rng_state(), state)
    assert draws[0] != draws[1]
    noise = np.array([v - 10 for d in draws for v in d["tp"]] + [v - 3 for d in draws for v in d["fp"]])
    assert abs(noise.std() / (2.0 * EVAL_COUNT_SENSITIVITY) - 1) < 0.2  # 200 values: a sanity bound
