"""The per-round instructions the aggregator sends with the global tensors (a ConfigRecord).

A site validates what it receives with the same model the aggregator built it from: a malformed
plan (a missing key, a wrong type, a value out of range) is refused with the reason in its log.
"""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Annotated

import torch
from flwr.app import ConfigRecord
from pydantic import Field, ValidationError

from .backbone import Backbone
from .config import (
    FederationConfig,
    NonNegative,
    Optimizer,
    Positive,
    SampleRate,
)
from .errors import InputError, Problem
from .model import NO_PROMPT, PromptConfig, PromptSchema
from .schema import NonEmptyStr, issues
from .zeroshot import initial_global_state

PREFIX = "fp."  # the plan's keys in the ConfigRecord (Flower adds its own, e.g. "server-round")


def prompt_config(fed: FederationConfig, backbone: Backbone) -> PromptConfig:
    """The federation's model, around this backbone: refused if federation.yaml pins another one."""
    pinned = fed.model.backbone_fingerprint
    if pinned and pinned != backbone.fingerprint:
        raise InputError.at(
            fed.source or "federation.yaml",
            f"pinned backbone {pinned[:16]}... but the backbone at {backbone.path} is {backbone.fingerprint[:16]}...",
            field="model.backbone_fingerprint",
        )
    config = PromptConfig(
        labels=fed.label_names,
        hidden_size=backbone.hidden_size,
        backbone_fingerprint=backbone.fingerprint,
        n_virtual_tokens=fed.model.n_virtual_tokens,
        pooling=fed.model.pooling,
        max_length=fed.model.max_length,
        prompt_init=fed.model.prompt_init,
        prompt_layer=late_layer(fed, backbone),
        prompt_style=fed.model.prompt_style,
        normalize=fed.model.normalize,
        seed=fed.model.seed,
        private=fed.privacy.private,
    )
    if not train_prompt(fed, config, backbone)[0]:
        # A prompt the run does not train stays off the record path: round 0 is then the plain
        # label-embedding classifier exactly (an untrained prompt lowered it on unseen label spaces).
        config.prompt_layer = NO_PROMPT
    return config


def late_layer(fed: FederationConfig, backbone: Backbone) -> int:
    """federation.yaml's prompt_layer, null resolved to this backbone's last layer."""
    chosen = fed.model.prompt_layer
    return int(backbone.model.config.num_hidden_layers) - 1 if chosen is None else chosen


def train_prompt(fed: FederationConfig, config: PromptConfig, backbone: Backbone) -> tuple[bool, str]:
    """Whether the run trains the prompt, and why: federation.yaml's `training.train_prompt`, or with
    "auto" the plan's own verdict (common/schedule.prompt_decision, public values only)."""
    choice = fed.training.train_prompt
    if choice != "auto":
        return bool(choice), f"training.train_prompt: {str(choice).lower()} in federation.yaml"
    from .schedule import prompt_decision  # schedule reads RoundPlan: imported here, not at the top

    candidate = replace(config, prompt_layer=late_layer(fed, backbone))
    return prompt_decision(RoundPlan.for_run(fed, candidate, round=1))


def initial_global_state_for(fed: FederationConfig, backbone: Backbone) -> dict[str, torch.Tensor]:
    """The federation's round-0 tensors on this backbone: its initial prompt and head (common/zeroshot.py)."""
    return initial_global_state(
        backbone,
        prompt_config(fed, backbone),
        label_texts=fed.label_texts,
        head_init=fed.model.head_init,
        logit_scale=fed.model.logit_scale,
    )


class RoundPlan(PromptSchema):  # the model's fields (common/model.py), then the run's and the round's
    run_name: NonEmptyStr
    round: Annotated[int, Field(ge=0)]  # global round number (continues across resumes)
    total_rounds: Annotated[int, Field(ge=1)]  # for the sites' one-off noise calibration over the whole run
    local_epochs: Annotated[int, Field(ge=1)]
    sample_rate: SampleRate
    batch_size: Annotated[int, Field(ge=0)]  # 0: use sample_rate (a ConfigRecord has no null)
    min_expected_batch: Annotated[int, Field(ge=1)]
    lr: Positive
    optimizer: Optimizer
    train_prompt: bool
    class_sums_share: Annotated[float, Field(ge=0, lt=1)]
    max_noise_ratio: Positive
    noise_lr_ref: Positive
    private: bool
    target_epsilon: Positive
    delta: Annotated[float, Field(ge=0, lt=1)]  # 0.0: each site uses its own delta
    max_grad_norm: Positive
    proximal_mu: NonNegative = 0.0
    # The aggregator waits this long for replies: a site's executor refuses before it (client/executor.py). 0: no limit.
    round_timeout: NonNegative = 0.0
    # Validate the received model inside the train message (one message per round), or not (a separate
    # evaluate message).
    evaluate_in_train: bool = False

    @classmethod
    def for_run(cls, fed: FederationConfig, prompt: PromptConfig, round: int = 0) -> RoundPlan:
        return cls(
            run_name=fed.name,
            round=round,
            total_rounds=fed.rounds,
            **{n: getattr(prompt, n) for n in _model_fields()},
            local_epochs=fed.training.local_epochs,
            sample_rate=fed.training.sample_rate,
            batch_size=fed.training.batch_size or 0,
            min_expected_batch=fed.training.min_expected_batch,
            lr=fed.training.lr,
            optimizer=fed.training.optimizer,
            train_prompt=prompt.has_prompt,  # prompt_config() took it off the record path if untrained
            class_sums_share=fed.training.class_sums_share,
            max_noise_ratio=fed.training.max_noise_ratio,
            noise_lr_ref=fed.training.noise_lr_ref,
            private=fed.privacy.private,
            target_epsilon=fed.privacy.target_epsilon,
            delta=fed.privacy.delta or 0.0,
            max_grad_norm=fed.privacy.max_grad_norm,
            proximal_mu=fed.strategy.proximal_mu if fed.strategy.name == "fedprox" else 0.0,
            round_timeout=fed.round_timeout,
            evaluate_in_train=fed.evaluation == "in_train",
        )

    def prompt_config(self) -> PromptConfig:
        return PromptConfig(private=self.private, **{n: getattr(self, n) for n in _model_fields()})

    def to_config_record(self) -> ConfigRecord:
        return ConfigRecord({f"{PREFIX}{k}": v for k, v in self.model_dump().items()})

    @classmethod
    def from_config_record(cls, record: ConfigRecord) -> RoundPlan:
        """The plan in `record`, validated; InputError names each bad key (`fp.lr: expected 0 < ...`)."""
        data = {k.removeprefix(PREFIX): v for k, v in record.items() if k.startswith(PREFIX)}
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise InputError(
                [
                    Problem("the aggregator's round plan", None, PREFIX + key, message)
                    for key, message in issues(cls, exc)
                ]
            ) from None


def _model_fields() -> set[str]:
    """The model settings a plan carries, named as in PromptConfig (privacy is the run's, not the model's)."""
    return ({f.name for f in fields(PromptConfig)} & set(RoundPlan.model_fields)) - {"private"}
