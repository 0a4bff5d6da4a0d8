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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError, Problem

FORMATS = (".csv", ".jsonl")


@dataclass
class Records:
    texts: list[str]
    labels: list[int]  # index into the federation's label space
    path: Path
    patients: list[str] | None = None  # each record's patient id (site.yaml: patient_field), if asked for

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


class _Problems:
    """Collects problems up to a limit and counts the rest."""

    def __init__(self, path: Path, limit: int):
        self.path, self.limit, self.omitted = str(path), limit, 0
        self.items: list[Problem] = []

    def add(self, line: int | None, field: str | None, message: str) -> None:
        if len(self.items) < self.limit:
            self.items.append(Problem(self.path, line, field, message))
        else:
            self.omitted += 1

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
            problems.add(line, name, f"missing field (found fields: {found})")
        if missing:
            continue
        text, label = obj[text_field], obj[label_field]
        if not isinstance(text, str):
            problems.add(line, text_field, f"expected a string, got {json.dumps(text)[:40]}")
            continue
        # An integer label is read as its digits: accepted only where that equals a label name.
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            problems.add(line, label_field, f"expected a string, got {json.dumps(label)[:40]}")
            continue
        patient = None
        if patient_field is not None:
            patient = obj[patient_field]
            if isinstance(patient, bool) or not isinstance(patient, (str, int)):
                problems.add(
                    line, patient_field, f"expected a patient id (string or integer), got {json.dumps(patient)[:40]}"
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
            problems.add(row.line, label_field, f"unknown label {label!r} (expected one of: {describe_labels(labels)})")
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
    return Records([r.text for r in rows], [index[r.label] for r in rows], path, patients)


def load_labelled(
    path: str | Path, *, text_field: str, label_field: str, max_problems: int = 20, patient_field: str | None = None
) -> tuple[Records, list[str]]:
    """Load a corpus whose label space is whatever it holds: its distinct labels, naturally sorted."""
    path = Path(path)
    rows = _read_rows(path, text_field, label_field, None, max_problems, patient_field)
    labels = sorted({r.label for r in rows}, key=natural_key)
    index = {name: i for i, name in enumerate(labels)}
    patients = None if patient_field is None else _patients(rows)
    return Records([r.text for r in rows], [index[r.label] for r in rows], path, patients), labels
