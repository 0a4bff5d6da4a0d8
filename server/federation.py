"""The aggregator's run: prepare (validate everything up front), execute rounds, finish.

Checkpoints after every round and rewrites the report in the background (server/live_report.py:
an operator can watch a run in a browser); a resumed run continues the round numbering and the
history. At the end: the export, metrics.json and the report; a run in which no hospital
trained gets no export, and metrics.json and the report say why (server/outcome.py).
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from flwr.app import MetricRecord
from flwr.serverapp import Grid
from torch.utils.data import TensorDataset

from fedprompt.common.atomic import atomic_write
from fedprompt.common.backbone import Backbone, load_backbone
from fedprompt.common.config import FederationConfig
from fedprompt.common.encoding import encode
from fedprompt.common.errors import InputError
from fedprompt.common.logs import PROGRESS
from fedprompt.common.metrics import evaluate
from fedprompt.common.model import PromptConfig, build_model
from fedprompt.common.plan import RoundPlan, prompt_config
from fedprompt.common.records import load_records
from fedprompt.common.wire import arrays_to_state, state_to_arrays
from fedprompt.common.zeroshot import initial_global_state

from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .export import export_model
from .history import RunMetrics
from .live_report import LiveReport
from .outcome import RUNNING, TRAINED, Outcome, run_outcome
from .report import write_report
from .strategy import ValidatedStrategy, build_strategy

log = logging.getLogger("fedprompt.server")


@dataclass
class RunSpec:
    federation: FederationConfig
    out_dir: Path
    test_path: Path | None = None  # held-out set for the aggregator's reference evaluation
    backbone: Path | None = None  # aggregator's copy of the shared backbone (default: embedded)
    resume: bool = False
    stop_after: int | None = None  # rounds to run in this invocation (resume later)
    expected_hospitals: int | None = None  # wait for this many before each round (simulation: all)


@dataclass
class PreparedRun:
    spec: RunSpec
    backbone: Backbone
    prompt: PromptConfig
    state: dict[str, torch.Tensor]
    done: int
    history: list[dict] = field(default_factory=list)
    test_set: TensorDataset | None = None

    @property
    def checkpoint_dir(self) -> Path:
        return self.spec.out_dir / "checkpoint"


def prepare_run(spec: RunSpec) -> PreparedRun:
    fed = spec.federation
    backbone = load_backbone(spec.backbone)
    pinned = fed.model.backbone_fingerprint
    if pinned and pinned != backbone.fingerprint:
        raise InputError.at(
            fed.source or "federation.yaml",
            f"pinned backbone {pinned[:16]}... but the aggregator's backbone ({backbone.path}) is "
            f"{backbone.fingerprint[:16]}...",
            field="model.backbone_fingerprint",
        )
    prompt = prompt_config(fed, backbone)
    run = PreparedRun(spec, backbone, prompt, {}, 0)
    ckpt = load_checkpoint(run.checkpoint_dir)
    if ckpt is not None and not spec.resume:
        raise InputError.at(
            spec.out_dir,
            f"holds a run already (checkpoint at round {ckpt.round}): pass --resume to continue it, or choose "
            "another --out",
        )
    if ckpt is not None:
        if ckpt.backbone_fingerprint != backbone.fingerprint or ckpt.run != fed.name:
            raise InputError.at(
                run.checkpoint_dir / "state.json",
                f"checkpoint is of run {ckpt.run!r} on another backbone/config; cannot resume",
            )
        run.state, run.done, run.history = ckpt.state, ckpt.round, ckpt.history
    else:
        run.state = initial_global_state(
            backbone,
            prompt,
            label_texts=fed.label_texts,
            head_init=fed.model.head_init,
            logit_scale=fed.model.logit_scale,
        )
    if spec.test_path is not None:
        records = load_records(spec.test_path, text_field="text", label_field="label", labels=prompt.labels)
        run.test_set = encode(backbone.tokenizer, records.texts, records.labels, prompt.max_length).dataset
    return run


def _test_metrics(run: PreparedRun, state: dict[str, torch.Tensor]) -> dict | None:
    if run.test_set is None:
        return None
    s = evaluate(build_model(run.backbone, run.prompt, state), run.test_set, run.prompt.num_labels).summary()
    return {k: s[k] for k in ("accuracy", "macro_f1", "loss", "num_examples")}


def execute(grid: Grid, run: PreparedRun) -> dict:
    """Run the remaining rounds on `grid`, then export and report. Returns metrics.json's content."""
    fed = run.spec.federation
    remaining = fed.rounds - run.done
    if run.spec.stop_after is not None:
        remaining = min(remaining, run.spec.stop_after)
    in_train = fed.evaluation == "in_train"
    strategy = ValidatedStrategy(
        build_strategy(fed, run.spec.expected_hospitals),
        run.prompt,
        norm_bound=fed.strategy.update_norm_bound,
        min_hospitals=fed.min_hospitals,
        round_offset=run.done,
        evaluate_in_train=in_train,
    )
    plan = RoundPlan.for_run(fed, run.prompt).to_config_record()
    t_round = [time.perf_counter(), time.time()]
    start_at_zero = not any(h["round"] == 0 for h in run.history)  # a resumed run has its round 0 already
    live = LiveReport(run.spec.out_dir)

    def after_round(server_round: int, arrays) -> MetricRecord | None:
        if server_round == 0 and not start_at_zero:
            return None
        r = strategy.global_round(server_round)
        state = arrays_to_state(arrays)
        hospitals = strategy.outcomes_json(server_round)
        record = {
            "round": r,
            "seconds": round(time.perf_counter() - t_round[0], 3),
            "aggregate_seconds": strategy.aggregate_seconds.get(server_round),
            "aggregate_cpu_seconds": strategy.aggregate_cpu_seconds.get(server_round),
            # null unless some site shares noised counts; its `model_round` is the model they validated
            # (with `evaluation: in_train`, the one this round started from)
            "evaluate": strategy.eval_results.get(server_round),
            "test": _test_metrics(run, state),
            "hospitals": hospitals,
            "aggregated": strategy.aggregated.get(server_round, False),  # the global model changed this round
            "upload_bytes": sum(h["upload_bytes"] for h in hospitals.values()),
            # Wall-clock (epoch) phase boundaries: round start, instructions sent, replies in, round end.
            "timing": {"start": t_round[1], **strategy.timing.get(server_round, {}), "end": time.time()},
        }
        t_round[:] = [time.perf_counter(), time.time()]
        run.history.append(record)
        run.state, run.done = state, r
        save_checkpoint(
            run.checkpoint_dir, Checkpoint(r, state, run.history, run.prompt.backbone_fingerprint, fed.name)
        )
        log.info("%s", round_line(record, fed.rounds), extra=PROGRESS)
        live.submit(run_metrics(run, RUNNING))
        return MetricRecord({f"test-{k}": float(v) for k, v in record["test"].items()}) if record["test"] else None

    if start_at_zero and remaining > 0 and not in_train:
        # Round 0: the hospitals validate the initial (zero-shot) model before anyone trains, each
        # in its own log; only sites with `share_evaluation: noised` send (noised) counts back.
        # (With `evaluation: in_train` they do so inside round 1's train message.)
        replies = grid.send_and_receive(
            strategy.configure_evaluate(0, state_to_arrays(run.state), plan, grid), timeout=fed.round_timeout
        )
        strategy.aggregate_evaluate(0, replies)
    if remaining > 0:
        try:
            strategy.start(
                grid,
                state_to_arrays(run.state),
                num_rounds=remaining,
                timeout=fed.round_timeout,
                train_config=plan,
                evaluate_config=plan,
                evaluate_fn=after_round,
            )
        finally:
            live.wait()  # the final report (finish) never races the last round's
    return finish(run)


def finish(run: PreparedRun) -> dict:
    fed, out = run.spec.federation, run.spec.out_dir
    outcome, why = run_outcome(run.history)
    export_dir = (
        export_model(out / "export", run.prompt, run.state, run.history, fed.name) if outcome == TRAINED else None
    )
    metrics = run_metrics(run, outcome, why, export_dir)
    atomic_write(out / "metrics.json", (json.dumps(metrics, indent=1) + "\n").encode())
    write_report(metrics, out)
    if why is not None:
        log.info("%s: %s; no export written (the per-round reasons are in %s)", outcome, why, out / "metrics.json")
    return metrics


def run_metrics(run: PreparedRun, outcome: Outcome, why: str | None = None, export_dir: Path | None = None) -> dict:
    """metrics.json's content (and the report's input): the run's history and how it ended."""
    fed = run.spec.federation
    return RunMetrics.model_validate(  # the history's rounds are dicts: validated as RoundRecords
        dict(
            run=fed.name,
            outcome=outcome,
            outcome_reason=why,
            private=fed.privacy.private,
            strategy=fed.strategy.name,
            backbone_fingerprint=run.prompt.backbone_fingerprint,
            labels=fed.label_names,
            rounds=run.history,
            export=None if export_dir is None else str(export_dir),
        )
    ).model_dump(exclude_unset=True)


def round_line(rec: dict, total: int) -> str:
    """One round for the operator: scores, each hospital's status and epsilon (counts beyond a few
    hospitals), seconds."""
    ev, test, sites = rec["evaluate"] or {}, rec["test"] or {}, rec["hospitals"]
    parts = [f"round {rec['round']}/{total}" + (" (zero-shot start, no training)" if rec["round"] == 0 else "")]
    if ev:  # only from sites that share noised counts; by default each site logs its own validation
        parts.append(f"val{' (noised)' if ev.get('noised') else ''} acc {ev['accuracy']:.3f} F1 {ev['macro_f1']:.3f}")
    if test:
        parts.append(f"test acc {test['accuracy']:.3f} F1 {test['macro_f1']:.3f}")
    if rec["round"] > 0 and len(sites) <= 4:
        parts.append(
            ", ".join(
                f"{h} {o['status']}"
                + (f" ({o['reason']})" if o["status"] != "ok" and o.get("reason") else "")
                + (f" eps {o['epsilon_spent']:.2f}" if o.get("epsilon_spent") is not None else "")
                for h, o in sorted(sites.items())
            )
        )
    elif rec["round"] > 0:
        eps = [o["epsilon_spent"] for o in sites.values() if o.get("epsilon_spent") is not None]
        parts.append(" ".join(f"{k}:{v}" for k, v in sorted(Counter(o["status"] for o in sites.values()).items())))
        parts.append(f"max eps {max(eps):.2f}" if eps else "eps n/a")
    parts.append(f"{rec['seconds']:.1f}s")
    return " | ".join(parts)
