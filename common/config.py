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
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .schema import HOSPITAL_ID_PATTERN, ConfigFile, LocalPath, NonEmptyStr, Schema, Sha256, str_or

# Constrained types shared with the round plan (common/plan.py), which carries these settings on the wire.
Positive = Annotated[float, Field(gt=0)]
NonNegative = Annotated[float, Field(ge=0)]
Delta = Annotated[float, Field(gt=0, lt=1)]
SampleRate = Annotated[float, Field(gt=0, le=1)]
NVirtualTokens = Annotated[int, Field(ge=1, le=256)]
PromptLayer = Annotated[int, Field(ge=-1, le=255)]  # common/model.py NO_PROMPT; the backbone bounds it further
MaxLength = Annotated[int, Field(ge=8, le=512)]
Seed = Annotated[int, Field(ge=0, le=2**63 - 1)]  # a ConfigRecord integer is 64-bit
Pooling = Literal["mean", "cls"]
PromptInit = Literal["vocab", "labels"]
PromptStyle = Literal["tokens", "prefix"]
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
    prompt_layer: PromptLayer | None = None
    """Where the prompt enters the encoder: null before its last layer (the cheapest late prompt: one layer
    runs per step); 0 at the input; k (1..layers-1) before layer k (a late prompt: the layers below run
    once per record, cached); -1 nowhere (the record path is the plain encoder). A run that does not train
    the prompt (`training.train_prompt`) uses -1 whatever this says: an untrained prompt only blurs the
    frozen features."""
    prompt_style: PromptStyle = "prefix"
    """A late prompt's form (common/model.py): "prefix", keys and values layer k attends to in a softmax of
    their own, starting near zero so that round 0 is the zero-shot classifier; or "tokens", virtual tokens
    concatenated to the states entering layer k."""
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
    """The private recipe, chosen on six regimes of the public corpus (BENCHMARKS.md "regimes").

    Round 1 is the one-shot class-sums release (class_sums_share, label_prior). DP-SGD rounds, if
    the run has more: each site samples at the public rate of common/schedule.sampling
    (sample_rate, raised to an expected batch of min_expected_batch, from its declared size);
    `batch_size`, if set, fixes the expected batch instead (q = batch_size / declared size).
    `train_prompt: false` trains the head on frozen features (the encoder runs once per record)
    and keeps the prompt off the record path.
    """

    local_epochs: Annotated[int, Field(ge=1)] = 1
    sample_rate: SampleRate = 0.25
    min_expected_batch: Annotated[int, Field(ge=1)] = 64
    """A site's sample rate is raised until its expected batch (q x its declared size) reaches this, up to
    full batch: a small site's noise would otherwise swamp its signal (common/schedule.py)."""
    batch_size: Annotated[int | None, Field(ge=1)] = None
    """The expected batch per step; null: sample_rate decides."""
    lr: Positive = 8.0
    optimizer: Optimizer = "sgd"
    train_prompt: bool | Literal["auto"] = "auto"
    """Train the soft prompt (with the head) in the DP-SGD rounds: true, false, or "auto": decided from the
    plan (common/schedule.prompt_decision: rounds, budget, the noise a prompt step would carry), and said
    by `fedprompt plan`. A prompt the run does not train stays off the record path."""
    class_sums_share: Annotated[float, Field(ge=0, lt=1)] = 0.75
    """Round 1 releases each site's per-class feature sums once (Gaussian), and the head is built from the
    noisy class means; in a run of more than one round this share of each site's epsilon goes to that
    release, the rest to DP-SGD rounds (a one-round run spends it all on the release). 0: no release,
    DP-SGD from the zero-shot head."""
    label_prior: NonNegative = 60.0
    """k in the label embedding's weight beside the class sums when the head is built from them:
    k x sigma x sqrt(sites) records' worth, about 3x the noise norm of a class's summed rows, so that a
    class the noise swamps (or few sites hold) falls back to its zero-shot prototype. 30 was as good at
    epsilon 4-8 but let epsilon 1 fall below the zero-shot start on small sites (BENCHMARKS.md)."""
    noise_lr_ref: Positive = 0.01
    """DP-SGD's learning rate follows the noise: a site whose noise per expected-batch example
    (sigma / expected batch) exceeds this takes lr x noise_lr_ref / that, so a noisy site's steps stay as
    large in noise as a quiet one's (at epsilon 1 a fixed lr fell below the zero-shot start)."""
    max_noise_ratio: Positive = 4.0
    """A site whose update's noise bound exceeds this many times its signal bound refuses the run before
    spending ("too few records"); the aggregator's bound on an honest update follows from it."""


class PrivacyRequest(Schema):
    """What the aggregator asks of each site for this run (sites may grant less)."""

    private: bool = True
    target_epsilon: Positive = 8.0
    """Per site, for the whole run."""
    delta: Annotated[float | None, Field(gt=0, lt=1)] = None
    """null: each site uses its own delta."""
    max_grad_norm: Positive = 1.0


# --- strategies: one settings model per strategy, chosen by `name` (server/strategies/ builds each) ----

StrategyName = Literal["fedavg", "fedprox", "fedadam", "fedtrimmedavg", "fedmedian", "krum", "multikrum", "bulyan"]

# Earlier releases had one flat strategy block, and every federation.yaml fedprompt wrote holds all of
# it: a strategy accepts another's parameter at that old default (it never had an effect) and drops it.
_FLAT_DEFAULTS = {"proximal_mu": 0.01, "trim_beta": 0.2, "server_lr": 0.1}


def _flat_defaults_in_schema(schema: dict[str, Any], model: type) -> None:
    """The published JSON Schema accepts those old keys as the loader does: at their old value only."""
    fields = getattr(model, "model_fields", {})
    schema["properties"].update(
        {key: {"const": value, "deprecated": True} for key, value in _FLAT_DEFAULTS.items() if key not in fields}
    )


class StrategyBase(Schema):
    """What every strategy's settings hold: its name and the guard's norm bound (server/strategy.py)."""

    model_config = ConfigDict(json_schema_extra=_flat_defaults_in_schema)

    name: str
    update_norm_bound: Annotated[float | None, Field(gt=0)] = None
    """L2 norm of (update - global) above which a reply is rejected. null (recommended): derived each round
    from the plan and the site's declared size (common/schedule.update_bound), so that no honest DP
    update is rejected; a number must be at least that derived bound, or the run is refused at start."""

    @model_validator(mode="before")
    @classmethod
    def _drop_flat_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        return {k: v for k, v in data.items() if k in cls.model_fields or _FLAT_DEFAULTS.get(k, ...) != v}

    def least_hospitals(self) -> tuple[int, str]:
        """The fewest updates the rule needs in every aggregated round, and why (the rule's condition)."""
        return 1, "one update"


class FedAvgSettings(StrategyBase):
    """The weighted mean of the updates (weights: the sites' declared sizes)."""

    name: Literal["fedavg"] = "fedavg"


class FedProxSettings(StrategyBase):
    """FedAvg, with a proximal term in each site's local objective."""

    name: Literal["fedprox"]
    proximal_mu: NonNegative = 0.01
    """The proximal term's weight (sent to the sites in the round plan)."""


class FedAdamSettings(StrategyBase):
    """The mean update applied by a server-side Adam optimiser."""

    name: Literal["fedadam"]
    server_lr: Positive = 0.1
    """The server's learning rate."""


class FedTrimmedAvgSettings(StrategyBase):
    """The coordinate-wise mean after cutting the largest and smallest values."""

    name: Literal["fedtrimmedavg"]
    trim_beta: Annotated[float, Field(gt=0, lt=0.5)] = 0.2
    """The fraction cut at each end."""


class FedMedianSettings(StrategyBase):
    """The coordinate-wise median."""

    name: Literal["fedmedian"]


class _Byzantine(StrategyBase):
    malicious_hospitals: Annotated[int, Field(ge=0, le=1000)] = 1
    """f: how many hospitals may send arbitrary (within the norm bound) updates without moving the result
    far. The rule needs more hospitals than f in every round: min_hospitals is checked against it."""


class KrumSettings(_Byzantine):
    """Krum (Blanchard et al. 2017): the one update closest to its n - f - 2 nearest others."""

    name: Literal["krum"]

    def least_hospitals(self) -> tuple[int, str]:
        return 2 * self.malicious_hospitals + 3, "n > 2f + 2"


class MultiKrumSettings(_Byzantine):
    """Multi-Krum: the mean of the m updates Krum scores best."""

    name: Literal["multikrum"]
    selected_hospitals: Annotated[int, Field(ge=1, le=1000)] = 2
    """m: how many of the best-scored updates are averaged (1 is Krum)."""

    def least_hospitals(self) -> tuple[int, str]:
        f, m = self.malicious_hospitals, self.selected_hospitals
        return max(2 * f + 3, f + m), "n > 2f + 2 and n >= f + m"


class BulyanSettings(_Byzantine):
    """Bulyan (El Mhamdi et al. 2018): Multi-Krum's n - 2f best, then a coordinate-wise trimmed mean
    around their median."""

    name: Literal["bulyan"]

    def least_hospitals(self) -> tuple[int, str]:
        return 4 * self.malicious_hospitals + 3, "n >= 4f + 3"


def _strategy_tag(value: Any) -> str:
    """A strategy block's union tag, `name|<name>` (common/schema.py: an unknown one is a bad `name`);
    a block without a name is FedAvg's, as in earlier releases."""
    name = value.get("name", "fedavg") if isinstance(value, dict) else getattr(value, "name", None)
    return f"name|{name}"


StrategySettings = Annotated[
    Annotated[FedAvgSettings, Tag("name|fedavg")]
    | Annotated[FedProxSettings, Tag("name|fedprox")]
    | Annotated[FedAdamSettings, Tag("name|fedadam")]
    | Annotated[FedTrimmedAvgSettings, Tag("name|fedtrimmedavg")]
    | Annotated[FedMedianSettings, Tag("name|fedmedian")]
    | Annotated[KrumSettings, Tag("name|krum")]
    | Annotated[MultiKrumSettings, Tag("name|multikrum")]
    | Annotated[BulyanSettings, Tag("name|bulyan")],
    Discriminator(_strategy_tag),
]
"""federation.yaml's `strategy`: the settings model its `name` selects."""


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
    rounds: Annotated[int, Field(ge=1)] = 1
    """1 (the default): the one-shot class-sums release, each site's whole epsilon in one Gaussian release;
    on the public corpus it matched or beat every DP-SGD schedule in every regime measured (BENCHMARKS.md,
    "Private utility across regimes"). More: that release, then DP-SGD rounds of the head (or prompt)."""
    min_hospitals: Annotated[int, Field(ge=1)] = 2
    round_timeout: Positive = 600.0
    """Seconds the aggregator waits for replies each round."""
    evaluation: Literal["in_train", "separate"] = "in_train"
    """"in_train": one message per round; each site validates the model it receives inside the train
    message (its log; noised counts in the reply if it shares them). "separate": an evaluate message
    after each round, as Flower's strategies send by default (one more round trip)."""
    strategy: StrategySettings = FedAvgSettings()
    """How the updates are aggregated: `name` (fedavg, fedprox, fedadam, fedtrimmedavg, fedmedian, krum,
    multikrum, bulyan) and that strategy's own parameters."""
    model: ModelSettings = ModelSettings()
    training: TrainingSettings = TrainingSettings()
    privacy: PrivacyRequest = PrivacyRequest()

    @field_validator("strategy")
    @classmethod
    def _enough_hospitals_for_the_rule(cls, strategy: StrategyBase, info: ValidationInfo) -> StrategyBase:
        # A round aggregates only with at least min_hospitals valid updates (server/strategy.py): checked
        # against that, the rule's condition holds in every round it aggregates.
        least, rule = strategy.least_hospitals()
        have = info.data.get("min_hospitals")
        if have is not None and have < least:
            params = ", ".join(
                f"{k} {v}" for k, v in strategy.model_dump().items() if k not in ("name", "update_norm_bound")
            )
            raise ValueError(
                f"{strategy.name} ({params}) needs min_hospitals >= {least} ({rule}, n: the updates aggregated in "
                f"a round, at least min_hospitals), got min_hospitals {have}"
            )
        return strategy

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
    retry_margin: Annotated[int, Field(ge=0, le=100)] = 1
    """Retried DP-SGD rounds each run keeps room for: its noise is calibrated so that its rounds, its noised
    evaluations and this many more rounds fit within the run's epsilon and what is left of the cap (a round
    the aggregator sends again is charged again). 0: no room; a retried round may then cost a later round."""


class SiteLimits(Schema):
    """Plans this site refuses (as "configuration"), checked before any record is read, any noise is
    calibrated or any ledger entry is written (client/limits.py). The defaults bound what one run can
    cost the site (memory, time, epsilon) and what its replies can reveal; raise them deliberately."""

    max_total_rounds: Annotated[int, Field(ge=1, le=100_000)] = 200
    """The most rounds a run may plan: the site calibrates its noise for all of them at once."""
    min_total_rounds: Annotated[int, Field(ge=1)] = 5
    """The fewest rounds a private run with DP-SGD rounds may be calibrated for: fewer would release the run's
    whole epsilon in a few low-noise updates. (A one-round run is the one-shot class-sums release alone.)"""
    max_steps: Annotated[int, Field(ge=1, le=100_000)] = 20_000
    """The most DP-SGD steps a run may plan (steps per round x rounds): bounds calibration and training. The
    PRV calibration of 20,000 steps took 35 s and 0.9 GB on a busy 2-core host, of 50,000 about 2 min."""
    max_labels: Annotated[int, Field(ge=2)] = 1_000
    """The largest label space this site trains or evaluates."""
    max_tensor_values: Annotated[int, Field(ge=1)] = 1_000_000
    """The most values in the model's trainable tensors (prompt + head): 4 MB in float32 per message."""
    allow_fixed_batch: bool = False
    """Train plans that fix the expected batch (`batch_size`)? The site's sample rate, and with it the
    epsilon-spent it reports, then follow its size (q = batch_size / size); under sample_rate plans they
    are the same at every site of more than min_expected_batch / sample_rate units."""
    max_run_epsilon: Positive | None = None
    """The most epsilon one run may target; a plan asking for more is refused. null: the lifetime cap
    (privacy.max_epsilon), which then wins silently over a larger target."""

    @classmethod
    def admitting(cls, fed: FederationConfig) -> SiteLimits:
        """The default limits, widened just enough for `fed`'s own plan (its rounds, labels, fixed batch):
        for a workspace whose author writes the federation and every site at once (client/workspace.py),
        never for a hospital's own site.yaml."""
        limits = cls()
        return limits.replaced(
            max_total_rounds=max(limits.max_total_rounds, fed.rounds),
            # a one-round run without DP-SGD rounds (the one-shot release) needs no lower minimum
            min_total_rounds=min(limits.min_total_rounds, fed.rounds)
            if fed.rounds > 1 or fed.training.class_sums_share == 0
            else limits.min_total_rounds,
            max_labels=max(limits.max_labels, len(fed.labels)),
            allow_fixed_batch=fed.training.batch_size is not None,
        )


class SiteConfig(ConfigFile):
    hospital_id: Annotated[str, Field(pattern=HOSPITAL_ID_PATTERN)]
    train: LocalPath
    privacy: PrivacyCap
    ledger: LocalPath
    ledger_anchor: LocalPath | None = None
    """Rollback detection: the ledger's head hash and entry count, rewritten after every ledger write;
    best on another volume than the ledger. null: `<ledger>.anchor`, beside it (client/ledger/anchor.py)."""
    validation: LocalPath | None = None
    test: LocalPath | None = None
    """The site's own held-out records (personalisation's local test split)."""
    text_field: NonEmptyStr = "text"
    label_field: NonEmptyStr = "label"
    labels: Annotated[list[NonEmptyStr], Field(min_length=2), AfterValidator(distinct_labels)] | None = None
    """The federation's label space this site agreed to train on (names, in any order). A train, evaluate or
    pre-flight message whose plan has another one is refused as "configuration" before a record is read: the
    refusal depends on this list, never on which labels the records hold. null: every such message is refused
    until it is pinned (`fedprompt hospital labels --site site.yaml --federation federation.yaml`)."""
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
    weight: Annotated[float | None, Field(gt=0, le=1e9)] = None
    """The site's declared size: its number of DP units (records, or patients with patient_field) to about
    1 significant digit, a public fact about the hospital (docs/deployment.md 5). It is the FedAvg weight
    (sent as `num-examples`) and sets the site's sample rate and the public constant its noisy gradient
    sums are divided by (common/schedule.py), so the released noise reveals this value and nothing finer.
    The site refuses to train if it holds more than twice this many units. null: the count rounded to 1
    significant digit at each run (workspaces written by fedprompt write it here; declare it, so that it
    stays a constant rather than a function of the records)."""
    share_evaluation: Literal["none", "noised"] = "none"
    """Validation results: "none" = computed and logged at the site only, nothing sent (default);
    "noised" = per-class counts with Gaussian noise sent, each evaluation charged `evaluation_epsilon`
    to the privacy ledger (on top of training: leave room under max_epsilon)."""
    evaluation_epsilon: Positive = 0.1
    trusted_apps: list[Sha256] = []
    """App bundles this site accepts besides the code-free one naming the installed fedprompt: sha256
    hex digests of bundles the site has reviewed. Even for these, the installed code is what runs
    (client/bundle.py); anything else is refused as "untrusted app"."""
    limits: SiteLimits = SiteLimits()
    """The plans this site refuses before spending anything on them (SiteLimits)."""
    log_records: bool = False
    """May the daemon's log quote values read from the records (a label outside the label space, a
    record's text, a patient id) when it refuses bad records? false: the log names file, line and
    field only (`fedprompt data check` shows the values at the operator's own terminal)."""
    reply_after_s: NonNegative = 2.0
    """Timing: a reply leaves this many seconds after its message arrived, or if not ready by then at
    twice, four times ... that (or at the message's deadline), never when it is ready: how long the site
    took, which grows with its records, shows only as which of these points it hit (client/reply_timing.py).
    Set it above the site's slowest round (a run's first: every record is encoded once) and every reply
    leaves at the same point. 0: replies leave when ready (the timing channel is then unbounded)."""

    # Checks across fields, as field validators (not model validators) so that a problem names its
    # field and line; the fields they compare with are declared above them.
    @field_validator("ledger_anchor")
    @classmethod
    def _anchor_is_not_the_ledger(cls, anchor, info: ValidationInfo):
        if anchor is not None and anchor == info.data.get("ledger"):
            raise ValueError(f"must not be the ledger itself ({anchor})")
        return anchor

    @field_validator("share_evaluation")
    @classmethod
    def _evaluation_shared_per_record(cls, share: str, info: ValidationInfo) -> str:
        # The noised counts are released per validation record (sensitivity sqrt(2) for one record); with
        # patient_field one patient moves up to k of them while the ledger would charge one: refused.
        if share == "noised" and info.data.get("patient_field") is not None:
            raise ValueError(
                "'noised' cannot go with patient_field (patient-level DP): the validation counts are released per "
                "record, so a patient with k records would move up to k of them while the ledger charges one; set "
                "share_evaluation: none (results stay in this site's log) or patient_field: null"
            )
        return share

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
