"""Download the public Medical Abstracts corpus (Schopf et al., CC BY-SA 3.0).

Each file is written through common/atomic.atomic_file: it appears only when whole (and, for
the test split, only when its sha256 matches the published one). An existing file is
kept, never overwritten; an existing test split is still checked.
"""

from __future__ import annotations

import hashlib
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from fedprompt.common.atomic import atomic_file
from fedprompt.common.errors import InputError, Problem

DEFAULT_SOURCE = "https://raw.githubusercontent.com/sebischair/Medical-Abstracts-TC-Corpus/main/"
TEST_FILE = "medical_tc_test.csv"
TRAIN_FILE = "medical_tc_train.csv"
LABELS_FILE = "medical_tc_labels.csv"
# file -> sha256 it must have (None: not pinned). The test split is the project's reference data.
FILES: dict[str, str | None] = {
    TEST_FILE: "1eecea73c9ecad292c55e10403bd139fab9580545d6878482997c5564d51ac05",
    TRAIN_FILE: None,
    LABELS_FILE: None,
}
REQUIRED = (TEST_FILE,)
TIMEOUT_S = 60


@dataclass
class Fetched:
    name: str
    status: str  # "downloaded", "kept" (already there) or "missing" (not at the source)
    sha256: str | None
    detail: str = ""


def source_url(source: str) -> str:
    """A URL base ending in '/'; a plain folder path becomes a file:// URL."""
    url = source if "://" in source else Path(source).resolve().as_uri()
    return url if url.endswith("/") else url + "/"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch(url: str, out: BinaryIO) -> str:
    """Stream `url` into `out`; return its sha256."""
    digest = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
        for chunk in iter(lambda: response.read(1 << 20), b""):
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


class _Mismatch(Exception):
    """A downloaded file is not the published one: raised inside `atomic_file`, so it is not saved."""


def download_medical_abstracts(out_dir: str | Path, *, source: str = DEFAULT_SOURCE) -> list[Fetched]:
    """Fetch the corpus files into `out_dir`. Raises InputError if the test split is missing at
    the source or does not match its published sha256; other missing files are reported only."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = source_url(source)
    results: list[Fetched] = []
    problems: list[Problem] = []
    for name, expected in FILES.items():
        target = out / name
        if target.exists():
            digest = _sha256(target)
            if expected and digest != expected:
                problems.append(
                    Problem(
                        str(target),
                        None,
                        None,
                        f"existing file has sha256 {digest}, expected {expected}; remove it and download again",
                    )
                )
            results.append(Fetched(name, "kept", digest))
            continue
        try:
            with atomic_file(target) as f:
                digest = _fetch(base + name, f)
                if expected and digest != expected:
                    raise _Mismatch
        except _Mismatch:
            problems.append(
                Problem(
                    base + name,
                    None,
                    None,
                    f"sha256 mismatch: got {digest}, expected {expected}; the file was not saved",
                )
            )
            results.append(Fetched(name, "missing", digest, "sha256 mismatch"))
            continue
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", None) or exc
            results.append(Fetched(name, "missing", None, f"not fetched from {base + name}: {reason}"))
            if name in REQUIRED:
                problems.append(Problem(base + name, None, None, f"could not download: {reason}"))
            continue
        results.append(Fetched(name, "downloaded", digest))
    if problems:
        raise InputError(problems)
    return results
