"""A workspace: one federation and its hospitals' record files, laid out as on real sites.

    federation.yaml
    hospital-<id>/site.yaml, train.csv, val.csv
    hospital-<id>/test.csv  (optional: the hospital's own held-out set, to measure personalisation)
    test.csv              (optional: held-out set for the aggregator's reference evaluation)

A workspace is written whole into a temporary folder beside its target and renamed into place
(common/atomic.atomic_directory), so a reader never sees half of one, and an existing non-empty
folder is never overwritten.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from fedprompt.common.atomic import atomic_directory, atomic_write
from fedprompt.common.config import FederationConfig, PrivacyCap, SiteConfig, SiteLimits
from fedprompt.common.errors import InputError, Problem
from fedprompt.common.records import natural_key

Row = tuple[str, str]  # (text, label name)

FEDERATION_FILE = "federation.yaml"
SITE_FILE = "site.yaml"
TEST_FILE = "test.csv"
HOSPITAL_PREFIX = "hospital-"


def site_delta(n_train: int) -> float:
    """A delta well below 1/n (the usual DP requirement): 1/(10 n) rounded down to one
    significant digit, and never above 1e-5."""
    x = 1.0 / (10 * n_train)
    exponent = math.floor(math.log10(x))
    digit = math.floor(x / 10.0**exponent + 1e-9)  # the epsilon absorbs float error on exact powers
    return min(float(f"{digit}e{exponent}"), 1e-5)


def declared_weight(n_train: int) -> float:
    """The FedAvg weight a generated site.yaml declares: its training-set size to 1 significant
    digit (581 -> 600, 439 -> 400, 1002 -> 1000, 32 -> 30), an order of magnitude rather than a
    count. Declared once, in the site's file: the daemon sends this constant, never a count read
    from the records (docs/deployment.md section 5)."""
    return float(f"{n_train:.1g}")


def _merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in overrides.items():
        out[key] = _merge(out[key], value) if isinstance(value, Mapping) and isinstance(out.get(key), dict) else value
    return out


def _write_yaml(path: Path, header: str, data: dict[str, Any]) -> None:
    body = yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=False)
    atomic_write(path, f"# {header}\n{body}")


def _write_csv(path: Path, rows: Sequence[Row]) -> None:
    text = io.StringIO()
    # Fixed "\n" line ends: the same rows give byte-identical files on every platform.
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["text", "label"])
    writer.writerows(rows)
    atomic_write(path, text.getvalue())


def check_empty_target(out_dir: str | Path) -> Path:
    """The output folder must not exist yet or be empty: a workspace is never overwritten."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError.at(
            out, "output folder already exists and is not empty; refusing to overwrite it (choose a new --out)"
        )
    return out


def write_workspace(
    out_dir: str | Path,
    *,
    name: str,
    labels: list[str],
    hospitals: Mapping[str, tuple[Sequence[Row], Sequence[Row]]],
    test_rows: Sequence[Row] | None = None,
    local_tests: Mapping[str, Sequence[Row]] | None = None,
    federation_overrides: Mapping[str, Any] | None = None,
    epsilon_cap: float = 8.0,
    allow_non_private: bool = False,
    backbone: Path | None = None,
) -> Path:
    """Write a workspace; `hospitals` maps an id ("1") to its (train rows, validation rows),
    `local_tests` an id to that hospital's own held-out rows (written as its test.csv).

    Each site gets `max_epsilon: epsilon_cap` (default: docs/deployment.md's recommended lifetime
    cap, which the default federation's target of 8 per run spends in one run) and a delta below
    1/n_train. `allow_non_private` is for throwaway demo workspaces only. `backbone`: every site's
    local backbone directory (default: the embedded one). Returns the workspace path.
    """
    out = check_empty_target(out_dir)
    empty = [hid for hid, (train, _) in hospitals.items() if not train]
    if empty:
        raise ValueError(f"hospitals without training rows: {empty}")
    local_tests = local_tests or {}
    strangers = sorted(set(local_tests) - set(hospitals))
    if strangers:
        raise ValueError(f"local test rows for unknown hospitals: {strangers}")
    row_sets = [rows for pair in hospitals.values() for rows in pair] + [test_rows or [], *local_tests.values()]
    bad = {label for rows in row_sets for _, label in rows} - set(labels)
    if bad:
        raise ValueError(f"rows with labels outside the label space: {sorted(bad)}")
    federation = FederationConfig(name=name, labels=list(labels), min_hospitals=len(hospitals)).model_dump(mode="json")
    federation = _merge(federation, federation_overrides or {})
    fed = FederationConfig.model_validate(federation)

    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_directory(out) as tmp:
        _write_yaml(
            tmp / FEDERATION_FILE,
            "Federation (aggregator side). Edit the knobs below; `fedprompt data check` validates.",
            federation,
        )
        if test_rows:
            _write_csv(tmp / TEST_FILE, test_rows)
        for hid, (train, val) in hospitals.items():
            folder = tmp / f"{HOSPITAL_PREFIX}{hid}"
            folder.mkdir()
            _write_csv(folder / "train.csv", train)
            if val:
                _write_csv(folder / "val.csv", val)
            local = local_tests.get(hid)
            if local:
                _write_csv(folder / TEST_FILE, local)
            site = SiteConfig(
                hospital_id=f"{HOSPITAL_PREFIX}{hid}",
                train=Path("train.csv"),
                validation=Path("val.csv") if val else None,
                test=Path(TEST_FILE) if local else None,
                privacy=PrivacyCap(max_epsilon=epsilon_cap, delta=site_delta(len(train))),
                ledger=Path("ledger/privacy-ledger.json"),
                allow_non_private=allow_non_private,
                weight=declared_weight(len(train)),
                backbone=backbone,
                # One author writes the federation and its sites: they pin its label space and admit its
                # plan (SiteLimits.admitting).
                labels=fed.label_names,
                limits=SiteLimits.admitting(fed),
            )
            _write_yaml(
                folder / SITE_FILE,
                "Hospital site config: its own privacy cap wins over the aggregator's requests.",
                site.model_dump(mode="json"),
            )
        load_workspace(tmp)  # what we wrote must load: fail here, not at the first training round
    return out


def create_ledgers(workspace: str | Path) -> list[str]:
    """Create the privacy ledgers of a workspace's sites that have none yet (each one's `privacy
    init`); the hospital ids whose ledger was created. Only for a workspace written moments ago
    by the same command (`data demo`, `data partition`, `simulate`'s fresh demo) or by a test:
    anywhere else a missing ledger may be a LOST one, which is never replaced (`fedprompt
    simulate` and the hospital daemon refuse to run without it)."""
    # numpy only, and only here: the other `data` commands start without it
    from fedprompt.client.ledger import PrivacyLedger

    _, sites, _ = load_workspace(workspace)
    created = []
    for site in sites:
        if not os.path.lexists(site.ledger):
            PrivacyLedger.create_for_site(site)
            created.append(site.hospital_id)
    return created


def list_hospitals(workspace: str | Path) -> list[Path]:
    """The workspace's site.yaml files, in natural order of hospital id (hospital-2 < hospital-10)."""
    return sorted(Path(workspace).glob(f"{HOSPITAL_PREFIX}*/{SITE_FILE}"), key=lambda p: natural_key(p.parent.name))


def load_workspace(workspace: str | Path) -> tuple[FederationConfig, list[SiteConfig], Path | None]:
    """(federation, sites in hospital order, test.csv or None); InputError lists every problem."""
    workspace = Path(workspace)
    if not workspace.is_dir():
        raise InputError.at(workspace, "workspace folder not found" if not workspace.exists() else "not a folder")
    problems: list[Problem] = []
    federation = None
    try:
        federation = FederationConfig.load(workspace / FEDERATION_FILE)
    except InputError as exc:
        problems += exc.problems
    site_files = list_hospitals(workspace)
    if not site_files:
        problems.append(
            Problem(str(workspace), None, None, f"no {HOSPITAL_PREFIX}*/{SITE_FILE} found in the workspace")
        )
    sites: list[SiteConfig] = []
    seen: dict[str, Path] = {}
    for path in site_files:
        try:
            site = SiteConfig.load(path)
        except InputError as exc:
            problems += exc.problems
            continue
        if site.hospital_id in seen:
            problems.append(
                Problem(
                    str(path), None, "hospital_id", f"{site.hospital_id!r} is also used by {seen[site.hospital_id]}"
                )
            )
        seen[site.hospital_id] = path
        sites.append(site)
    if problems:
        raise InputError(problems)
    assert federation is not None  # or its problems were raised above
    test = workspace / TEST_FILE
    return federation, sites, (test.resolve() if test.is_file() else None)


def label_table(
    labels: list[str],
    hospitals: Mapping[str, tuple[Sequence[Row], Sequence[Row]]],
    test_rows: Sequence[Row] | None,
    local_tests: Mapping[str, Sequence[Row]] | None = None,
) -> str:
    """Per-label counts: one column per hospital (train/val, plus /local test when there are
    local tests) and one for the test set."""
    local_tests = local_tests or {}
    local = any(local_tests.values())
    columns: list[tuple[str, list[Sequence[Row]]]] = [
        (f"{HOSPITAL_PREFIX}{hid}", [tr, va, *([local_tests.get(hid, [])] if local else [])])
        for hid, (tr, va) in hospitals.items()
    ]
    if test_rows:
        columns.append(("test", [test_rows]))

    def cell(parts: list[Sequence[Row]], label: str | None) -> str:
        return "/".join(str(sum(1 for _, y in part if label is None or y == label)) for part in parts)

    header = ["label", *(c for c, _ in columns)]
    body = [[label, *(cell(parts, label) for _, parts in columns)] for label in labels]
    body.append(["total", *(cell(parts, None) for _, parts in columns)])
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in [header, *body]
    ]
    return "\n".join(lines) + f"\n(hospital columns: train/val{'/local test' if local else ''})"
