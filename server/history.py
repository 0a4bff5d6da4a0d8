"""The run's history as the aggregator writes it (checkpoint/state.json, metrics.json) and reads it back.

One model per file, used by the writer (nothing is written that does not validate) and by every
reader (a resume, `fedprompt aggregator run`, the simulation), so the two cannot drift apart.
Kept free of heavy imports: the operator's CLI reads these files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Final, Literal

from pydantic import BeforeValidator, ConfigDict, Field, ValidationError
from pydantic.dataclasses import dataclass

from fedprompt.common.config import StrategyName
from fedprompt.common.errors import InputError
from fedprompt.common.schema import NonEmptyStr, Schema, Sha256, issues

from .outcome import Outcome

CHECKPOINT_FORMAT: Final = "fedprompt-checkpoint/1"
# Scores are the run's facts: a NaN loss (nothing to evaluate) or an infinite epsilon (a site that
# trained without DP) is information, kept as it is.
_FACTS = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=True)
NonNegativeInt = Annotated[int, Field(ge=0)]


@dataclass(config=_FACTS)
class HospitalOutcome:
    """What became of one hospital's reply in one round (server/strategy.py judges it)."""

    status: Literal["ok", "refused", "rejected", "failed"]
    reason: str = ""  # refused: the site's category (common/wire.REFUSAL_CATEGORIES); else the aggregator's own words
    weight: float = 0.0  # the FedAvg weight the site declared (its site.yaml `weight`), not a record count
    epsilon_spent: float | None = None
    epsilon_cap: float | None = None
    delta: float | None = None  # the delta the site's ledger accounts at (its epsilon's delta)
    # the hash of the last entry of the site's privacy ledger after this round: public, the rollback witness
    ledger_head: Sha256 | None = None
    upload_bytes: NonNegativeInt = 0


@dataclass(config=_FACTS)
class PreflightAnswer:
    """One hospital's answer to the run's pre-flight (server/federation.py): will it train the whole run?"""

    status: Literal["ok", "refused", "rejected", "failed"]
    reason: str = ""  # refused: the site's category (common/wire.REFUSAL_CATEGORIES); else the aggregator's own words


def _outcome(value: Any) -> Any:
    # A strict model takes only instances of a dataclass; a file gives mappings, validated by its constructor.
    return HospitalOutcome(**value) if isinstance(value, dict) else value


def _answer(value: Any) -> Any:
    return PreflightAnswer(**value) if isinstance(value, dict) else value


class HeldOutScores(Schema):
    """The aggregator's own evaluation on its held-out test set."""

    model_config = _FACTS
    accuracy: float
    macro_f1: float
    loss: float
    num_examples: NonNegativeInt


class SharedEvaluation(Schema):
    """The sum of the noised per-class counts the sites that share them sent (server/strategy.py)."""

    model_config = _FACTS
    accuracy: float
    macro_f1: float
    loss: None = None  # no site sends a loss
    num_examples: NonNegativeInt
    noised: Literal[True]
    hospitals: Annotated[int, Field(ge=1)]
    model_round: NonNegativeInt  # the global model the sites validated


class RoundRecord(Schema):
    """One round of metrics.json's "rounds" (and of the checkpoint's history)."""

    model_config = _FACTS
    round: NonNegativeInt
    seconds: Annotated[float, Field(ge=0)]
    evaluate: SharedEvaluation | None  # null unless some site shares noised counts
    test: HeldOutScores | None  # null without a held-out test set
    hospitals: dict[str, Annotated[HospitalOutcome, BeforeValidator(_outcome)]]
    upload_bytes: NonNegativeInt
    # Absent from records written before they existed: a record is read back as it was written
    # (`exclude_unset`), so that server/outcome.py can tell such a record apart.
    aggregate_seconds: float | None = None
    aggregate_cpu_seconds: float | None = None
    aggregated: bool | None = None  # did the round change the global model (>= min_hospitals valid updates)?
    timing: dict[str, float] = {}  # wall-clock (epoch) phase boundaries of the round
    # hospital -> the category it refused this round with, after it confirmed the run in pre-flight
    refused_after_preflight: dict[str, NonEmptyStr] = {}


class Preflight(Schema):
    """The pre-flight of this invocation (a resumed run asks again): each hospital asked, its answer.
    The run starts only when at least `min_hospitals` confirm; the others are sent no train message."""

    model_config = _FACTS
    round: Annotated[int, Field(ge=1)]  # the first round asked about; the run's last is the plan's
    min_hospitals: Annotated[int, Field(ge=1)]
    confirmed: NonNegativeInt
    hospitals: dict[str, Annotated[PreflightAnswer, BeforeValidator(_answer)]]


class RunMetrics(Schema):
    """metrics.json: the run's history and how it ended (server/outcome.py)."""

    model_config = _FACTS
    run: NonEmptyStr
    outcome: Outcome
    outcome_reason: str | None
    private: bool
    strategy: StrategyName
    backbone_fingerprint: Sha256
    labels: list[NonEmptyStr]
    rounds: list[RoundRecord]
    export: str | None
    preflight: Preflight | None = None  # absent from runs written before the pre-flight existed


class CheckpointState(Schema):
    """checkpoint/state.json, the checkpoint's commit point (server/checkpoint.py)."""

    model_config = _FACTS
    format: Literal["fedprompt-checkpoint/1"]  # CHECKPOINT_FORMAT
    run: NonEmptyStr
    round: NonNegativeInt
    # a file beside it, never a path elsewhere
    tensors: Annotated[str, Field(pattern=r"^global-r[0-9]{4,}\.safetensors$")]
    backbone_fingerprint: Sha256
    history: list[RoundRecord]


def _read(model: type[Schema], path: Path, what: str) -> Any:
    try:
        doc = json.loads(path.read_bytes().decode("utf-8"))
        return model.model_validate(doc)
    except ValidationError as exc:
        detail = "; ".join(f"{key}: {message}" if key else message for key, message in issues(model, exc))
        raise InputError.at(path, f"unreadable {what}: {detail}") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InputError.at(path, f"unreadable {what}: {type(exc).__name__}: {exc}") from None


def read_checkpoint_state(path: Path) -> CheckpointState:
    return _read(CheckpointState, path, "checkpoint")


def read_metrics(path: Path) -> dict:
    """metrics.json, validated; as plain data (the report's and the API's input)."""
    return _read(RunMetrics, path, "metrics").model_dump(exclude_unset=True)
