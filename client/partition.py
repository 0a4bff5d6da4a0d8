"""Split a real labelled corpus into a federation: a stratified held-out test set, then the rest
over hospitals with Dirichlet(alpha) label skew (small alpha: each hospital sees few classes, as
a cancer centre and a cardiology clinic would), each hospital's rows split into train /
validation / local test. Every row is used at most once; same seed, same split.

Repeated texts (same text after whitespace normalisation) never leak: all copies of a text go to
the same side (test, or one hospital's train, validation or local test). A text read under two
or more labels is dropped from the split, all its copies (Partition.dropped_rows).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fedprompt.common.errors import InputError, Problem
from fedprompt.common.records import Records, csv_rows, load_labelled, load_records, read_text, text_groups

from .workspace import Row

MAX_DRAWS = 1000  # Dirichlet redraws before giving up on the minimum hospital size


def read_label_names(path: str | Path) -> dict[str, str]:
    """A CSV mapping label values to names: first column the value, second the name (header row)."""
    path = Path(path)
    text = read_text(path)
    problems: list[Problem] = []
    mapping: dict[str, str] = {}
    rows = csv_rows(path, text)
    first = next(rows, None)
    if first is None:
        raise InputError.at(path, "empty file (expected a header row, then one 'value,name' row per label)")
    header_line, header = first
    if len(header) < 2:
        raise InputError.at(
            path, f"expected two columns (label value, label name), got {len(header)}", line=header_line
        )
    for line, row in rows:
        value, name = (cell.strip() for cell in (row + ["", ""])[:2])
        if not value or not name:
            problems.append(Problem(str(path), line, None, "expected a label value and a name"))
        elif value in mapping:
            problems.append(Problem(str(path), line, None, f"label value {value!r} is mapped twice"))
        elif name in mapping.values():
            problems.append(Problem(str(path), line, None, f"label name {name!r} is used twice"))
        else:
            mapping[value] = name
    if problems:
        raise InputError(problems)
    if len(mapping) < 2:
        raise InputError.at(path, f"expected at least 2 labels, got {len(mapping)}")
    return mapping


def _apportion(total: int, weights: Sequence[float]) -> list[int]:
    """Integer shares of `total` proportional to `weights`, summing exactly to `total`
    (largest remainder; ties to the lower index)."""
    s = sum(weights)
    if total == 0:
        return [0] * len(weights)
    exact = [total * w / s for w in weights]
    out = [int(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(exact[i] - out[i]), i))
    for i in by_remainder[: total - sum(out)]:
        out[i] += 1
    return out


def _stratified_take(
    rng: random.Random, indices_by_class: list[list[int]], n: int
) -> tuple[list[int], list[list[int]]]:
    """Take `n` indices with each class in proportion; return them and what is left per class."""
    quota = _apportion(n, [len(ix) for ix in indices_by_class])
    taken: list[int] = []
    rest: list[list[int]] = []
    for ix, q in zip(indices_by_class, quota, strict=True):
        ix = list(ix)
        rng.shuffle(ix)
        taken += ix[:q]
        rest.append(ix[q:])
    rng.shuffle(taken)
    return taken, rest


def stratified_subset(records: Records, n: int, seed: int) -> Records:
    """`n` rows with every class in proportion, in corpus order (all rows when n >= len): a
    smaller corpus with the same label mix, for quick runs."""
    if n >= len(records):
        return records
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(records.labels):
        by_class.setdefault(y, []).append(i)
    taken, _ = _stratified_take(random.Random(seed), [by_class[c] for c in sorted(by_class)], n)
    keep = sorted(taken)
    return Records([records.texts[i] for i in keep], [records.labels[i] for i in keep], records.path)


@dataclass
class Partition:
    labels: list[str]  # label names, the federation's label space
    hospitals: dict[str, tuple[list[Row], list[Row]]]  # id -> (train, validation)
    test: list[Row]
    # id -> the hospital's own held-out rows (same label mix as its train rows), for measuring
    # personalisation where it happens; empty lists when local_test_frac is 0.
    local_tests: dict[str, list[Row]] = field(default_factory=dict)
    conflicting_texts: int = 0  # texts read under two or more labels: left out of the split
    dropped_rows: int = 0  # their rows


def load_corpus(
    path: str | Path, *, text_column: str, label_column: str, label_names: str | Path | None
) -> tuple[Records, list[str]]:
    """The corpus and its label names (in the mapping file's order, or the sorted distinct values)."""
    if label_names is None:
        return load_labelled(path, text_field=text_column, label_field=label_column)
    mapping = read_label_names(label_names)
    records = load_records(path, text_field=text_column, label_field=label_column, labels=list(mapping))
    return records, list(mapping.values())


def partition(
    records: Records,
    labels: list[str],
    *,
    hospitals: int,
    alpha: float,
    test_frac: float,
    val_frac: float,
    seed: int,
    min_train: int = 20,
    local_test_frac: float = 0.0,
) -> Partition:
    """Held-out stratified test set (round(test_frac * n) rows), then Dirichlet(alpha) label skew
    over `hospitals`, redrawn until each has `min_train` training rows; each hospital's own rows
    are split stratified into validation (`val_frac` of them), local test (`local_test_frac` of
    them, taken after validation) and train (the rest).

    Sizes and draws count distinct texts; each text's copies follow it (module docstring). On a
    corpus without repeated texts, with local_test_frac 0 no random draw is added, so the split is
    exactly the one made before local tests and duplicate handling existed (same seed, same rows)."""
    if not (0 <= val_frac < 1 and 0 <= local_test_frac < 1 and val_frac + local_test_frac < 1):
        raise ValueError(
            f"need val_frac, local_test_frac >= 0 with val_frac + local_test_frac < 1, got {val_frac} and "
            f"{local_test_frac}"
        )
    rng = random.Random(seed)
    groups = text_groups(records.texts)
    kept = [g for g in groups if len({records.labels[i] for i in g}) == 1]
    # A text's first row stands for all its copies: the draws below are over distinct texts.
    copies = {g[0]: g for g in kept}
    by_class = [[g[0] for g in kept if records.labels[g[0]] == c] for c in range(len(labels))]
    test_ix, pool = _stratified_take(rng, by_class, round(test_frac * len(kept)))

    for _ in range(MAX_DRAWS):
        shares = [_apportion(len(ix), [rng.gammavariate(alpha, 1.0) + 1e-12 for _ in range(hospitals)]) for ix in pool]
        sizes = [sum(s[h] for s in shares) for h in range(hospitals)]
        if all(size - round(val_frac * size) - round(local_test_frac * size) >= min_train for size in sizes):
            break
    else:
        raise InputError.at(
            records.path,
            f"{sum(map(len, pool))} distinct texts outside the test set cannot give each of {hospitals} hospitals "
            f"{min_train} training rows at alpha {alpha} (tried {MAX_DRAWS} draws): raise --alpha, "
            "lower --hospitals, --test-frac or --local-test-frac",
        )

    def rows(ix: list[int]) -> list[Row]:
        return [(records.texts[j], labels[records.labels[j]]) for i in ix for j in copies[i]]

    sites: dict[str, tuple[list[Row], list[Row]]] = {}
    local_tests: dict[str, list[Row]] = {}
    starts = [0] * len(pool)
    for h in range(hospitals):
        mine = []
        for c, ix in enumerate(pool):
            mine.append(ix[starts[c] : starts[c] + shares[c][h]])
            starts[c] += shares[c][h]
        size = sum(map(len, mine))
        val_ix, train_by_class = _stratified_take(rng, mine, round(val_frac * size))
        local_ix: list[int] = []
        if local_test_frac > 0:  # no draw at 0: keeps the split of the code before local tests
            local_ix, train_by_class = _stratified_take(rng, train_by_class, round(local_test_frac * size))
        train_ix = [i for ix in train_by_class for i in ix]
        rng.shuffle(train_ix)
        sites[str(h + 1)] = (rows(train_ix), rows(val_ix))
        local_tests[str(h + 1)] = rows(local_ix)
    conflicting = len(groups) - len(kept)
    dropped = len(records) - sum(map(len, kept))
    return Partition(list(labels), sites, rows(test_ix), local_tests, conflicting, dropped)
