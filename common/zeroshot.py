"""The zero-shot start: a head whose rows are the label texts' embeddings, so that the global model
before any training is a cosine classifier between a record's feature and each label's.

A record's feature comes through the model (the initial prompt included where
PromptConfig.prompt_layer puts one); a label's embedding is the plain backbone's pooled output,
without the prompt. With prompt_layer NO_PROMPT both are the plain backbone's, so round 0 is the
plain label-embedding zero-shot classifier (tests/test_late_prompt.py). No record is involved:
the initial model is public, computed from the label space alone.
"""

from __future__ import annotations

import torch

from .backbone import Backbone
from .model import HEAD_BIAS_KEY, HEAD_WEIGHT_KEY, PromptConfig, initial_state, pool


@torch.no_grad()
def label_prototypes(backbone: Backbone, config: PromptConfig, label_texts: list[str]) -> torch.Tensor:
    """[num_labels, hidden]: each label text's pooled backbone embedding (no prompt), unit length."""
    enc = backbone.tokenizer(
        label_texts, truncation=True, max_length=config.max_length, padding=True, return_tensors="pt"
    )
    was_training = backbone.model.training
    backbone.model.eval()
    hidden = backbone.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state.float()
    backbone.model.train(was_training)
    return torch.nn.functional.normalize(pool(hidden, enc["attention_mask"], config.pooling), dim=-1)


def initial_global_state(
    backbone: Backbone,
    config: PromptConfig,
    *,
    label_texts: list[str],
    head_init: str,
    logit_scale: float,
) -> dict[str, torch.Tensor]:
    """The federation's round-0 tensors: the initial prompt, and the zero-shot head (or a random one).
    A federation's: common/plan.initial_global_state_for (its settings from ModelSettings).

    logits = logit_scale x cos(feature, prototype) when the model normalises its features: the
    scale only sets how confident round 0 is (its argmax is the zero-shot classifier's).
    """
    state = initial_state(backbone, config)
    if head_init == "prototypes":
        protos = label_prototypes(backbone, config, label_texts)
        state[HEAD_WEIGHT_KEY] = protos * logit_scale
        state[HEAD_BIAS_KEY] = torch.zeros(config.num_labels)
    return state


@torch.no_grad()
def cosine_predictions(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """The zero-shot classifier itself: the label whose prototype is nearest in cosine."""
    return (torch.nn.functional.normalize(features, dim=-1) @ prototypes.T).argmax(-1)
