"""Labelled records (CSV or JSONL): a hospital's, or the aggregator's test set, validated strictly
before anything is trained or evaluated.

Every defect of a file is reported at once with `path:line: field: message`, so a data manager
fixes the file in one pass. Line numbers are physical lines: a CSV record whose quoted text spans
several lines is reported at the line where it starts.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from .errors import InputError, Problem

FORMATS = (".csv", ".jsonl")


@dataclass
class Records:
    texts: list[str]
    labels: list[int]  # index into the federation's label space
    path: Path
    patients: list[str] | None = None  # each record's patient id (site.yaml: patient_field), if asked for
    lines: list[int] | None = None  # each record's line in its file (as read from one; None when built in memory)

    def __len__(self) -> int:
        return len(self.texts)

    def counts(self, n_labels: int) -> list[int]:
        out = [0] * n_labels
        for y in self.labels:
            out[y] += 1
        return out


@dataclass(frozen=True)
class _Row:
    line: int
    text: str
    label: str
    patient: str | None = None


@dataclass(frozen=True)
class RecordProblem(Problem):
    """A problem whose message quotes a value read from a record (its text, a label outside the
    label space, a patient id): `withheld` is the same message without it, for logs (redacted())."""

    value: str = ""
    withheld: str = ""

    def redacted(self) -> str:
        # No hash of the value either: label names and patient ids come from small vocabularies, so
        # a short hash of one is reversed by hashing the candidates.
        return str(replace(self, message=f"{self.withheld} [value withheld from this log]"))


def redacted(error: InputError) -> str:
    """An InputError's text for a log that must not hold record values (a hospital's daemon log):
    file, line, field and what is wrong, never the text, label or patient id read. The operator sees
    the values with `fedprompt data check`, at their own terminal."""
    lines = [p.redacted() if isinstance(p, RecordProblem) else str(p) for p in error.problems]
    if error.omitted:
        lines.append(f"... and {error.omitted} more problem(s) not shown")
    return "\n".join(lines)


class _Problems:
    """Collects problems up to a limit and counts the rest."""

    def __init__(self, path: Path, limit: int):
        self.path, self.limit, self.omitted = str(path), limit, 0
        self.items: list[Problem] = []

    def add(
        self, line: int | None, field: str | None, message: str, *, value: str | None = None, withheld: str = ""
    ) -> None:
        """`value`: what `message` quotes from a record; `withheld`: the message without it."""
        if len(self.items) >= self.limit:
            self.omitted += 1
        elif value is None:
            self.items.append(Problem(self.path, line, field, message))
        else:
            self.items.append(RecordProblem(self.path, line, field, message, value, withheld))

    def raise_any(self) -> None:
        if self.items:
            raise InputError(self.items, omitted=self.omitted)


def natural_key(s: str) -> list[int | str]:
    """Sort key putting 'hospital-2' before 'hospital-10' and '2' before '10'."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", s)]


def describe_labels(labels: list[str], limit: int = 160) -> str:
    """The label space for an error message, truncated so one message stays one line."""
    out = ""
    for i, name in enumerate(labels):
        piece = name if i == 0 else f", {name}"
        if len(out) + len(piece) > limit:
            return f"{out}, ... ({len(labels)} labels in all)"
        out += piece
    return out


def read_text(path: str | Path, *, max_problems: int = 20) -> str:
    """A record file's text: must be a regular, non-binary UTF-8 file. A BOM is dropped."""
    path = Path(path)
    if not path.exists():
        raise InputError.at(path, "file not found")
    if not path.is_file():
        raise InputError.at(path, "not a regular file")
    data = path.read_bytes()
    if b"\0" in data:
        line = data.count(b"\n", 0, data.index(b"\0")) + 1
        raise InputError.at(path, "binary file (NUL byte); expected UTF-8 text (CSV or JSONL)", line=line)
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError:
        pass
    # Report every bad line. Splitting on b"\n" is safe: no UTF-8 multi-byte sequence holds it.
    problems = _Problems(path, max_problems)
    for number, raw in enumerate(data.split(b"\n"), 1):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            problems.add(
                number,
                None,
                f"not UTF-8 text (byte 0x{raw[exc.start]:02x}, byte {exc.start + 1} of the line); save the file as "
                "UTF-8",
            )
    raise InputError(problems.items, omitted=problems.omitted)


def csv_rows(path: str | Path, text: str) -> Iterator[tuple[int, list[str]]]:
    """(start line, fields) of each non-blank CSV record; InputError on a syntax error."""
    # Long texts are fine (the tokenizer truncates); the csv module's 128 KiB field cap is not.
    # The limit is process-wide, so it is only ever raised, never lowered.
    csv.field_size_limit(max(csv.field_size_limit(), len(text)))
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    start = 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            message = str(exc)
            if "unexpected end of data" in message:
                message = "unterminated quoted field (it runs to the end of the file)"
            raise InputError.at(path, f"CSV syntax error: {message}", line=start) from None
        if any(cell.strip() for cell in row):
            yield start, row
        start = reader.line_num + 1


def _csv(
    path: Path, text: str, text_field: str, label_field: str, problems: _Problems, patient_field: str | None = None
) -> Iterator[_Row]:
    rows_in = csv_rows(path, text)
    try:
        first = next(rows_in, None)
        if first is None:
            return  # blank file: reported by the caller
        header_line, header = first
        found = ", ".join(repr(c) for c in header)
        for name in dict.fromkeys(f for f in (text_field, label_field, patient_field) if f is not None):
            if name not in header:
                problems.add(header_line, name, f"missing column (found columns: {found})")
            elif header.count(name) > 1:
                problems.add(header_line, name, "column appears more than once in the header")
        if problems.items:
            return
        ti, li = header.index(text_field), header.index(label_field)
        pi = None if patient_field is None else header.index(patient_field)
        for line, row in rows_in:
            if len(row) != len(header):
                problems.add(line, None, f"expected {len(header)} fields (as in the header), got {len(row)}")
                continue
            yield _Row(line, row[ti], row[li], None if pi is None else row[pi])
    except InputError as exc:  # a CSV syntax error ends the parse; keep what was found before it
        for p in exc.problems:
            problems.add(p.line, p.field, p.message)


def _jsonl(
    text: str, text_field: str, label_field: str, problems: _Problems, patient_field: str | None = None
) -> Iterator[_Row]:
    # Only "\n" ends a record: JSON strings may hold other Unicode line separators.
    for line, raw in enumerate(text.split("\n"), 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            problems.add(line, None, f"malformed JSON: {exc.msg} (column {exc.colno})")
            continue
        if not isinstance(obj, dict):
            problems.add(line, None, f"expected a JSON object, got {type(obj).__name__}")
            continue
        missing = [
            name
            for name in dict.fromkeys(f for f in (text_field, label_field, patient_field) if f is not None)
            if name not in obj
        ]
        for name in missing:
            found = ", ".join(repr(k) for k in obj) or "none"
            problems.add(line, name, f"missing field (found fields: {found})", value=found, withheld="missing field")
        if missing:
            continue
        text, label = obj[text_field], obj[label_field]
        if not isinstance(text, str):
            shown = json.dumps(text)[:40]
            problems.add(line, text_field, f"expected a string, got {shown}", value=shown, withheld="expected a string")
            continue
        # An integer label is read as its digits: accepted only where that equals a label name.
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            shown = json.dumps(label)[:40]
            problems.add(
                line, label_field, f"expected a string, got {shown}", value=shown, withheld="expected a string"
            )
            continue
        patient = None
        if patient_field is not None:
            patient = obj[patient_field]
            if isinstance(patient, bool) or not isinstance(patient, (str, int)):
                shown = json.dumps(patient)[:40]
                problems.add(
                    line,
                    patient_field,
                    f"expected a patient id (string or integer), got {shown}",
                    value=shown,
                    withheld="expected a patient id (string or integer)",
                )
                continue
            patient = str(patient)
        yield _Row(line, text, str(label), patient)


def _read_rows(
    path: Path,
    text_field: str,
    label_field: str,
    labels: list[str] | None,
    max_problems: int,
    patient_field: str | None = None,
) -> list[_Row]:
    """Rows with a non-empty text and a label (from `labels` if given), and a non-empty patient id
    if `patient_field` is given; InputError lists every problem."""
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise InputError.at(path, f"unsupported file type {suffix or '(none)'!r} (expected {' or '.join(FORMATS)})")
    text = read_text(path, max_problems=max_problems)
    if not text.strip():
        expected = (
            f"a header row with columns {text_field!r} and {label_field!r}"
            if suffix == ".csv"
            else "one JSON object per line"
        )
        raise InputError.at(path, f"empty file (expected {expected})")
    problems = _Problems(path, max_problems)
    parsed = (
        _csv(path, text, text_field, label_field, problems, patient_field)
        if suffix == ".csv"
        else _jsonl(text, text_field, label_field, problems, patient_field)
    )
    known = set(labels or ())
    rows = []
    for row in parsed:
        label, ok = row.label.strip(), True
        if not row.text.strip():
            problems.add(row.line, text_field, "empty text")
            ok = False
        if not label:
            problems.add(row.line, label_field, "empty label")
            ok = False
        elif labels is not None and label not in known:
            expected = f"(expected one of: {describe_labels(labels)})"
            problems.add(
                row.line,
                label_field,
                f"unknown label {label!r} {expected}",
                value=label,
                withheld=f"unknown label {expected}",
            )
            ok = False
        patient = None if patient_field is None else (row.patient or "").strip()
        if patient_field is not None and not patient:
            problems.add(row.line, patient_field, "empty patient id (patient-level DP needs every record's patient)")
            ok = False
        if ok:
            rows.append(_Row(row.line, row.text, label, patient))
    problems.raise_any()
    if not rows:
        what = "the file has a header but no rows" if suffix == ".csv" else "the file has no JSON lines"
        raise InputError.at(path, f"no records: {what}")
    return rows


def _patients(rows: list[_Row]) -> list[str]:
    # Read with a patient field, every row names its patient (_read_rows refuses one that does not).
    return [r.patient for r in rows if r.patient is not None]


def load_records(
    path: str | Path,
    *,
    text_field: str,
    label_field: str,
    labels: list[str],
    max_problems: int = 20,
    patient_field: str | None = None,
) -> Records:
    """Load and validate a record file; each label must be a name from `labels` (exact match).
    With `patient_field`, every record must name its patient (Records.patients)."""
    path = Path(path)
    rows = _read_rows(path, text_field, label_field, labels, max_problems, patient_field)
    index = {name: i for i, name in enumerate(labels)}
    patients = None if patient_field is None else _patients(rows)
    return Records([r.text for r in rows], [index[r.label] for r in rows], path, patients, [r.line for r in rows])


def load_labelled(
    path: str | Path, *, text_field: str, label_field: str, max_problems: int = 20, patient_field: str | None = None
) -> tuple[Records, list[str]]:
    """Load a corpus whose label space is whatever it holds: its distinct labels, naturally sorted."""
    path = Path(path)
    rows = _read_rows(path, text_field, label_field, None, max_problems, patient_field)
    labels = sorted({r.label for r in rows}, key=natural_key)
    index = {name: i for i, name in enumerate(labels)}
    patients = None if patient_field is None else _patients(rows)
    records = Records([r.text for r in rows], [index[r.label] for r in rows], path, patients, [r.line for r in rows])
    return records, labels


# --- duplicates -------------------------------------------------------------------------------
# A text read twice counts twice in training, and a copy in both a training and an evaluation file
# is a leak (the evaluation then measures memorisation). Texts under two labels cap accuracy.


def normalised_text(text: str) -> str:
    """A record's text as compared for duplicates: runs of whitespace as one space, ends stripped
    (a re-wrapped copy is still the same record; case and punctuation still count)."""
    return " ".join(text.split())


def text_groups(texts: Sequence[str]) -> list[list[int]]:
    """The indices of `texts` grouped by normalised text, groups in order of first occurrence."""
    groups: dict[str, list[int]] = {}
    for i, text in enumerate(texts):
        groups.setdefault(normalised_text(text), []).append(i)
    return list(groups.values())


@dataclass(frozen=True)
class Copy:
    """One copy of a repeated text: where it was read and under which label (its name)."""

    path: Path
    line: int | None  # None for records built in memory
    label: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line if self.line is not None else '?'}"


@dataclass(frozen=True)
class Duplicates:
    """The texts read more than once across some record files (after whitespace normalisation)."""

    rows: int  # records read, in all the files
    distinct: int  # distinct texts among them
    groups: tuple[tuple[Copy, ...], ...]  # each text read more than once: its copies, in reading order

    @property
    def repeated_rows(self) -> int:
        return sum(map(len, self.groups))

    @property
    def conflicts(self) -> tuple[tuple[Copy, ...], ...]:
        """The texts read under two or more labels."""
        return tuple(g for g in self.groups if len({c.label for c in g}) > 1)

    def shared(self, first: Collection[Path], second: Collection[Path]) -> tuple[tuple[Copy, ...], ...]:
        """The texts with a copy in one of the `first` files and one in the `second` files."""
        return tuple(g for g in self.groups if any(c.path in first for c in g) and any(c.path in second for c in g))

    def report(self, limit: int = 5) -> list[str]:
        """Warning lines for `data check` and `data partition` (none if no text repeats): counts,
        then the first `limit` repeated texts' copies as file:line."""
        if not self.groups:
            return []
        out = [
            f"warning: duplicate records: {self.repeated_rows} rows hold {_count(len(self.groups), 'text')} read more "
            f"than once (of {self.rows} rows, {self.distinct} distinct texts); each copy counts as one more record: "
            + _examples(self.groups, limit, labelled=False)
        ]
        conflicts = self.conflicts
        if conflicts:
            out.append(
                f"warning: conflicting records: {_count(len(conflicts), 'text')} read under two or more labels "
                f"({sum(map(len, conflicts))} rows): " + _examples(conflicts, limit, labelled=True)
            )
        return out

    def leak_report(self, train: Collection[Path], held_out: Collection[Path], limit: int = 5) -> list[str]:
        """A warning line if a text of the `train` files is also in a `held_out` (validation/test) file."""
        shared = self.shared(train, held_out)
        if not shared:
            return []
        return [
            f"warning: LEAK: {_count(len(shared), 'training text')} also in the validation/test records "
            "(evaluation on them measures memorisation, not learning; remove them from one side): "
            + _examples(shared, limit, labelled=False)
        ]


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _examples(groups: Sequence[tuple[Copy, ...]], limit: int, *, labelled: bool) -> str:
    """The first `limit` groups' copies: `file:line = file:line; ...`, or `file: lines a = b; ...`
    when they are all in one file."""
    shown = groups[:limit]
    paths = {c.path for g in shown for c in g}
    one_file = len(paths) == 1

    def copy(c: Copy) -> str:
        where = str(c.line if c.line is not None else "?") if one_file else str(c)
        return f"{where} ({c.label})" if labelled else where

    text = "; ".join(" = ".join(map(copy, g)) for g in shown)
    if one_file:
        text = f"{paths.pop()}: lines {text}"
    return text + (f"; ... ({len(groups) - limit} more)" if len(groups) > limit else "")


def find_duplicates(files: Sequence[tuple[Records, Sequence[str]]]) -> Duplicates:
    """The repeated texts of record files, each given with its label names (`Records.labels` index them)."""
    copies = [
        Copy(records.path, None if records.lines is None else records.lines[i], names[y])
        for records, names in files
        for i, y in enumerate(records.labels)
    ]
    groups = text_groups([t for records, _ in files for t in records.texts])
    return Duplicates(len(copies), len(groups), tuple(tuple(copies[i] for i in g) for g in groups if len(g) > 1))
