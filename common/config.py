"""The two configuration files and their schemas.

`federation.yaml` belongs to the aggregator; `site.yaml` to one hospital. Site settings win
over federation requests (a site's epsilon cap bounds whatever the aggregator asks for).
Relative paths in a file are resolved against that file's folder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from .yamlconfig import load_dataclass

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedtrimmedavg", "fedmedian")


@dataclass
class ModelSettings:
    # 4 label-word vectors: 20 measurably blurred the frozen features the private head learns on
    # (BENCHMARKS.md "Choosing the private recipe"), and fewer values mean less noise if trained.
    n_virtual_tokens: int = 4
    prompt_init: Literal["vocab", "labels"] = "labels"
    pooling: Literal["mean", "cls"] = "mean"
    max_length: int = 256  # all-MiniLM-L6-v2 was trained on 256 tokens; abstracts average ~250
    # Head: a cosine classifier whose rows start as the label texts' normalised features x
    # logit_scale, so the model before round 1 is the zero-shot classifier (BENCHMARKS.md).
    normalize: bool = True
    head_init: Literal["prototypes", "random"] = "prototypes"
    logit_scale: float = 10.0
    seed: int = 0  # deterministic initial prompt/head: every site and the server agree on it
    # Pin the federation to one backbone; null = the aggregator's own backbone at start.
    backbone_fingerprint: str | None = None

    def validate(self) -> list[tuple[str, str]]:
        out = []
        if not 1 <= self.n_virtual_tokens <= 256:
            out.append(("n_virtual_tokens", f"expected 1..256, got {self.n_virtual_tokens}"))
        if not 8 <= self.max_length <= 512:
            out.append(("max_length", f"expected 8..512, got {self.max_length}"))
        if not (self.logit_scale > 0 and math.isfinite(self.logit_scale)):
            out.append(("logit_scale", f"expected a positive number, got {self.logit_scale}"))
        return out


@dataclass
class TrainingSettings:
    """The private recipe (chosen on the public corpus, BENCHMARKS.md "Choosing the private recipe").

    Each site samples records with probability `sample_rate` per step (Poisson), so the expected
    batch grows with the site (q x n) and a round is `local_epochs / sample_rate` steps whatever
    the site's size; `batch_size`, if set, fixes the expected batch instead (q = batch_size / n).
    `train_prompt: false` trains the head on frozen features (the encoder runs once per record):
    under DP on a few thousand records the noise on 7,680 prompt values costs more than the
    prompt brings, while the head (5 x 384) learns well.
    """

    local_epochs: int = 1
    sample_rate: float = 0.25
    batch_size: int | None = None
    lr: float = 8.0
    optimizer: Literal["adam", "sgd"] = "sgd"
    train_prompt: bool = False

    def validate(self) -> list[tuple[str, str]]:
        out = []
        if self.local_epochs < 1:
            out.append(("local_epochs", f"expected >= 1, got {self.local_epochs}"))
        if not 0 < self.sample_rate <= 1:
            out.append(("sample_rate", f"expected 0 < sample_rate <= 1, got {self.sample_rate}"))
        if self.batch_size is not None and self.batch_size < 1:
            out.append(("batch_size", f"expected >= 1 (or null: use sample_rate), got {self.batch_size}"))
        if not (self.lr > 0 and math.isfinite(self.lr)):
            out.append(("lr", f"expected a positive number, got {self.lr}"))
        return out


@dataclass
class PrivacyRequest:
    """What the aggregator asks of each site for this run (sites may grant less)."""

    private: bool = True
    target_epsilon: float = 8.0  # per site, for the whole run
    delta: float | None = None  # null: each site uses its own delta
    max_grad_norm: float = 1.0

    def validate(self) -> list[tuple[str, str]]:
        out = []
        if not self.target_epsilon > 0:
            out.append(("target_epsilon", f"expected > 0, got {self.target_epsilon}"))
        if self.delta is not None and not 0 < self.delta < 1:
            out.append(("delta", f"expected 0 < delta < 1, got {self.delta}"))
        if not self.max_grad_norm > 0:
            out.append(("max_grad_norm", f"expected > 0, got {self.max_grad_norm}"))
        return out


@dataclass
class StrategySettings:
    name: Literal["fedavg", "fedprox", "fedadam", "fedtrimmedavg", "fedmedian"] = "fedavg"
    proximal_mu: float = 0.01  # fedprox
    trim_beta: float = 0.2  # fedtrimmedavg: fraction cut at each end
    server_lr: float = 0.1  # fedadam
    update_norm_bound: float = 100.0  # L2 norm of (update - global); larger replies are rejected


@dataclass
class LabelSpec:
    """A label with a public description: the description sharpens its zero-shot prototype."""

    name: str
    description: str = ""

    @property
    def text(self) -> str:
        return f"{self.name}: {self.description}" if self.description else self.name


@dataclass
class FederationConfig:
    name: str
    labels: list[str | LabelSpec]  # names, or {name, description} mappings
    rounds: int = 20
    min_hospitals: int = 2
    round_timeout: float = 600.0
    # "in_train": one message per round; each site validates the model it receives inside the
    # train message (its log; noised counts in the reply if it shares them). "separate": an
    # evaluate message after each round, as Flower's strategies send by default (one more round trip).
    evaluation: Literal["in_train", "separate"] = "in_train"
    strategy: StrategySettings = field(default_factory=StrategySettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    training: TrainingSettings = field(default_factory=TrainingSettings)
    privacy: PrivacyRequest = field(default_factory=PrivacyRequest)
    source: Path | None = field(default=None, metadata={"internal": True})  # set by load()

    @property
    def label_names(self) -> list[str]:
        return [x.name if isinstance(x, LabelSpec) else x for x in self.labels]

    @property
    def label_texts(self) -> list[str]:
        """What each label's zero-shot prototype is computed from."""
        return [x.text if isinstance(x, LabelSpec) else x for x in self.labels]

    def validate(self) -> list[tuple[str, str]]:
        out = []
        names = self.label_names
        if len(names) < 2:
            out.append(("labels", f"expected at least 2 labels, got {len(names)}"))
        dupes = sorted({x for x in names if names.count(x) > 1})
        if dupes:
            out.append(("labels", f"duplicate label(s): {', '.join(dupes)}"))
        if self.rounds < 1:
            out.append(("rounds", f"expected >= 1, got {self.rounds}"))
        if self.min_hospitals < 1:
            out.append(("min_hospitals", f"expected >= 1, got {self.min_hospitals}"))
        if not self.round_timeout > 0:
            out.append(("round_timeout", f"expected > 0 seconds, got {self.round_timeout}"))
        return out

    @classmethod
    def load(cls, path: str | Path) -> "FederationConfig":
        return replace(load_dataclass(cls, path), source=Path(path).resolve())


@dataclass
class PrivacyCap:
    """The hospital's own promise. The aggregator can ask for more privacy, never less."""

    max_epsilon: float
    delta: float
    min_noise_multiplier: float = 0.0
    accountant: Literal["prv", "rdp"] = "prv"

    def validate(self) -> list[tuple[str, str]]:
        out = []
        if not self.max_epsilon > 0:
            out.append(("max_epsilon", f"expected > 0, got {self.max_epsilon}"))
        if not 0 < self.delta < 1:
            out.append(("delta", f"expected 0 < delta < 1, got {self.delta}"))
        if self.min_noise_multiplier < 0:
            out.append(("min_noise_multiplier", f"expected >= 0, got {self.min_noise_multiplier}"))
        return out


@dataclass
class SiteConfig:
    hospital_id: str
    train: Path
    privacy: PrivacyCap
    ledger: Path
    # Rollback detection: the ledger's head hash and entry count, rewritten after every ledger write;
    # best on another volume than the ledger. null: `<ledger>.anchor`, beside it (client/ledger.py).
    ledger_anchor: Path | None = None
    validation: Path | None = None
    test: Path | None = None  # the site's own held-out records (personalisation's local test split)
    text_field: str = "text"
    label_field: str = "label"
    # Patient-level DP: the records' column/field naming the patient. Set, the patient (all of
    # its records together) is the sampling and clipping unit, and the ledger's epsilon protects
    # a whole patient; null: each record is the unit (docs/deployment.md section 4).
    patient_field: str | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    backbone: Path | None = None  # null: the embedded default backbone
    max_physical_batch_size: int = 32
    allow_non_private: bool = False  # may the aggregator run this site without DP (reference runs)?
    # The FedAvg weight this site declares (sent as `num-examples`): a constant the site chooses,
    # never read from its records. 1.0 everywhere = equal weights. Workspaces written by fedprompt
    # declare the training-set size rounded to 1 significant digit (client/workspace.declared_weight):
    # weighting by size is worth 2 points of macro-F1 on the benchmark (BENCHMARKS.md), and a
    # hospital's approximate size is a fact about the hospital, not about a patient (docs/deployment.md 5).
    weight: float = 1.0
    # Validation results: "none" = computed and logged at the site only, nothing sent (default);
    # "noised" = per-class counts with Gaussian noise sent, each evaluation charged
    # `evaluation_epsilon` to the privacy ledger (on top of training: leave room under max_epsilon).
    share_evaluation: Literal["none", "noised"] = "none"
    evaluation_epsilon: float = 0.1
    # App bundles this site accepts besides the code-free one naming the installed fedprompt: sha256
    # hex digests of bundles the site has reviewed. Even for these, the installed code is what runs
    # (client/bundle.py); anything else is refused as "untrusted app".
    trusted_apps: list[str] = field(default_factory=list)
    source: Path | None = field(default=None, metadata={"internal": True})  # set by load()

    def validate(self) -> list[tuple[str, str]]:
        out = []
        if not self.hospital_id.replace("-", "").replace("_", "").isalnum():
            out.append(("hospital_id", f"expected letters, digits, '-' or '_', got {self.hospital_id!r}"))
        if self.patient_field is not None and not (isinstance(self.patient_field, str) and self.patient_field.strip()):
            out.append(("patient_field", f"expected a non-empty column/field name (or null), got {self.patient_field!r}"))
        if self.max_physical_batch_size < 1:
            out.append(("max_physical_batch_size", f"expected >= 1, got {self.max_physical_batch_size}"))
        if self.ledger_anchor is not None and self.ledger_anchor == self.ledger:
            out.append(("ledger_anchor", f"must not be the ledger itself ({self.ledger})"))
        if not (math.isfinite(self.weight) and 0 < self.weight <= 1e9):
            out.append(("weight", f"expected a number in (0, 1e9], got {self.weight}"))
        bad = [d for d in self.trusted_apps if not (isinstance(d, str) and len(d) == 64 and all(c in "0123456789abcdef" for c in d))]
        if bad:
            out.append(("trusted_apps", f"expected sha256 hex digests (64 lowercase hex characters), got {bad[0]!r}"))
        if not (math.isfinite(self.evaluation_epsilon) and self.evaluation_epsilon > 0):
            out.append(("evaluation_epsilon", f"expected a number > 0, got {self.evaluation_epsilon}"))
        elif self.share_evaluation == "noised" and self.evaluation_epsilon > self.privacy.max_epsilon:
            out.append(("evaluation_epsilon", f"{self.evaluation_epsilon} is above privacy.max_epsilon {self.privacy.max_epsilon}"))
        return out

    @classmethod
    def load(cls, path: str | Path) -> "SiteConfig":
        path = Path(path).resolve()
        cfg = load_dataclass(cls, path)
        base = path.parent

        def resolve(p: Path | None) -> Path | None:
            return None if p is None else (p if p.is_absolute() else (base / p)).resolve()

        return replace(
            cfg,
            train=resolve(cfg.train),
            validation=resolve(cfg.validation),
            test=resolve(cfg.test),
            ledger=resolve(cfg.ledger),
            ledger_anchor=resolve(cfg.ledger_anchor),
            backbone=resolve(cfg.backbone),
            source=path,
        )
