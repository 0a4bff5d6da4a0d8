"""What a hospital gains by joining, measured on its own local test split (its own patient mix):
the zero-shot model (no data, no privacy spent), the hospital alone (its own non-private model),
the federated private model, and the federated model personalised on its records.

Computed where the site's records are: at the site, or by `fedprompt simulate` whose operator
holds every site of a workspace. Nothing here leaves the site.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedprompt.common.backbone import Backbone
from fedprompt.common.config import SiteConfig
from fedprompt.common.encoding import encode
from fedprompt.common.features import cached_features
from fedprompt.common.model import PromptConfig, build_model
from fedprompt.common.records import load_records

from .personalize import OWN, Head, personalize_features, scores

MODELS = ("zero_shot", "alone", "federated", "personalized")


def compare_site(
    site: SiteConfig,
    backbone: Backbone,
    config: PromptConfig,
    initial: Mapping[str, torch.Tensor],
    final: Mapping[str, torch.Tensor],
) -> dict | None:
    """Accuracy and macro-F1 of each of MODELS on the site's local test split (None: the site has none)."""
    if site.test is None:
        return None

    def split(path, state):
        if path is None:
            return None
        r = load_records(path, text_field=site.text_field, label_field=site.label_field, labels=config.labels)
        return cached_features(
            build_model(backbone, config, state),
            encode(backbone.tokenizer, r.texts, r.labels, config.max_length).dataset,
        )

    n = config.num_labels
    train, test = split(site.train, final), split(site.test, final)
    personal = personalize_features(final, config, train)  # chosen by cross-validation on train
    alone = personal.heads[OWN]  # the site alone: the same candidate personalisation weighed
    found = {
        # its features come with the initial prompt
        "zero_shot": scores(Head.of(initial), split(site.test, initial), n),
        "alone": scores(alone, test, n),
        "federated": scores(Head.of(final), test, n),
        "personalized": scores(Head.of(personal.state), test, n),
    }
    out = {k: {m: v[m] for m in ("accuracy", "macro_f1")} for k, v in found.items()}
    return {"hospital": site.hospital_id, "local_test_rows": len(test), "personalized_method": personal.method, **out}


def format_comparison(row: dict) -> str:
    cells = "  ".join(f"{name.replace('_', '-')} {row[name]['macro_f1']:.3f}" for name in MODELS)
    return f"  {row['hospital']:<12} macro-F1 on its own {row['local_test_rows']} test notes:  {cells}"
