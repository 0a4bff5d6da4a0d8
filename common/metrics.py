"""Classification metrics from per-class counts, so sites can share counts and the aggregator
can compute the federation's exact accuracy and macro-F1 (not an average of site F1s)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

if TYPE_CHECKING:
    from .model import PromptClassifier


@dataclass
class ClassCounts:
    # Counts per class: integers at a site, floats once noised (the aggregator sums noised counts).
    tp: list[float]
    fp: list[float]
    fn: list[float]
    loss_sum: float = 0.0

    @classmethod
    def zeros(cls, num_labels: int) -> ClassCounts:
        return cls([0] * num_labels, [0] * num_labels, [0] * num_labels)

    @classmethod
    def from_predictions(
        cls, preds: torch.Tensor, labels: torch.Tensor, num_labels: int, loss_sum: float = 0.0
    ) -> ClassCounts:
        c = cls.zeros(num_labels)
        for k in range(num_labels):
            p, t = preds == k, labels == k
            c.tp[k] = int((p & t).sum())
            c.fp[k] = int((p & ~t).sum())
            c.fn[k] = int((~p & t).sum())
        c.loss_sum = float(loss_sum)
        return c

    def __add__(self, other: ClassCounts) -> ClassCounts:
        return ClassCounts(
            [a + b for a, b in zip(self.tp, other.tp, strict=True)],
            [a + b for a, b in zip(self.fp, other.fp, strict=True)],
            [a + b for a, b in zip(self.fn, other.fn, strict=True)],
            self.loss_sum + other.loss_sum,
        )

    @property
    def support(self) -> list[float]:
        return [t + f for t, f in zip(self.tp, self.fn, strict=True)]

    @property
    def n(self) -> float:
        return sum(self.support)

    def summary(self) -> dict:
        n = self.n
        f1 = []
        for tp, fp, fn in zip(self.tp, self.fp, self.fn, strict=True):
            denom = 2 * tp + fp + fn
            f1.append(2 * tp / denom if denom else 0.0)
        present = [f for f, s in zip(f1, self.support, strict=True) if s > 0] or [0.0]
        return {
            "num_examples": n,
            "loss": self.loss_sum / n if n else float("nan"),
            "accuracy": sum(self.tp) / n if n else float("nan"),
            # macro over classes present in the evaluated labels
            "macro_f1": sum(present) / len(present),
            "f1_per_class": f1,
            "support": self.support,
        }


@torch.no_grad()
def evaluate(
    model: PromptClassifier,
    dataset: TensorDataset,
    num_labels: int,
    device: torch.device | str = "cpu",
    batch_size: int = 64,
) -> ClassCounts:
    """Loss (summed cross-entropy) and per-class counts of a PromptClassifier on encoded records.

    The encoder runs once per record and prompt (common/features.cached_features); the head,
    applied to those features, gives exactly the model's logits.
    """
    from .features import cached_features

    feats = cached_features(model, dataset, device)
    return evaluate_head(model.head, feats, num_labels, device, batch_size=max(batch_size, 4096))


@torch.no_grad()
def evaluate_head(
    head: torch.nn.Module,
    features: Dataset,
    num_labels: int,
    device: torch.device | str = "cpu",
    batch_size: int = 4096,
) -> ClassCounts:
    """Loss and per-class counts of a head on (features, labels)."""
    was_training = head.training
    head.eval()
    counts = ClassCounts.zeros(num_labels)
    for x, labels in DataLoader(features, batch_size=batch_size):
        logits = head(x.to(device)).float()
        labels = labels.to(device)
        loss = torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        counts = counts + ClassCounts.from_predictions(logits.argmax(-1).cpu(), labels.cpu(), num_labels, loss)
    head.train(was_training)
    return counts
