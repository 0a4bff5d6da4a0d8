"""`fedprompt personalize`: adapt a global export to one hospital's own records, at that hospital.

Reads only the site's files, the export and the backbone; writes only under --out; sends nothing
and spends no privacy budget (the personalised model is not differentially private: it stays at
the site).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "personalize",
        help="adapt an exported model to this hospital's records (label prior, local head or its own model, "
        "chosen by cross-validation); stays at the site",
    )
    p.add_argument(
        "--site",
        type=Path,
        required=True,
        help="the hospital's site.yaml (its train, validation and test records, its backbone)",
    )
    p.add_argument(
        "--model", type=Path, required=True, help="export folder of a run (config.json + prompt.safetensors)"
    )
    p.add_argument(
        "--out", type=Path, required=True, help="new (or empty) folder for the personalised model and personalize.json"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fedprompt.client.personalize import CANDIDATES, GLOBAL, METHODS, PERSONALIZED, personalize_site

    report = personalize_site(args.site, args.model, args.out)
    rows = [(name, METHODS[name]) for name in CANDIDATES] + [(PERSONALIZED, "personalised (chosen)")]
    splits = [
        (title, report[name])
        for name, title in (
            ("cross_validation", f"train {report['folds']}-fold CV"),
            ("validation", "validation"),
            ("test", "local test"),
        )
        if report[name] is not None
    ]
    if splits:
        width = max(len(label) for _, label in rows)
        print(f"{'candidate'.ljust(width)}  " + "  ".join(f"{title + ' acc / macro-F1':>30}" for title, _ in splits))
        for key, label in rows:
            cells = (f"{m[key]['accuracy']:.3f} / {m[key]['macro_f1']:.3f}" for _, m in splits)
            print(f"{label.ljust(width)}  " + "  ".join(f"{c:>30}" for c in cells))
    penalty = "" if report["penalty"] is None else f" (penalty {report['penalty']:g})"
    how = (
        f"chosen by {report['folds']}-fold cross-validation on the train split (mean of accuracy and macro-F1)"
        if report["cross_validation"] is not None
        else "a single training record: nothing to cross-validate, the global model kept"
    )
    print(f"{report['hospital_id']}: {METHODS[report['method']]}{penalty}, {how}")
    if report["method"] == GLOBAL:
        print(f"the global model is unchanged; written to {args.out}")
    else:
        print(
            f"personalised model written to {args.out} (fitted on this site's records without differential privacy: "
            "keep it at this site)"
        )
    return 0
