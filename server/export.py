"""The run's deliverable: the global prompt as a model directory, with a short model card."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from fedprompt.common.channels import CHANNELS
from fedprompt.common.model import PromptConfig, save_prompt

DP_UNIT = (
    "DP unit: one record of a hospital's training file; one patient (all of its records together) at a hospital "
    "whose site.yaml sets `patient_field`. That is each hospital's own setting and is not reported to the "
    "aggregator: ask the hospitals which applies."
)


def _per_hospital(history: list[dict], key: str) -> dict[str, float]:
    """Each hospital's last reported value of `key` (its ledger's epsilon spent, its delta)."""
    return {h: o[key] for r in history for h, o in r.get("hospitals", {}).items() if o.get(key) is not None}


def privacy_statement(prompt: PromptConfig, eps: dict[str, float], history: list[dict]) -> str:
    """The card's privacy section: epsilon and delta per hospital, the DP unit, the residual channels."""
    if not prompt.private:
        return "**NON-PRIVATE**: trained WITHOUT differential privacy (reference run). Do not deploy on patient data."
    spent = ", ".join(f"{h} {e:.3f}" for h, e in sorted(eps.items())) or "none recorded"
    deltas = ", ".join(f"{h} {d:g}" for h, d in sorted(_per_hospital(history, "delta").items())) or "not reported"
    channels = "\n".join(f"  - {c.name}: {c.bound}" for c in CHANNELS)
    return f"""Trained with differential privacy at every hospital (the one-shot class-sums release, and DP-SGD in \
later rounds): each hospital's contribution is (epsilon, delta)-DP over that hospital's whole history (its own ledger).

- Epsilon spent per hospital (cumulative): {spent}
- Delta per hospital (its ledger's): {deltas}
- {DP_UNIT}
- Residual channels (what a hospital's replies said besides its DP releases; docs/privacy.md), at most, in bits \
about its private data:
{channels}"""


def export_model(
    directory: Path, prompt: PromptConfig, state: dict[str, torch.Tensor], history: list[dict], run: str
) -> Path:
    last = history[-1] if history else {}
    eps = _per_hospital(history, "epsilon_spent")
    extra = {"run": run, "rounds": last.get("round", 0), "epsilon_spent_per_hospital": eps}
    save_prompt(directory, replace(prompt, extra=extra), state)
    start = history[0] if history and history[0].get("round") == 0 else {}

    def scores(section: dict | None, what: str) -> str:
        return (
            f"accuracy {section['accuracy']:.4f}, macro-F1 {section['macro_f1']:.4f}" if section else f"none ({what})"
        )

    no_validation = "the hospitals validate locally and share nothing by default"
    card = f"""# fedprompt model: {run}

Soft prompt ({prompt.n_virtual_tokens} virtual tokens x {prompt.hidden_size}) + linear head over a frozen encoder.

- Labels: {", ".join(prompt.labels)}
- Backbone fingerprint: `{prompt.backbone_fingerprint}` (use exactly this backbone; `fedprompt predict` checks)
- Pooling: {prompt.pooling}; max length {prompt.max_length} tokens
- Rounds: {extra["rounds"]}
- Zero-shot start (round 0, aggregator's held-out test): {scores(start.get("test"), "no held-out test set")}
- Held-out test, last round: {scores(last.get("test"), "no held-out test set")}
- Federated validation, last round: {scores(last.get("evaluate"), no_validation)}

Privacy: {privacy_statement(prompt, eps, history)}

Intended use: decision support for coding clinical text into the labels above; not a diagnosis.
"""
    (directory / "MODEL_CARD.md").write_text(card, encoding="utf-8")
    return directory
