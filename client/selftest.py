"""`fedprompt selftest`: proof, on this site's own hardware, that DP-SGD here is exact.

(a) per-sample gradients of prompt and head equal a one-example-at-a-time loop;
(b) one DP step with zero noise equals a manual clip-and-average;
(c) the batch-size guard fires on a parameter broadcast over the batch (PEFT's failure);
(d) the frozen backbone is bit-identical after DP training steps;
(e) the frozen features in the precision this device computes them (bf16 on CUDA, common/features.py)
    against float32: the head's input may differ by at most FEATURE_TOLERANCE.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

import torch
from opacus import GradSampleModule
from torch import nn
from torch.utils.data import TensorDataset

from fedprompt.common.backbone import Backbone
from fedprompt.common.encoding import encode
from fedprompt.common.features import extract_features, feature_dtype
from fedprompt.common.model import PromptClassifier, PromptConfig, build_model

from .dp import PerSampleGradientError, check_per_sample_shapes, wrap_private
from .trainer import TrainSettings, train

TOLERANCE = 1e-6  # fp32
FEATURE_TOLERANCE = 2e-2  # bf16 has 8 bits of mantissa: ~4e-3 relative per value on normalised features
TEXTS = [
    "Patient reports crushing chest pain radiating to the left arm; troponin elevated.",
    "Biopsy of the breast mass shows invasive ductal carcinoma, no nodal spread.",
    "Recurrent focal seizures; MRI shows a lesion in the left temporal lobe.",
    "Epigastric pain after meals, endoscopy reveals a gastric ulcer.",
    "Fever and fatigue for two weeks, no localizing signs, denies cough.",
    "Shortness of breath on exertion, ankle swelling, ejection fraction 30 percent.",
]
LABELS = ["cardio", "neoplasm", "nervous", "digestive", "general"]
TEXT_LABELS = [0, 1, 2, 3, 4, 0]


@dataclass
class Check:
    name: str
    passed: bool
    max_abs_diff: float | None
    detail: str = ""


def _model(backbone: Backbone, device: torch.device, n_virtual: int = 4, seed: int = 0) -> PromptClassifier:
    config = PromptConfig(
        labels=LABELS,
        hidden_size=backbone.hidden_size,
        backbone_fingerprint=backbone.fingerprint,
        n_virtual_tokens=n_virtual,
        max_length=48,
        seed=seed,
    )
    model = build_model(backbone, config).to(device)
    with torch.no_grad():  # a non-zero bias so every head gradient term is exercised
        model.head.bias.add_(torch.linspace(-0.5, 0.5, len(LABELS), device=device))
    return model


def _batch(backbone: Backbone, device: torch.device):
    ds = encode(backbone.tokenizer, TEXTS, TEXT_LABELS, max_length=48).dataset
    return [t.to(device) for t in ds.tensors]


def _loop_gradients(model: PromptClassifier, ids, mask, labels) -> dict[str, torch.Tensor]:
    """Reference: each example's gradient computed on its own."""
    params = model.trainable_parameters()
    rows: dict[str, list[torch.Tensor]] = {k: [] for k in params}
    for i in range(len(labels)):
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(ids[i : i + 1], mask[i : i + 1]), labels[i : i + 1]).backward()
        for k, p in params.items():
            assert p.grad is not None  # every trainable parameter takes part in the loss
            rows[k].append(p.grad.detach().clone())
    model.zero_grad(set_to_none=True)
    return {k: torch.stack(v) for k, v in rows.items()}


def check_per_sample_gradients(backbone: Backbone, device: torch.device) -> Check:
    model = _model(backbone, device)
    ids, mask, labels = _batch(backbone, device)
    reference = _loop_gradients(model, ids, mask, labels)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    try:
        nn.functional.cross_entropy(gsm(ids, mask), labels).backward()
        diff = max(
            (p.grad_sample - reference[k]).abs().max().item()  # type: ignore[attr-defined]  # Opacus' attribute
            for k, p in model.trainable_parameters().items()
        )
    finally:
        gsm._close()
    return Check("per_sample_gradients", diff <= TOLERANCE, diff, f"{len(labels)} examples, prompt + head")


def check_zero_noise_step(
    backbone: Backbone, device: torch.device, max_grad_norm: float = 0.05, lr: float = 1.0
) -> Check:
    model = _model(backbone, device)
    ids, mask, labels = _batch(backbone, device)
    params = model.trainable_parameters()
    before = {k: p.detach().clone() for k, p in params.items()}
    per_sample = _loop_gradients(model, ids, mask, labels)
    # Manual DP-SGD: clip each example's joint gradient to C, sum, divide by the batch size.
    squares = sum(g.flatten(1).pow(2).sum(1) for g in per_sample.values())
    assert isinstance(squares, torch.Tensor)
    norms = torch.sqrt(squares)
    factor = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    expected = {k: before[k] - lr * torch.einsum("i,i...->...", factor, g) / len(labels) for k, g in per_sample.items()}

    dataset = TensorDataset(ids.cpu(), mask.cpu(), labels.cpu())
    optimizer = torch.optim.SGD(list(params.values()), lr=lr)
    gsm, dp_opt, _ = wrap_private(
        model, optimizer, dataset, sample_rate=1.0, noise_multiplier=0.0, max_grad_norm=max_grad_norm
    )
    try:
        nn.functional.cross_entropy(gsm(ids, mask), labels).backward()
        check_per_sample_shapes(list(params.values()), len(labels))
        dp_opt.step()
    finally:
        gsm._close()
    diff = max((p.detach() - expected[k]).abs().max().item() for k, p in params.items())
    clipped = int((norms > max_grad_norm).sum())
    return Check(
        "zero_noise_dp_step", diff <= TOLERANCE, diff, f"{clipped}/{len(labels)} examples clipped at C={max_grad_norm}"
    )


class BroadcastPrompt(nn.Module):
    """What PEFT's prompt tuning does: compute the prompt once for a batch of one, repeat it."""

    def __init__(self, n_virtual: int, hidden: int):
        super().__init__()
        self.embedding = nn.Embedding(n_virtual, hidden)
        self.n_virtual = n_virtual

    def forward(self, word_embeddings: torch.Tensor) -> torch.Tensor:
        idx = torch.arange(self.n_virtual, device=word_embeddings.device).unsqueeze(0)
        prompt = self.embedding(idx).repeat(word_embeddings.shape[0], 1, 1)
        return torch.cat([prompt, word_embeddings], dim=1)


def check_broadcast_guard(backbone: Backbone, device: torch.device) -> Check:
    model = _model(backbone, device)
    prompt = BroadcastPrompt(model.config.n_virtual_tokens, model.config.hidden_size).to(device)
    model.prompt = prompt  # type: ignore[assignment]  # PEFT's broadcast prompt in place of the SoftPrompt
    model.head.requires_grad_(False)  # prompt-only, as in PEFT: the unguarded step succeeds silently
    ids, mask, labels = _batch(backbone, device)
    params = [prompt.embedding.weight]
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    try:
        nn.functional.cross_entropy(gsm(ids, mask), labels).backward()
        seen = tuple(params[0].grad_sample.shape)  # type: ignore[attr-defined]  # Opacus' attribute
        try:
            check_per_sample_shapes(params, len(labels))
        except PerSampleGradientError as exc:
            return Check("broadcast_guard", True, None, f"guard fired: {exc}")
        return Check("broadcast_guard", False, None, f"guard did NOT fire (grad_sample {seen}, batch {len(labels)})")
    finally:
        gsm._close()


def check_backbone_frozen(backbone: Backbone, device: torch.device) -> Check:
    model = _model(backbone, device)
    before = {k: v.detach().clone() for k, v in model.encoder.state_dict().items()}
    ids, mask, labels = _batch(backbone, device)
    dataset = TensorDataset(ids.cpu(), mask.cpu(), labels.cpu())
    settings = TrainSettings(
        epochs=2, sample_rate=0.5, lr=0.1, noise_multiplier=1.0, max_grad_norm=1.0, max_physical_batch_size=2
    )
    result = train(model, dataset, settings, device)
    after = model.encoder.state_dict()
    diff = max((after[k] - v).abs().max().item() for k, v in before.items())
    same = diff == 0.0 and all(not p.requires_grad for p in model.encoder.parameters())
    return Check("backbone_bit_identical", same, diff, f"after {result.steps} DP steps")


def check_feature_precision(backbone: Backbone, device: torch.device) -> Check:
    dtype = feature_dtype(device)
    model = _model(backbone, device)
    ids, mask, labels = _batch(backbone, device)
    dataset = TensorDataset(ids.cpu(), mask.cpu(), labels.cpu())
    reduced = extract_features(model, dataset, device, dtype=dtype).tensors[0]
    full = extract_features(model, dataset, device, dtype=torch.float32).tensors[0]
    diff = (reduced - full).abs().max().item()
    return Check(
        "feature_precision",
        diff <= FEATURE_TOLERANCE,
        diff,
        f"encoder forward in {str(dtype).removeprefix('torch.')} vs float32",
    )


def run_selftest(backbone: Backbone, device: torch.device) -> dict:
    checks = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        for fn in (
            check_per_sample_gradients,
            check_zero_noise_step,
            check_broadcast_guard,
            check_backbone_frozen,
            check_feature_precision,
        ):
            try:
                checks.append(fn(backbone, device))
            except Exception as exc:  # a crash is a failed check, reported like the others
                checks.append(
                    Check(fn.__name__.removeprefix("check_"), False, None, f"error: {type(exc).__name__}: {exc}")
                )
    return {
        "checks": [asdict(c) for c in checks],
        "passed": all(c.passed for c in checks),
        "device": str(device),
        "dtype": str(feature_dtype(device)).removeprefix("torch."),
        "backbone": backbone.fingerprint,
    }
