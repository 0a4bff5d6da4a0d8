"""Exact per-sample gradients for the project's own trainable layers (Opacus registry).

Importing this module registers the samplers; `client/trainer.py` imports it before wrapping.
"""

from __future__ import annotations

import torch
from opacus.grad_sample import register_grad_sampler

from .model import SoftPrompt


@register_grad_sampler(SoftPrompt)
def soft_prompt_grad_sample(layer: SoftPrompt, activations, backprops: torch.Tensor) -> dict:
    # out[b] = cat(weight, x[b]) whether x is the word embeddings (prompt at the input) or the hidden
    # states entering layer k (a late prompt); so d loss_b / d weight = d loss_b / d out[b][:n_virtual].
    # `backprops` is already per sample (and rescaled by Opacus for mean-reduced losses).
    return {layer.weight: backprops[:, : layer.n_virtual, :].to(layer.weight.dtype)}
