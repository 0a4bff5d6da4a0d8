"""`fedprompt predict`: classify new text locally with an exported prompt."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="classify text with an exported prompt (refuses on a different backbone)")
    p.add_argument(
        "--model",
        type=Path,
        required=True,
        help="export folder of a run, or a personalised model (config.json + prompt.safetensors)",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", action="append", help="a text to classify (repeatable)")
    src.add_argument("--input", type=Path, help=".txt (one text per line), .csv or .jsonl file")
    p.add_argument("--text-column", default="text", help="text column/field for .csv/.jsonl input")
    p.add_argument("--backbone", type=Path, help="local backbone directory (default: embedded all-MiniLM-L6-v2)")
    p.add_argument("--json", action="store_true", help="one JSON object per text")
    p.set_defaults(func=run)


def read_texts(path: Path, column: str) -> list[str]:
    from fedprompt.common.errors import InputError

    if not path.is_file():
        raise InputError.at(path, "file not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        line_no = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise InputError.at(path, f"not UTF-8 text ({exc.reason} at byte {exc.start})", line=line_no) from None
    if path.suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        if column not in (reader.fieldnames or []):
            raise InputError.at(
                path, f"missing column (found: {', '.join(reader.fieldnames or [])})", line=1, field=column
            )
        return [row[column] for row in reader]
    if path.suffix == ".jsonl":
        out = []
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    out.append(str(json.loads(line)[column]))
                except (ValueError, KeyError, TypeError):
                    raise InputError.at(
                        path, f"expected a JSON object with a {column!r} field", line=i, field=column
                    ) from None
        return out
    return [line for line in text.splitlines() if line.strip()]


def run(args: argparse.Namespace) -> int:
    from fedprompt.api import load_model
    from fedprompt.client.personalize import METHODS

    texts = args.text if args.text else read_texts(args.input, args.text_column)
    model = load_model(args.model, args.backbone)
    for p in model.predict(texts):
        if args.json:
            print(json.dumps({"text": p.text, "label": p.label, "probabilities": p.probabilities}))
        else:
            print(f"{p.label}\t{p.probabilities[p.label]:.3f}\t{p.text[:80]}")
    if model.personalized is not None:
        method = model.personalized.get("method")
        described = METHODS.get(method, method) if isinstance(method, str) else method
        print(f"personalised for {model.personalized.get('hospital_id')} ({described})", file=sys.stderr)
    if not model.private:
        print("warning: this model was trained WITHOUT differential privacy", file=sys.stderr)
    return 0
