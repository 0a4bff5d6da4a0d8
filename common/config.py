"""The two configuration files and their schemas (common/schema.py: strict, closed, every field constrained).

`federation.yaml` belongs to the aggregator; `site.yaml` to one hospital. Site settings win
over federation requests (a site's epsilon cap bounds whatever the aggregator asks for).
Relative paths in a file are resolved against that file's folder.
The JSON Schemas in docs/schema/ are generated from these models (tests/test_schema.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import AfterValidator, Field, ValidationInfo, field_validator

from .schema import HOSPITAL_ID_PATTERN, ConfigFile, LocalPath, NonEmptyStr, Schema, Sha256, str_or

StrategyName = Literal["fedavg", "fedprox", "fedadam", "fedtrimmedavg", "fedmedian"]

# Constrained types shared with the round plan (common/plan.py), which carries these settings on the wire.
Positive = Annotated[float, Field(gt=0)]
NonNegative = Annotated[float, Field(ge=0)]
Delta = Annotated[float, Field(gt=0, lt=1)]
SampleRate = Annotated[float, Field(gt=0, le=1)]
NVirtualTokens = Annotated[int, Field(ge=1, le=256)]
MaxLength = Annotated[int, Field(ge=8, le=512)]
Seed = Annotated[int, Field(ge=0, le=2**63 - 1)]  # a ConfigRecord integer is 64-bit
Pooling = Literal["mean", "cls"]
PromptInit = Literal["vocab", "labels"]
Optimizer = Literal["adam", "sgd"]


def distinct_labels(labels: list) -> list:
    """Two labels with one name would be one class trained as two."""
    names = [x.name if isinstance(x, LabelSpec) else x for x in labels]
    dupes = sorted({x for x in names if names.count(x) > 1})
    if dupes:
        raise ValueError(f"duplicate label(s): {', '.join(dupes)}")
    return labels


class ModelSettings(Schema):
    n_virtual_tokens: NVirtualTokens = 4
    """Soft-prompt length. 4 label-word vectors: 20 measurably blurred the frozen features the private head
    learns on (BENCHMARKS.md "Choosing the private recipe"), and fewer values mean less noise if trained."""
    prompt_init: PromptInit = "labels"
    pooling: Pooling = "mean"
    max_length: MaxLength = 256
    """Tokens per record: all-MiniLM-L6-v2 was trained on 256; abstracts average ~250."""
    normalize: bool = True
    """A cosine-classifier head whose rows start as the label texts' normalised features x logit_scale,
    so that the model before round 1 is the zero-shot classifier (BENCHMARKS.md)."""
    head_init: Literal["prototypes", "random"] = "prototypes"
    logit_scale: Positive = 10.0
    seed: Seed = 0
    """Deterministic initial prompt and head: every site and the server agree on it."""
    backbone_fingerprint: Sha256 | None = None
    """Pin the federation to one backbone; null: the aggregator's own backbone at start."""


class TrainingSettings(Schema):
    """The private recipe (chosen on the public corpus, BENCHMARKS.md "Choosing the private recipe").

    Each site samples records with probability `sample_rate` per step (Poisson), so the expected
    batch grows with the site (q x n) and a round is `local_epochs / sample_rate` steps whatever
    the site's size; `batch_size`, if set, fixes the expected batch instead (q = batch_size / n).
    `train_prompt: false` trains the head on frozen features (the encoder runs once per record):
    under DP on a few thousand records the noise on 7,680 prompt values costs more than the
    prompt brings, while the head (5 x 384) learns well.
    """

    local_epochs: Annotated[int, Field(ge=1)] = 1
    sample_rate: SampleRate = 0.25
    batch_size: Annotated[int | None, Field(ge=1)] = None
    """The expected batch per step; null: sample_rate decides."""
    lr: Positive = 8.0
    optimizer: Optimizer = "sgd"
    train_prompt: bool = False


class PrivacyRequest(Schema):
    """What the aggregator asks of each site for this run (sites may grant less)."""

    private: bool = True
    target_epsilon: Positive = 8.0
    """Per site, for the whole run."""
    delta: Annotated[float | None, Field(gt=0, lt=1)] = None
    """null: each site uses its own delta."""
    max_grad_norm: Positive = 1.0


class StrategySettings(Schema):
    name: StrategyName = "fedavg"
    proximal_mu: NonNegative = 0.01
    """fedprox: the proximal term's weight."""
    trim_beta: Annotated[float, Field(gt=0, lt=0.5)] = 0.2
    """fedtrimmedavg: the fraction cut at each end."""
    server_lr: Positive = 0.1
    """fedadam: the server's learning rate."""
    update_norm_bound: Positive = 100.0
    """L2 norm of (update - global); larger replies are rejected."""


class LabelSpec(Schema):
    """A label with a public description: the description sharpens its zero-shot prototype."""

    name: NonEmptyStr
    description: str = ""

    @property
    def text(self) -> str:
        return f"{self.name}: {self.description}" if self.description else self.name


if TYPE_CHECKING:  # str_or builds the validating annotation at run time; a type checker sees its type
    Label = str | LabelSpec
else:
    Label = str_or(LabelSpec)


class FederationConfig(ConfigFile):
    name: NonEmptyStr
    labels: Annotated[list[Label], Field(min_length=2), AfterValidator(distinct_labels)]
    """The label space: names, or {name, description} mappings."""
    rounds: Annotated[int, Field(ge=1)] = 20
    min_hospitals: Annotated[int, Field(ge=1)] = 2
    round_timeout: Positive = 600.0
    """Seconds the aggregator waits for replies each round."""
    evaluation: Literal["in_train", "separate"] = "in_train"
    """"in_train": one message per round; each site validates the model it receives inside the train
    message (its log; noised counts in the reply if it shares them). "separate": an evaluate message
    after each round, as Flower's strategies send by default (one more round trip)."""
    strategy: StrategySettings = StrategySettings()
    model: ModelSettings = ModelSettings()
    training: TrainingSettings = TrainingSettings()
    privacy: PrivacyRequest = PrivacyRequest()

    @property
    def label_names(self) -> list[str]:
        return [x.name if isinstance(x, LabelSpec) else x for x in self.labels]

    @property
    def label_texts(self) -> list[str]:
        """What each label's zero-shot prototype is computed from."""
        return [x.text if isinstance(x, LabelSpec) else x for x in self.labels]


class PrivacyCap(Schema):
    """The hospital's own promise. The aggregator can ask for more privacy, never less."""

    max_epsilon: Positive
    delta: Delta
    min_noise_multiplier: NonNegative = 0.0
    accountant: Literal["prv", "rdp"] = "prv"


class SiteConfig(ConfigFile):
    hospital_id: Annotated[str, Field(pattern=HOSPITAL_ID_PATTERN)]
    train: LocalPath
    privacy: PrivacyCap
    ledger: LocalPath
    ledger_anchor: LocalPath | None = None
    """Rollback detection: the ledger's head hash and entry count, rewritten after every ledger write;
    best on another volume than the ledger. null: `<ledger>.anchor`, beside it (client/ledger.py)."""
    validation: LocalPath | None = None
    test: LocalPath | None = None
    """The site's own held-out records (personalisation's local test split)."""
    text_field: NonEmptyStr = "text"
    label_field: NonEmptyStr = "label"
    patient_field: NonEmptyStr | None = None
    """Patient-level DP: the records' column/field naming the patient. Set, the patient (all of its
    records together) is the sampling and clipping unit, and the ledger's epsilon protects a whole
    patient; null: each record is the unit (docs/deployment.md section 4)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    backbone: LocalPath | None = None
    """null: the embedded default backbone."""
    max_physical_batch_size: Annotated[int, Field(ge=1)] = 32
    allow_non_private: bool = False
    """May the aggregator run this site without DP (reference runs)?"""
    weight: Annotated[float, Field(gt=0, le=1e9)] = 1.0
    """The FedAvg weight this site declares (sent as `num-examples`): a constant the site chooses, never
    read from its records. 1.0 everywhere = equal weights. Workspaces written by fedprompt declare the
    training-set size rounded to 1 significant digit (client/workspace.declared_weight): weighting by
    size is worth 2 points of macro-F1 on the benchmark (BENCHMARKS.md), and a hospital's approximate
    size is a fact about the hospital, not about a patient (docs/deployment.md 5)."""
    share_evaluation: Literal["none", "noised"] = "none"
    """Validation results: "none" = computed and logged at the site only, nothing sent (default);
    "noised" = per-class counts with Gaussian noise sent, each evaluation charged `evaluation_epsilon`
    to the privacy ledger (on top of training: leave room under max_epsilon)."""
    evaluation_epsilon: Positive = 0.1
    trusted_apps: list[Sha256] = []
    """App bundles this site accepts besides the code-free one naming the installed fedprompt: sha256
    hex digests of bundles the site has reviewed. Even for these, the installed code is what runs
    (client/bundle.py); anything else is refused as "untrusted app"."""

    # Checks across fields, as field validators (not model validators) so that a problem names its
    # field and line; the fields they compare with are declared above them.
    @field_validator("ledger_anchor")
    @classmethod
    def _anchor_is_not_the_ledger(cls, anchor, info: ValidationInfo):
        if anchor is not None and anchor == info.data.get("ledger"):
            raise ValueError(f"must not be the ledger itself ({anchor})")
        return anchor

    @field_validator("evaluation_epsilon")
    @classmethod
    def _evaluation_within_cap(cls, epsilon: float, info: ValidationInfo) -> float:
        cap = info.data.get("privacy")
        if info.data.get("share_evaluation") == "noised" and cap is not None and epsilon > cap.max_epsilon:
            raise ValueError(f"{epsilon} is above privacy.max_epsilon {cap.max_epsilon}")
        return epsilon


# docs/schema/: the files' JSON Schemas, for editors (`# yaml-language-server: $schema=...`). Rewrite
# them after changing a model: python -m fedprompt.common.config docs/schema
SCHEMA_FILES: dict[str, type[Schema]] = {"site.schema.json": SiteConfig, "federation.schema.json": FederationConfig}


def json_schemas() -> dict[str, str]:
    """Each published schema file's name and text, generated from its model."""
    return {
        name: json.dumps(
            {"$schema": "https://json-schema.org/draft/2020-12/schema", **model.model_json_schema()},
            indent=2,
            ensure_ascii=False,
        )
        + "\n"
        for name, model in SCHEMA_FILES.items()
    }


if __name__ == "__main__":
    for name, text in json_schemas().items():
        (Path(sys.argv[1]) / name).write_text(text, encoding="utf-8")
