"""The residual channels (common/channels.py): docs/privacy.md's table is the code's, every refusal
category is counted, and the export's model card states delta, the DP unit and each channel."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from fedprompt.common.channels import (
    CHANNELS,
    STATUS_BITS,
    TIMING_BITS,
    bits_per_run,
    grid_point,
    grid_points,
    table_rows,
)
from fedprompt.common.model import PromptConfig
from fedprompt.common.wire import REFUSAL_CATEGORIES
from fedprompt.server.export import export_model

PRIVACY_MD = Path(__file__).resolve().parent.parent / "docs" / "privacy.md"


def test_docs_privacy_lists_every_channel_with_the_codes_bound():
    text = PRIVACY_MD.read_text()
    for row in table_rows():
        assert row in text, f"docs/privacy.md lacks (or has another version of) the row:\n{row}"
    assert f"{bits_per_run(2):.1f} bits" in text  # the default run: its pre-flight and one train message


def test_the_bounds_follow_the_code():
    assert STATUS_BITS == math.log2(len(REFUSAL_CATEGORIES) + 1)
    # defaults: replies held to 2, 4, ..., 512 s or the deadline (600 s round timeout): 10 times
    assert grid_points(2.0, 600.0) == 10 and TIMING_BITS == pytest.approx(math.log2(10))
    assert [grid_point(e, 2.0) for e in (0.0, 1.9, 2.0, 2.1, 7.0, 9.0)] == [2.0, 2.0, 2.0, 4.0, 8.0, 16.0]
    assert grid_point(9.0, 2.0, limit=12.0) == 12.0  # the deadline comes first
    assert grid_point(13.0, 2.0, limit=12.0) == 13.0  # past it: at once (the executor has refused by then)
    assert grid_point(0.37, 0.0) == 0.37  # no grid
    assert grid_points(60.0, 590.0) == 5  # 60, 120, 240, 480 and the deadline
    with pytest.raises(ValueError):
        grid_points(0.0, 590.0)
    assert bits_per_run(2) == pytest.approx(2 * (math.log2(10) + math.log2(len(REFUSAL_CATEGORIES) + 1)))
    assert bits_per_run(2, declared=False) == pytest.approx(bits_per_run(2) + math.log2(81))


def _card(tmp_path: Path, private: bool, history: list[dict]) -> str:
    prompt = PromptConfig(
        labels=["a", "b"],
        hidden_size=4,
        backbone_fingerprint="f" * 64,
        n_virtual_tokens=2,
        prompt_layer=0,
        private=private,
    )
    state = {k: torch.zeros(*s) for k, s in prompt.shapes().items()}
    return (export_model(tmp_path, prompt, state, history, "r") / "MODEL_CARD.md").read_text()


def test_the_model_card_states_delta_the_dp_unit_and_the_residual_channels(tmp_path):
    history = [
        {"round": 0, "test": None, "evaluate": None, "hospitals": {}},
        {
            "round": 1,
            "test": None,
            "evaluate": None,
            "hospitals": {
                "h1": {"epsilon_spent": 2.0, "delta": 1e-5},
                "h2": {"epsilon_spent": 1.5, "delta": 2e-6},
                "h3": {"status": "refused"},
            },
        },
    ]
    card = _card(tmp_path, True, history)
    assert "Epsilon spent per hospital (cumulative): h1 2.000, h2 1.500" in card
    assert "Delta per hospital (its ledger's): h1 1e-05, h2 2e-06" in card
    assert "DP unit: one record" in card and "one patient" in card and "patient_field" in card
    for channel in CHANNELS:
        assert f"  - {channel.name}: {channel.bound}" in card
    # a history from before replies' deltas were kept: said, never guessed
    assert "Delta per hospital (its ledger's): not reported" in _card(tmp_path, True, history[:1])


def test_a_non_private_card_says_so_and_claims_nothing(tmp_path):
    card = _card(tmp_path, False, [])
    assert "NON-PRIVATE" in card and "Delta per hospital" not in card and "DP unit" not in card
