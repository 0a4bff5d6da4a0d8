"""`fedprompt data`: prepare demo or real hospital data, download the public corpus, check a site.

Light imports only (no torch/transformers): these commands must start fast.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from fedprompt.client import demo_data, download, partition
from fedprompt.client.workspace import (
    FEDERATION_FILE,
    TEST_FILE,
    check_empty_target,
    create_ledgers,
    label_table,
    write_workspace,
)
from fedprompt.common.config import FederationConfig, SiteConfig
from fedprompt.common.errors import InputError, LedgerError, Problem
from fedprompt.common.records import Records, find_duplicates, load_labelled, load_records, natural_key


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {text}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="prepare demo or real hospital data; check a site's records")
    sub = parser.add_subparsers(dest="data_command", required=True, metavar="ACTION")

    p = sub.add_parser("demo", help="write a workspace of synthetic clinical notes (label-skewed hospitals)")
    p.add_argument("--hospitals", type=_positive_int, default=3)
    p.add_argument("--out", type=Path, required=True, help="new (or empty) workspace folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--per-hospital",
        type=_positive_int,
        default=demo_data.PER_HOSPITAL,
        help="notes per hospital, split 80/20 train/validation (plus 40 more held out as its local test.csv)",
    )
    p.set_defaults(func=run_demo)

    p = sub.add_parser(
        "partition", help="split a real labelled corpus into a held-out test set and label-skewed hospitals"
    )
    p.add_argument("--input", type=Path, required=True, help="CSV or JSONL corpus")
    p.add_argument("--text-column", required=True)
    p.add_argument("--label-column", required=True)
    p.add_argument("--label-names", type=Path, help="CSV mapping label values (first column) to names (second column)")
    p.add_argument("--hospitals", type=_positive_int, default=3)
    p.add_argument(
        "--alpha", type=_positive_float, default=0.5, help="Dirichlet concentration: smaller = more label skew"
    )
    p.add_argument("--test-frac", type=_fraction, default=0.2)
    p.add_argument(
        "--val-frac", type=_fraction, default=0.2, help="fraction of each hospital's rows held for validation"
    )
    p.add_argument(
        "--local-test-frac",
        type=_fraction,
        default=0.2,
        help=(
            "fraction of each hospital's rows held out as its own test set (hospital-N/test.csv), to measure "
            "personalisation"
        ),
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", help="federation name (default: the --out folder's name)")
    p.add_argument("--out", type=Path, required=True, help="new (or empty) workspace folder")
    p.set_defaults(func=run_partition)

    p = sub.add_parser("download", help="download a public corpus (checks its published sha256)")
    p.add_argument("corpus", choices=["medical-abstracts"])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--source", default=download.DEFAULT_SOURCE, help="URL base (or local folder) holding the files")
    p.set_defaults(func=run_download)

    p = sub.add_parser("check", help="validate a site config, its record files and its ledger, without training")
    p.add_argument("--site", type=Path, required=True, help="the hospital's site.yaml")
    p.add_argument(
        "--federation",
        type=Path,
        help="the aggregator's federation.yaml: also check the labels against its label space "
        "(default: ../federation.yaml if the site is in a workspace; without one the labels are not checked)",
    )
    p.set_defaults(func=run_check)


def run_demo(args: argparse.Namespace) -> int:
    demo = demo_data.generate_demo(hospitals=args.hospitals, per_hospital=args.per_hospital, seed=args.seed)
    out = demo_data.write_demo_workspace(args.out, demo)
    print(label_table(demo.labels, demo.hospitals, demo.test, demo.local_tests))
    print(f"demo workspace written to {out}")
    _create_ledgers(out)
    return 0


def _create_ledgers(workspace: Path) -> None:
    """The new workspace's sites get their ledgers now (each one's `privacy init`): `fedprompt
    simulate --workspace` runs right after `data demo` or `data partition`."""
    created = create_ledgers(workspace)
    print(
        f"privacy ledgers created for {', '.join(created)} (each site's ledger/privacy-ledger.json; "
        "`fedprompt privacy show --site hospital-N/site.yaml`)"
    )


def run_partition(args: argparse.Namespace) -> int:
    if args.val_frac + args.local_test_frac >= 1:
        raise InputError.at(
            "--local-test-frac",
            f"--val-frac {args.val_frac} + --local-test-frac {args.local_test_frac} leaves no training rows (their "
            "sum must be below 1)",
        )
    check_empty_target(args.out)  # before reading a large corpus, not after
    records, labels = partition.load_corpus(
        args.input, text_column=args.text_column, label_column=args.label_column, label_names=args.label_names
    )
    # Reported before the split: a hospital wants to know what its corpus repeats before it trains.
    duplicates = find_duplicates([(records, labels)])
    split = partition.partition(
        records,
        labels,
        hospitals=args.hospitals,
        alpha=args.alpha,
        test_frac=args.test_frac,
        val_frac=args.val_frac,
        seed=args.seed,
        local_test_frac=args.local_test_frac,
    )
    out = write_workspace(
        args.out,
        name=args.name or args.out.resolve().name,
        labels=split.labels,
        hospitals=split.hospitals,
        test_rows=split.test,
        local_tests=split.local_tests,
    )
    print(label_table(split.labels, split.hospitals, split.test, split.local_tests))
    for line in duplicates.report():
        print(line)
    if split.dropped_rows:
        print(f"left out of the split: the {split.dropped_rows} rows of the conflicting records")
    if len(duplicates.groups) > split.conflicting_texts:
        print("every other repeated text has all its copies on one side (the same hospital and split, or the test set)")
    used = len(records) - split.dropped_rows
    print(f"workspace written to {out} ({used} of {len(records)} rows from {args.input})")
    _create_ledgers(out)
    return 0


def run_download(args: argparse.Namespace) -> int:
    for f in download.download_medical_abstracts(args.out, source=args.source):
        print(f"{f.status:10} {f.name}  {f.sha256 or ''} {f.detail}".rstrip())
    return 0


def _load_splits(
    site: SiteConfig, space: list[str] | None, problems: list[Problem]
) -> tuple[dict[str, Records], dict[str, list[str]]]:
    """The site's record files that load, and each split's label names (the label space, or else
    those the file holds); each file's problems appended."""
    loaded: dict[str, Records] = {}
    names: dict[str, list[str]] = {}
    for split, path in (("train", site.train), ("validation", site.validation), ("test", site.test)):
        if path is not None:
            # The patient field is what training reads: checked on the training records.
            patient_field = site.patient_field if split == "train" else None
            try:
                if space is None:
                    loaded[split], names[split] = load_labelled(
                        path, text_field=site.text_field, label_field=site.label_field, patient_field=patient_field
                    )
                else:
                    names[split] = space
                    loaded[split] = load_records(
                        path,
                        text_field=site.text_field,
                        label_field=site.label_field,
                        labels=space,
                        patient_field=patient_field,
                    )
            except InputError as exc:
                problems += exc.problems
    return loaded, names


def _print_counts(
    site: SiteConfig, loaded: dict[str, Records], names: dict[str, list[str]], space: list[str] | None
) -> None:
    """The records per label and split, a total last."""
    labels = space if space is not None else sorted({n for v in names.values() for n in v}, key=natural_key)
    counts = {s: dict(zip(names[s], r.counts(len(names[s])), strict=True)) for s, r in loaded.items()}
    width = max(map(len, [*labels, "total"]))
    print(f"{site.hospital_id}: {site.source}")
    print(f"{'label'.ljust(width)}  " + "  ".join(f"{s:>10}" for s in loaded))
    for label in labels:
        print(f"{label.ljust(width)}  " + "  ".join(f"{counts[s].get(label, 0):>10}" for s in loaded))
    print(f"{'total'.ljust(width)}  " + "  ".join(f"{len(r):>10}" for r in loaded.values()))


def run_check(args: argparse.Namespace) -> int:
    site = SiteConfig.load(args.site)
    federation_path = args.federation
    if federation_path is None:  # a workspace (`data demo` / `data partition`) keeps it above hospital-N/
        assert site.source is not None  # loaded from a file
        beside = site.source.parent.parent / "federation.yaml"
        federation_path = beside if beside.is_file() else None
    federation = None if federation_path is None else FederationConfig.load(federation_path)
    problems: list[Problem] = []
    # The label space: the federation's, else the one pinned in site.yaml (what a plan must match).
    space = federation.label_names if federation is not None else site.labels
    problems += _pin_problems(site, federation)
    loaded, names = _load_splits(site, space, problems)
    n_train = len(loaded["train"]) if "train" in loaded else None
    unit = "training records"
    if n_train and loaded["train"].patients is not None:  # patient-level DP: the patient is the unit
        n_train, unit = len(set(loaded["train"].patients)), "patients"
    if site.patient_field is not None and federation is not None and _input_prompt_trained(federation):
        from fedprompt.client.trainer import PATIENT_INPUT_PROMPT

        problems.append(Problem(str(site.source), None, "patient_field", PATIENT_INPUT_PROMPT))
    # DP's delta must stay well below 1/n, or disclosing one whole record fits inside the guarantee.
    if n_train and site.privacy.delta >= 1 / n_train:
        problems.append(
            Problem(
                str(site.source), None, "privacy.delta", f"{site.privacy.delta} is not below 1/n = 1/{n_train} {unit}"
            )
        )
    if site.backbone is not None and not (site.backbone / "config.json").is_file():
        problems.append(
            Problem(str(site.source), None, "backbone", f"{site.backbone} is not a model directory (no config.json)")
        )
    # In a workspace (`data demo`/`data partition`) the federation's held-out test set sits beside
    # federation.yaml, read as the aggregator reads it (server/federation.py): a training text also
    # in it is a leak too. A hospital that was only handed federation.yaml has no such file.
    files = [(r, names[s]) for s, r in loaded.items()]
    assert site.source is not None  # loaded from a file
    workspace = site.source.parent.parent
    test_path = workspace / TEST_FILE
    in_workspace = federation_path is not None and federation_path.resolve() == workspace / FEDERATION_FILE
    if federation is not None and in_workspace and test_path.is_file():
        try:
            test = load_records(test_path, text_field="text", label_field="label", labels=federation.label_names)
            files.append((test, federation.label_names))
        except InputError as exc:
            problems += exc.problems
    ledger = _check_ledger(site, problems)
    if problems:
        raise InputError(problems)
    duplicates = find_duplicates(files)
    warnings = duplicates.report()
    if "train" in loaded:
        train = loaded["train"].path
        warnings += duplicates.leak_report([train], [r.path for r, _ in files if r.path != train])
    _print_counts(site, loaded, names, space)
    if unit == "patients":
        print(f"patients (train, the DP unit: {site.patient_field})  {n_train}")
    print(ledger)
    _print_checked(site, federation)
    for line in warnings:
        print(line)
    print("ok")  # warnings are not errors: the records are valid, and the data manager decides
    return 0


def _check_ledger(site: SiteConfig, problems: list[Problem]) -> str:
    """The site's privacy ledger, opened as the daemon opens it before every round (if it exists
    yet: `data check` comes before `privacy init`); a line to print, or the problem appended."""
    if not os.path.lexists(site.ledger):
        return (
            "ledger: not created yet; create it once in the life of the site: fedprompt privacy init --site "
            f"{site.source} (never re-create a lost ledger on a site that has trained: restore it from backup)"
        )
    from fedprompt.client.ledger import PrivacyLedger  # numpy only; the epsilon (opacus) is `privacy show`'s job

    try:
        entries = len(PrivacyLedger.for_site(site).history)
    except LedgerError as exc:
        problems.append(Problem(str(site.ledger), None, "ledger", str(exc)))
        return ""
    except InputError as exc:
        problems += exc.problems
        return ""
    return f"ledger: {site.ledger}: {entries} round(s) recorded; lifetime cap epsilon {site.privacy.max_epsilon:g}"


def _pin_problems(site: SiteConfig, federation: FederationConfig | None) -> list[Problem]:
    """A label space pinned in site.yaml that is not the federation's: its every plan would be refused."""
    if federation is None or site.labels is None or site.labels == federation.label_names:
        return []
    return [
        Problem(
            str(site.source),
            None,
            "labels",
            f"pinned {site.labels}, but {federation.source} has the label space {federation.label_names}: "
            "every plan of that federation would be refused (pin it with `fedprompt hospital labels`)",
        )
    ]


def _print_checked(site: SiteConfig, federation: FederationConfig | None) -> None:
    """Which label space the labels were checked against, and what could not be checked without one."""
    if federation is not None:
        print(f"labels checked against the label space of {federation.source}")
    elif site.labels is not None:
        print(f"labels checked against the label space pinned in {site.source}")
    unchecked = []
    if federation is None and site.labels is None:
        unchecked.append("the labels above against the federation's label space")
    if federation is None and site.patient_field is not None:
        unchecked.append("patient_field against the federation's recipe (a trained input prompt)")
    if unchecked:
        print(
            f"not checked: {', and '.join(unchecked)}: pass --federation FILE (the aggregator's federation.yaml; it "
            "holds no secrets)"
        )


def _input_prompt_trained(federation: FederationConfig) -> bool:
    """Whether the federation may train a prompt at the input (patient-level DP cannot: trainer.py)."""
    return federation.training.train_prompt is not False and federation.model.prompt_layer == 0
