"""Local training at one hospital: DP-SGD (default) or a labelled non-private mode.

One loop serves every recipe: the head alone on frozen-feature batches, a late prompt and the head on
cached layer states, or the whole PromptClassifier on token batches (input prompt + head). A batch is
`(*inputs, labels)`; the trainable parameters are the module's parameters that require grad (the
encoder is frozen).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass

import torch
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch.utils.data import DataLoader, Dataset, TensorDataset
from tqdm.auto import tqdm

from fedprompt.common.errors import InputError
from fedprompt.common.features import PAD_LABEL, cached_features, cached_layer_states, group_by_patient
from fedprompt.common.model import IndexedStateClassifier, PromptClassifier
from fedprompt.common.plan import RoundPlan
from fedprompt.common.schedule import Sampling, site_lr

from .dp import check_per_sample_shapes, entropy_generator, noise_only_step, wrap_private

HEAD_PHYSICAL_BATCH = 4096  # frozen features are a few KB a batch: no memory limit needed for the head
PATIENT_INPUT_PROMPT = (
    "patient-level DP with a trained prompt needs a late prompt (federation.yaml model.prompt_layer >= 1): "
    "the input prompt would run the whole encoder for every record of every drawn patient"
)


@dataclass
class TrainSettings:
    epochs: int = 1
    sample_rate: float = 0.25  # Poisson rate per step; a round is epochs x int(1 / sample_rate) steps
    # What the noisy gradient sum is divided by: a public constant (common/schedule.Sampling), never
    # the true q x n (that would reveal n through the noise scale). None: q x len(dataset), for
    # callers without a declared size (tests, the self-test).
    expected_batch: float | None = None
    lr: float = 0.01
    optimizer: str = "adam"
    max_physical_batch_size: int = 32
    # DP: None = non-private reference mode (labelled as such in every output)
    noise_multiplier: float | None = 1.0
    max_grad_norm: float = 1.0
    proximal_mu: float = 0.0  # FedProx: pull towards the round's starting (global) weights

    @property
    def private(self) -> bool:
        return self.noise_multiplier is not None

    @classmethod
    def from_plan(
        cls, plan: RoundPlan, sampling: Sampling, noise_multiplier: float | None, max_physical_batch_size: int
    ) -> TrainSettings:
        """A round's settings, all from the plan and the site's public sampling (one place)."""
        return cls(
            epochs=plan.local_epochs,
            sample_rate=sampling.sample_rate,
            expected_batch=sampling.expected_batch,
            lr=site_lr(plan, sampling, noise_multiplier),
            optimizer=plan.optimizer,
            max_physical_batch_size=max_physical_batch_size,
            noise_multiplier=noise_multiplier,
            max_grad_norm=plan.max_grad_norm,
            proximal_mu=plan.proximal_mu,
        )


@dataclass
class TrainResult:
    private: bool
    steps: int  # logical optimizer steps (the accountant's steps)
    sample_rate: float
    noise_multiplier: float | None
    mean_loss: float
    num_examples: int
    empty_batches: int
    seconds: float


def resolve_device(preference: str = "auto") -> torch.device:
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("device: cuda requested but no CUDA device is available")
        return torch.device("cuda")
    return torch.device("cpu")


def patient_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Patient-level loss on [patients, records, classes] logits (padding labelled PAD_LABEL): the
    SUM of each patient's records' cross-entropies, averaged over the patients of the batch.

    With Opacus's loss_reduction="mean" (backprops x batch of patients), each patient's per-sample
    gradient is then exactly the sum of its records' gradients; padding contributes zero.
    """
    return (
        torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), labels.flatten(), ignore_index=PAD_LABEL, reduction="sum"
        )
        / logits.shape[0]
    )


def _loss_for(dataset: Dataset):
    """Record-level cross-entropy on [B] labels; patient_loss on grouped [B, T] labels."""
    return patient_loss if torch.as_tensor(dataset[0][-1]).dim() == 1 else torch.nn.CrossEntropyLoss()


def _optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=lr) if name == "adam" else torch.optim.SGD(params, lr=lr)


class _Stats:
    def __init__(self) -> None:
        self.steps = self.empty = self.seen = 0
        self.loss_sum = 0.0

    def add(self, loss: torch.Tensor, n: int) -> None:
        self.loss_sum += loss.item() * n
        self.seen += n


def train(
    model: torch.nn.Module,
    dataset: TensorDataset,
    settings: TrainSettings,
    device: torch.device,
    *,
    progress: bool = False,
    progress_label: str = "",
    noise_generator: torch.Generator | None = None,
    sample_generator: torch.Generator | None = None,
) -> TrainResult:
    """Train `model`'s trainable parameters in place on `dataset` ((*inputs, labels) rows)."""
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer(settings.optimizer, params, settings.lr)
    q = settings.sample_rate
    planned = settings.epochs * int(1 / q)
    expected = settings.expected_batch or q * len(dataset)
    batch = max(1, round(expected))
    if not settings.private:
        planned = settings.epochs * math.ceil(len(dataset) / batch)
    label = progress_label or ("dp-sgd" if settings.private else "NON-PRIVATE")
    bar = tqdm(total=planned, desc=label, disable=not progress, leave=False, unit="step")
    stats, t0 = _Stats(), time.perf_counter()
    anchor = [p.detach().clone() for p in params]
    try:
        if settings.private:
            _train_private(
                model,
                optimizer,
                params,
                anchor,
                dataset,
                q,
                expected,
                settings,
                device,
                bar,
                stats,
                noise_generator,
                sample_generator,
            )
            if stats.steps != planned:
                raise RuntimeError(f"took {stats.steps} DP steps, planned (and accounted) {planned}")
        else:
            _train_non_private(
                model, optimizer, params, anchor, dataset, batch, settings, device, bar, stats, sample_generator
            )
    finally:
        bar.close()
    return TrainResult(
        private=settings.private,
        steps=stats.steps,
        sample_rate=q,
        noise_multiplier=settings.noise_multiplier,
        mean_loss=stats.loss_sum / max(stats.seen, 1),
        num_examples=len(dataset),
        empty_batches=stats.empty,
        seconds=time.perf_counter() - t0,
    )


def local_update(
    model: PromptClassifier,
    encoded: TensorDataset,
    plan: RoundPlan,
    sampling: Sampling,
    noise_multiplier: float | None,
    device: torch.device,
    *,
    max_physical_batch_size: int = 32,
    progress: bool = False,
    progress_label: str = "",
    noise_generator: torch.Generator | None = None,
    sample_generator: torch.Generator | None = None,
    patients: list[str] | None = None,
) -> TrainResult:
    """One site's training for one round, as the federation's plan says (trained_rows: the head on
    frozen features, a late prompt and the head on cached layer states, or the input prompt and the
    head on token batches). The hospital daemon and the benchmarks both train through here.
    `sampling`: the site's sample rate and public expected batch for this plan
    (common/schedule.sampling of its declared size).

    `patients` (each record's patient id, site.yaml: patient_field): patient-level DP. The rows are
    grouped by patient (group_by_patient), so the Poisson sample, the clipped unit and the expected
    batch are patients, and the result's num_examples and steps count patients' batches."""
    module, rows, physical = trained_rows(model, encoded, plan, device, patients, max_physical_batch_size)
    return train(
        module,
        rows,
        TrainSettings.from_plan(plan, sampling, noise_multiplier, physical),
        device,
        progress=progress,
        progress_label=progress_label,
        noise_generator=noise_generator,
        sample_generator=sample_generator,
    )


def trained_rows(
    model: PromptClassifier,
    encoded: TensorDataset,
    plan: RoundPlan,
    device: torch.device,
    patients: list[str] | None = None,
    max_records: int = 32,
) -> tuple[torch.nn.Module, TensorDataset, int]:
    """(what DP-SGD steps, the rows Poisson sampling draws, the largest physical batch in rows):
    `max_records` records through the encoder per physical batch (site.yaml max_physical_batch_size).

    The encoder below the prompt never sees a trainable tensor, so its output is computed once per
    record and cached: the head trains on frozen features; a late prompt (prompt_layer >= 1) on the
    states entering its layer, picked by index (model.IndexedStateClassifier); only the input prompt
    runs the whole encoder per step."""
    per_unit = 1
    if not plan.train_prompt:
        module: torch.nn.Module = model.head
        rows = cached_features(model, encoded, device)
    elif plan.prompt_layer > 0:
        states, mask, labels = cached_layer_states(model, encoded, device).tensors
        module = IndexedStateClassifier(model, states, mask)
        rows = TensorDataset(torch.arange(len(labels)), labels)
    elif patients is not None:
        raise InputError.at("site.yaml", PATIENT_INPUT_PROMPT, field="patient_field")
    else:
        module, rows = model, encoded
    if patients is not None:
        rows = group_by_patient(rows, list(patients), fill=-1 if plan.train_prompt else 0)
        per_unit = rows.tensors[1].shape[1]
    return module, rows, max(1, (max_records if plan.train_prompt else HEAD_PHYSICAL_BATCH) // per_unit)


def _proximal_term(params, anchor, mu: float) -> torch.Tensor:
    return 0.5 * mu * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True))


def _train_non_private(
    model,
    optimizer,
    params,
    anchor,
    dataset,
    batch: int,
    settings: TrainSettings,
    device,
    bar,
    stats: _Stats,
    generator,
) -> None:
    loss_fn = _loss_for(dataset)
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, generator=generator or entropy_generator())
    for _ in range(settings.epochs):
        for *inputs, labels in loader:
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(*(x.to(device) for x in inputs)), labels.to(device))
            objective = loss + _proximal_term(params, anchor, settings.proximal_mu) if settings.proximal_mu else loss
            objective.backward()
            optimizer.step()
            stats.add(loss, len(labels))
            stats.steps += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", privacy="NONE")


def _train_private(
    model,
    optimizer,
    params,
    anchor,
    dataset,
    q,
    expected_batch: float,
    settings: TrainSettings,
    device,
    bar,
    stats: _Stats,
    noise_gen,
    sample_gen,
) -> None:
    assert settings.noise_multiplier is not None  # called for private training only
    loss_fn = _loss_for(dataset)
    gsm, dp_opt, dp_loader = wrap_private(
        model,
        optimizer,
        dataset,
        sample_rate=q,
        expected_batch=expected_batch,
        noise_multiplier=settings.noise_multiplier,
        max_grad_norm=settings.max_grad_norm,
        noise_generator=noise_gen,
        sample_generator=sample_gen,
    )
    if settings.proximal_mu:
        # The proximal gradient depends on no record, so it is added after clipping and noise
        # (post-processing). Put into the loss instead, Opacus would silently drop it: it
        # never flows through a hooked layer, and only per-sample gradients are kept.
        def add_proximal(opt) -> None:
            for p, a in zip(params, anchor, strict=True):
                p.grad.add_(p.detach() - a, alpha=settings.proximal_mu)

        dp_opt.attach_step_hook(add_proximal)
    try:
        with (
            warnings.catch_warnings(),
            BatchMemoryManager(
                data_loader=dp_loader, max_physical_batch_size=settings.max_physical_batch_size, optimizer=dp_opt
            ) as loader,
        ):
            # The prompt's input (frozen embeddings) needs no grad, so torch notes that the full
            # backward hook fires on outputs only: that is exactly what the prompt sampler reads.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            for _ in range(settings.epochs):
                for *inputs, labels in loader:
                    if len(labels) == 0:  # Poisson sampling drew nobody: still a counted step
                        noise_only_step(dp_opt, params)
                        stats.steps, stats.empty = stats.steps + 1, stats.empty + 1
                        bar.update(1)
                        continue
                    loss = loss_fn(gsm(*(x.to(device) for x in inputs)), labels.to(device))
                    loss.backward()
                    check_per_sample_shapes(params, len(labels))
                    dp_opt.step()
                    if not dp_opt._is_last_step_skipped:  # the logical batch is complete
                        stats.steps += 1
                        bar.update(1)
                    dp_opt.zero_grad(set_to_none=True)
                    stats.add(loss, len(labels))
                    bar.set_postfix(loss=f"{loss.item():.3f}", sigma=f"{settings.noise_multiplier:.2f}")
    finally:
        gsm._close()  # remove hooks and grad_sample attributes: the next round wraps afresh
