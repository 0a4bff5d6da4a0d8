"""fedprompt from Python (a notebook, a script): classify texts with an export, run a simulation.

    from fedprompt.api import load_model, simulate

    result = simulate(out="runs/notebook", rounds=5)      # a fresh 3-hospital demo
    model = load_model(result.export)
    model.predict(["new onset seizure"])[0].label

`fedprompt predict` and `fedprompt simulate` are these functions behind a command line.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Model", "Prediction", "RoundMetrics", "SimulationResult", "load_model", "simulate"]

_BATCH = 64  # texts per forward pass
log = logging.getLogger("fedprompt.api")


@dataclass(frozen=True)
class Prediction:
    text: str
    label: str  # the most probable label
    probabilities: dict[str, float]  # every label's probability, in the model's label order


class Model:
    """An export of a run, or a model personalised at a site (`fedprompt personalize`), on this
    machine's backbone. Loading refuses a backbone other than the one the model was trained on."""

    def __init__(self, classifier):
        from fedprompt.client.personalize import EXTRA_KEY

        self.classifier = classifier.eval()
        self.labels: list[str] = list(classifier.config.labels)
        self.private: bool = classifier.config.private  # False: trained or personalised WITHOUT differential privacy
        personal = classifier.config.extra.get(EXTRA_KEY)
        # {"hospital_id", "method", ...} of a personalised model; None for a run's export
        self.personalized: dict | None = personal if isinstance(personal, dict) else None

    def predict(self, texts: list[str]) -> list[Prediction]:
        import torch

        from fedprompt.common.encoding import encode

        texts = list(texts)
        if not texts:
            return []
        ids, mask, _ = encode(
            self.classifier.encoder_tokenizer, texts, [0] * len(texts), self.classifier.config.max_length
        ).dataset.tensors
        with torch.no_grad():
            probs = torch.cat(
                [
                    self.classifier(ids[i : i + _BATCH], mask[i : i + _BATCH]).softmax(-1)
                    for i in range(0, len(texts), _BATCH)
                ]
            )
        out = []
        for text, p in zip(texts, probs.tolist(), strict=True):
            out.append(
                Prediction(
                    text, self.labels[max(range(len(p)), key=p.__getitem__)], dict(zip(self.labels, p, strict=True))
                )
            )
        return out


def load_model(path: str | Path, backbone: str | Path | None = None) -> Model:
    """`path`: an export folder (RUN/export) or a personalised model; `backbone`: the local backbone
    directory (default: the embedded all-MiniLM-L6-v2)."""
    from fedprompt.common.backbone import load_backbone
    from fedprompt.common.model import PromptClassifier

    return Model(
        PromptClassifier.from_pretrained(Path(path), load_backbone(None if backbone is None else Path(backbone)))
    )


@dataclass(frozen=True)
class RoundMetrics:
    round: int  # 0: the zero-shot start, before anyone trained
    seconds: float
    test: dict | None  # {"accuracy", "macro_f1", "loss", "num_examples"} on the aggregator's test set
    evaluate: dict | None  # pooled validation, only from hospitals that share noised counts
    hospitals: dict[str, dict]  # id -> {"status", "reason", "weight", "epsilon_spent", "epsilon_cap", "upload_bytes"}


@dataclass(frozen=True)
class SimulationResult:
    run: str
    # "trained"; "no hospital trained" (then `outcome_reason` says why and there is no export); or "partly
    # trained": most rounds did not aggregate (`outcome_reason` says which and why; the export is the last model)
    outcome: str
    outcome_reason: str | None
    private: bool
    rounds: list[RoundMetrics]
    out_dir: Path  # metrics.json, report.html, logs/, checkpoint/
    export: Path | None
    hospital_comparison: list[dict]  # per hospital: zero-shot, alone, federated, personalised on its local test split

    @property
    def trained(self) -> bool:
        from fedprompt.server.outcome import TRAINED

        return self.outcome == TRAINED

    @property
    def test(self) -> dict | None:
        """The last round's scores on the aggregator's test set."""
        return self.rounds[-1].test if self.rounds else None


def simulate(
    workspace: str | Path | None = None,
    out: str | Path | None = None,
    *,
    rounds: int | None = None,
    resume: bool = False,
    stop_after: int | None = None,
    backbone: str | Path | None = None,
    non_private: bool = False,
    seed: int = 0,
    verbose: bool = False,
    engine: str = "ray",
) -> SimulationResult:
    """A federation on this machine, on Flower's simulation engine (`engine="ray"`, needs
    fedprompt[simulation]) or in this process (`engine="local"`: fedprompt/local_engine.py).

    `workspace`: a folder of federation.yaml + hospital-*/site.yaml, each site with its ledger
    (`fedprompt privacy init`); None: a fresh 3-hospital demo in OUT/workspace (its ledgers
    created here), its sites on `backbone`. `out`: the run folder (default runs/<name>-<time>).
    fedprompt's lines (rounds, hospitals, epsilon) go to stdout; Flower's, Ray's and the
    hospitals' output to OUT/logs/simulate.log (and with `verbose` to the console too).
    """
    from fedprompt import simulation as engine_module
    from fedprompt.client.demo_data import generate_demo, write_demo_workspace
    from fedprompt.common.config import FederationConfig
    from fedprompt.common.logs import CONSOLE, console

    if rounds is not None:  # before the demo is written; the engine applies it by the same rule
        FederationConfig.check_field("rounds", rounds, origin="--rounds")
    if engine == "ray":
        engine_module.require_ray()
    workspace = None if workspace is None else Path(workspace)
    backbone = None if backbone is None else Path(backbone).resolve()
    out = (
        Path(out)
        if out is not None
        else Path("runs") / f"{'demo' if workspace is None else workspace.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    with console(in_place=False if verbose else None):  # in place only where nothing else prints
        fresh = False
        if workspace is None:
            workspace = out / "workspace"
            if not (resume and workspace.exists()):
                # allow_non_private: reference runs (`non_private`) need it, and it is safe here: this
                # demo's synthetic sites and their ledgers are made for this one run, here.
                write_demo_workspace(
                    workspace, generate_demo(hospitals=3, seed=seed), allow_non_private=True, backbone=backbone
                )
                fresh = True
                log.info("demo workspace (3 hospitals, synthetic notes) written to %s", workspace, extra=CONSOLE)
        # Ledgers are created only for the demo written just now; any other site must have its own
        # (`fedprompt privacy init --site ...`): a missing ledger may be a lost one.
        metrics = engine_module.simulate(
            workspace,
            out,
            rounds=rounds,
            resume=resume,
            stop_after=stop_after,
            backbone=backbone,
            non_private=non_private,
            create_ledgers=fresh,
            verbose=verbose,
            engine=engine,
        )
    return SimulationResult(
        run=metrics["run"],
        outcome=metrics["outcome"],
        outcome_reason=metrics["outcome_reason"],
        private=metrics["private"],
        rounds=[
            RoundMetrics(r["round"], r["seconds"], r["test"], r["evaluate"], r["hospitals"]) for r in metrics["rounds"]
        ],
        out_dir=out,
        export=None if metrics["export"] is None else Path(metrics["export"]),
        hospital_comparison=metrics.get("hospital_comparison", []),
    )
