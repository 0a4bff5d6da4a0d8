"""The run's deliverable: the global prompt as a model directory, with a short model card."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from fedprompt.common.model import PromptConfig, save_prompt


def export_model(
    directory: Path, prompt: PromptConfig, state: dict[str, torch.Tensor], history: list[dict], run: str
) -> Path:
    last = history[-1] if history else {}
    eps = {
        h: o.get("epsilon_spent")
        for r in history
        for h, o in r.get("hospitals", {}).items()
        if o.get("epsilon_spent") is not None
    }
    extra = {"run": run, "rounds": last.get("round", 0), "epsilon_spent_per_hospital": eps}
    save_prompt(directory, replace(prompt, extra=extra), state)
    start = history[0] if history and history[0].get("round") == 0 else {}

    def scores(section: dict | None, what: str) -> str:
        return (
            f"accuracy {section['accuracy']:.4f}, macro-F1 {section['macro_f1']:.4f}" if section else f"none ({what})"
        )

    privacy = (
        "Trained with differential privacy at every hospital (the one-shot class-sums release, and DP-SGD in "
        "later rounds); epsilon spent per hospital (cumulative, that hospital's own ledger): "
        + (", ".join(f"{h} {e:.3f}" for h, e in sorted(eps.items())) or "none recorded")
        if prompt.private
        else "**NON-PRIVATE**: trained WITHOUT differential privacy (reference run). Do not deploy on patient data."
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

Privacy: {privacy}

Intended use: decision support for coding clinical text into the labels above; not a diagnosis.
"""
    (directory / "MODEL_CARD.md").write_text(card, encoding="utf-8")
    return directory
