"""Personalisation at one hospital: adapt the global model's head to the site's own records.

The prompt stays as the federation trained it, so the encoder is a fixed feature map (one
forward per record) and only the linear head changes. Candidates, all fitted on the site's train
split:

  global      the global model unchanged;
  prior       label-prior correction, bias += log p_site(y) - log p_model(y): the first step of
              Saerens et al. (2002). The site cannot know the federation's training prior, so the
              global model's mean predicted distribution on the site's records stands for it;
  local_head  multinomial logistic regression on the site's features, started from the prior-
              corrected head, its weights pulled towards the global ones by an L2 penalty.

The site's validation split picks one by macro-F1. The site's own model (the same regression from
zero: no federation) is the reference of what the hospital would get alone.

Nothing here leaves the site, so no privacy budget is spent: the personalised model is fitted on
the site's records WITHOUT differential privacy and must stay at that site.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from fedprompt.common.atomic import atomic_write
from fedprompt.common.backbone import load_backbone
from fedprompt.common.config import SiteConfig
from fedprompt.common.encoding import encode
from fedprompt.common.errors import InputError
from fedprompt.common.features import extract_features
from fedprompt.common.metrics import ClassCounts
from fedprompt.common.model import (
    CONFIG_NAME,
    HEAD_BIAS_KEY,
    HEAD_WEIGHT_KEY,
    WEIGHTS_NAME,
    PromptClassifier,
    PromptConfig,
    load_prompt,
    save_prompt,
)
from fedprompt.common.records import load_records

from .trainer import resolve_device
from .workspace import check_empty_target

GLOBAL, PRIOR, LOCAL_HEAD = "global", "prior", "local_head"
PERSONALIZED, OWN = "personalized", "own"  # the chosen candidate; the site-alone reference
METHODS = {GLOBAL: "global model", PRIOR: "label prior", LOCAL_HEAD: "label prior + local head"}
# L2 strengths for a fitted head (1/C in scikit-learn's terms, against a summed loss), strongest
# first: among heads tied on validation the one closest to its starting weights wins.
PENALTIES = (100.0, 10.0, 1.0, 0.1, 0.01)
DEFAULT_PENALTY = 1.0  # scikit-learn's default C = 1, used when the site has no validation split
EXTRA_KEY = "personalized"  # config.extra entry of a personalised model
REPORT_NAME = "personalize.json"


@dataclass(frozen=True)
class Head:
    """A linear head, as the model stores it: weight (num_labels, hidden), bias (num_labels,)."""

    weight: torch.Tensor
    bias: torch.Tensor

    @classmethod
    def of(cls, state: Mapping[str, torch.Tensor]) -> Head:
        return cls(state[HEAD_WEIGHT_KEY].float(), state[HEAD_BIAS_KEY].float())

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return features.double() @ self.weight.double().T + self.bias.double()

    def into(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`state` with this head in place of its own (the prompt untouched)."""
        return {
            **state,
            HEAD_WEIGHT_KEY: self.weight.float().contiguous(),
            HEAD_BIAS_KEY: self.bias.float().contiguous(),
        }


def scores(head: Head, feats: TensorDataset, num_labels: int) -> dict:
    """Loss, accuracy, macro-F1 (and per class) of `head` on (features, labels)."""
    x, y = feats.tensors
    logits = head.logits(x)
    loss = torch.nn.functional.cross_entropy(logits, y, reduction="sum").item()
    return ClassCounts.from_predictions(logits.argmax(-1), y, num_labels, loss).summary()


def prior_shift(head: Head, train_feats: TensorDataset, num_labels: int) -> torch.Tensor:
    """log p_site(y) - log p_model(y): p_site the site's label frequencies with add-one smoothing
    (a class the site has not seen keeps some mass), p_model the head's mean predicted
    distribution on the same records."""
    x, y = train_feats.tensors
    p_site = (torch.bincount(y, minlength=num_labels).double() + 1) / (len(y) + num_labels)
    p_model = head.logits(x).softmax(-1).mean(0)
    return p_site.log() - p_model.log()


def fit_head(train_feats: TensorDataset, start: Head, penalty: float) -> Head:
    """argmin over (W, b) of  sum_i CE(W x_i + b, y_i) + penalty/2 ||W - start.W||^2  (bias
    unpenalised, as scikit-learn's), by full-batch L-BFGS from `start`."""
    x, y = train_feats.tensors
    x, y = x.double(), y.long()
    anchor = start.weight.double()
    w = anchor.clone().requires_grad_(True)
    b = start.bias.double().clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1.0,
        max_iter=1000,
        tolerance_grad=1e-7,
        tolerance_change=1e-10,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (
            torch.nn.functional.cross_entropy(x @ w.T + b, y, reduction="sum") + penalty / 2 * ((w - anchor) ** 2).sum()
        )
        loss.backward()
        return loss

    opt.step(closure)
    return Head(w.detach().float(), b.detach().float())


def _tuned_fit(
    train_feats: TensorDataset,
    start: Head,
    val_feats: TensorDataset | None,
    num_labels: int,
    penalties: Sequence[float],
) -> tuple[Head, float]:
    """The fitted head with the best validation macro-F1 over `penalties` (the first among ties),
    or the DEFAULT_PENALTY fit without a validation split."""
    if val_feats is None:
        return fit_head(train_feats, start, DEFAULT_PENALTY), DEFAULT_PENALTY
    fits = {penalty: fit_head(train_feats, start, penalty) for penalty in penalties}
    f1 = {penalty: scores(head, val_feats, num_labels)["macro_f1"] for penalty, head in fits.items()}
    best = max(penalties, key=f1.__getitem__)
    return fits[best], best


@dataclass
class PersonalizeResult:
    method: str  # GLOBAL, PRIOR or LOCAL_HEAD: the candidate chosen
    penalty: float  # the local head's L2 strength (chosen on validation, or DEFAULT_PENALTY)
    heads: dict[str, Head]  # each candidate's head, by name
    validation: dict[str, dict] | None  # each candidate's scores on validation (None: no validation split)
    state: dict[str, torch.Tensor]  # the personalised trainable state: global prompt, chosen head


def personalize_features(
    global_state: Mapping[str, torch.Tensor],
    config: PromptConfig,
    train_feats: TensorDataset,
    val_feats: TensorDataset | None = None,
    penalties: Sequence[float] = PENALTIES,
) -> PersonalizeResult:
    """Personalise the global model's head on precomputed (features, labels) of the site's train
    (and validation) records; without validation the local head is taken as is."""
    n = config.num_labels
    base = Head.of(global_state)
    prior = Head(base.weight, (base.bias.double() + prior_shift(base, train_feats, n)).float())
    local, penalty = _tuned_fit(train_feats, prior, val_feats, n, penalties)
    heads = {GLOBAL: base, PRIOR: prior, LOCAL_HEAD: local}
    if val_feats is None:
        return PersonalizeResult(LOCAL_HEAD, penalty, heads, None, local.into(global_state))
    validation = {name: scores(head, val_feats, n) for name, head in heads.items()}
    # First among ties, in order global, prior, local head: no change without evidence for it.
    method = max(heads, key=lambda name: validation[name]["macro_f1"])
    return PersonalizeResult(method, penalty, heads, validation, heads[method].into(global_state))


def own_model_features(
    train_feats: TensorDataset,
    num_labels: int,
    val_feats: TensorDataset | None = None,
    penalties: Sequence[float] = PENALTIES,
) -> tuple[Head, float]:
    """The site alone, non-private: the same logistic regression from zero weights (no global
    model), its penalty chosen on validation like the local head's. Returns (head, penalty)."""
    hidden = train_feats.tensors[0].shape[1]
    zero = Head(torch.zeros(num_labels, hidden), torch.zeros(num_labels))
    return _tuned_fit(train_feats, zero, val_feats, num_labels, penalties)


# --- the site's files -------------------------------------------------------------------------


def _brief(summary: dict) -> dict:
    return {k: summary[k] for k in ("num_examples", "accuracy", "macro_f1")}


def personalize_site(site_path: str | Path, model_dir: str | Path, out_dir: str | Path) -> dict:
    """Personalise the export at `model_dir` on the records of the site at `site_path`; write the
    personalised model (the export's format) and personalize.json into `out_dir`, which must be
    new or empty. Reads only the site's files, the export and the backbone; returns the report."""
    out = check_empty_target(out_dir)  # before any work, and nothing written on refusal
    site = SiteConfig.load(site_path)
    model_dir = Path(model_dir)
    config, _ = load_prompt(model_dir)
    personal = config.extra.get(EXTRA_KEY)
    if personal is not None:
        whom = personal.get("hospital_id") if isinstance(personal, dict) else None
        raise InputError.at(
            model_dir / CONFIG_NAME, f"already personalised for {whom}; personalise the global export", field="extra"
        )
    # Every record file is validated before the (slow) backbone loads.
    records = {
        split: None
        if path is None
        else load_records(path, text_field=site.text_field, label_field=site.label_field, labels=config.labels)
        for split, path in (("train", site.train), ("validation", site.validation), ("test", site.test))
    }
    model = PromptClassifier.from_pretrained(model_dir, load_backbone(site.backbone))  # refuses another backbone
    device = resolve_device(site.device)
    model.to(device)

    def features(split: str) -> TensorDataset | None:
        r = records[split]
        return (
            None
            if r is None
            else extract_features(
                model, encode(model.encoder_tokenizer, r.texts, r.labels, config.max_length).dataset, device
            )
        )

    train, val, test = features("train"), features("validation"), features("test")
    assert train is not None  # site.yaml's train file is required
    global_state = model.trainable_state()
    result = personalize_features(global_state, config, train, val)
    own, own_penalty = own_model_features(train, config.num_labels, val)
    heads = {**result.heads, PERSONALIZED: result.heads[result.method], OWN: own}

    def table(feats: TensorDataset | None) -> dict[str, dict] | None:
        return None if feats is None else {name: scores(head, feats, config.num_labels) for name, head in heads.items()}

    base_sha = hashlib.sha256((model_dir / WEIGHTS_NAME).read_bytes()).hexdigest()
    validation = table(val)
    provenance = {
        "hospital_id": site.hospital_id,
        "base_model_sha256": base_sha,
        "method": result.method,
        "penalty": result.penalty,
        "validation": None if validation is None else {name: _brief(s) for name, s in validation.items()},
    }
    report = {
        **provenance,
        "own_penalty": own_penalty,
        "num_records": {
            name: None if feats is None else len(feats)
            for name, feats in (("train", train), ("validation", val), ("test", test))
        },
        "validation": validation,
        "test": table(test),
    }
    # Fitted on the site's records without DP (except the unchanged global model): says so to
    # `fedprompt predict`, and to anyone tempted to share it.
    personalised = replace(
        config, private=config.private and result.method == GLOBAL, extra={**config.extra, EXTRA_KEY: provenance}
    )
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / REPORT_NAME, (json.dumps(report, indent=2) + "\n").encode())
    save_prompt(out, personalised, result.state)
    return report
