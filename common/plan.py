"""The per-round instructions the aggregator sends with the global tensors (a ConfigRecord)."""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, fields

from flwr.app import ConfigRecord

from .backbone import Backbone
from .config import FederationConfig
from .model import PromptConfig


def prompt_config(fed: FederationConfig, backbone: Backbone) -> PromptConfig:
    """The federation's model, around this backbone."""
    return PromptConfig(
        labels=fed.label_names,
        hidden_size=backbone.hidden_size,
        backbone_fingerprint=backbone.fingerprint,
        n_virtual_tokens=fed.model.n_virtual_tokens,
        pooling=fed.model.pooling,
        max_length=fed.model.max_length,
        prompt_init=fed.model.prompt_init,
        normalize=fed.model.normalize,
        seed=fed.model.seed,
        private=fed.privacy.private,
    )


@dataclass
class RoundPlan:
    run_name: str
    round: int  # global round number (continues across resumes)
    total_rounds: int  # for the sites' one-off noise calibration over the whole run
    labels: list[str]
    hidden_size: int
    backbone_fingerprint: str
    n_virtual_tokens: int
    pooling: str
    max_length: int
    prompt_init: str
    normalize: bool
    seed: int
    local_epochs: int
    sample_rate: float
    batch_size: int  # 0: use sample_rate (a ConfigRecord has no null)
    lr: float
    optimizer: str
    train_prompt: bool
    private: bool
    target_epsilon: float
    delta: float  # 0.0: each site uses its own delta
    max_grad_norm: float
    proximal_mu: float = 0.0
    # The aggregator waits this long for replies: a site's executor refuses before it (client/executor.py).
    round_timeout: float = 0.0
    # Validate the received model inside the train message (one message per round), or not (a separate evaluate message).
    evaluate_in_train: bool = False

    @classmethod
    def for_run(cls, fed: FederationConfig, prompt: PromptConfig, round: int = 0) -> "RoundPlan":
        return cls(
            run_name=fed.name,
            round=round,
            total_rounds=fed.rounds,
            **{n: getattr(prompt, n) for n in _model_fields()},
            local_epochs=fed.training.local_epochs,
            sample_rate=fed.training.sample_rate,
            batch_size=fed.training.batch_size or 0,
            lr=fed.training.lr,
            optimizer=fed.training.optimizer,
            train_prompt=fed.training.train_prompt,
            private=fed.privacy.private,
            target_epsilon=fed.privacy.target_epsilon,
            delta=fed.privacy.delta or 0.0,
            max_grad_norm=fed.privacy.max_grad_norm,
            proximal_mu=fed.strategy.proximal_mu if fed.strategy.name == "fedprox" else 0.0,
            round_timeout=fed.round_timeout or 0.0,
            evaluate_in_train=fed.evaluation == "in_train",
        )

    def prompt_config(self) -> PromptConfig:
        return PromptConfig(private=self.private, **{n: getattr(self, n) for n in _model_fields()})

    def to_config_record(self) -> ConfigRecord:
        return ConfigRecord({f"fp.{k}": v for k, v in asdict(self).items()})

    @classmethod
    def from_config_record(cls, record: ConfigRecord) -> "RoundPlan":
        missing = [f.name for f in fields(cls) if f"fp.{f.name}" not in record and f.default is MISSING]
        if missing:
            raise ValueError(f"round plan lacks {missing}")
        return cls(**{f.name: record[f"fp.{f.name}"] for f in fields(cls) if f"fp.{f.name}" in record})


def _model_fields() -> set[str]:
    """The model settings a plan carries, named as in PromptConfig (privacy is the run's, not the model's)."""
    return ({f.name for f in fields(PromptConfig)} & {f.name for f in fields(RoundPlan)}) - {"private"}
