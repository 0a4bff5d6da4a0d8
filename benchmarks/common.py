"""What the suites share: run context, the real corpus, robust statistics, environment facts."""

from __future__ import annotations

import math
import os
import platform
import random
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# The project's real-data corpus, read in place (never copied into the repository).
DEFAULT_DATA = PROJECT_ROOT.parent / "shared" / "data" / "medical-abstracts" / "medical_tc_test.csv"
LABELS_FILE = "medical_tc_labels.csv"
TEXT_COLUMN = "medical_abstract"
LABEL_COLUMN = "condition_label"


@dataclass
class Context:
    out: Path
    quick: bool = False
    backbone: str | None = None  # None: the embedded default (all-MiniLM-L6-v2)
    data: Path = DEFAULT_DATA
    seed: int = 0
    overrides: dict = field(default_factory=dict)  # hidden knobs (pairs, warmup, ...) for tests

    def knob(self, name: str, full, quick):
        if name in self.overrides and self.overrides[name] is not None:
            return self.overrides[name]
        return quick if self.quick else full

    def log(self, msg: str) -> None:
        print(f"[bench {datetime.now().strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def load_corpus(path: Path):
    """(texts, label indices, label names) of the labelled corpus, via the project's own loader."""
    from fedprompt.client.partition import load_corpus as _load

    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"benchmark data not found: {path} (pass --data CSV)")
    names = path.parent / LABELS_FILE
    records, labels = _load(
        path, text_column=TEXT_COLUMN, label_column=LABEL_COLUMN, label_names=names if names.is_file() else None
    )
    return records, labels


def central_probe(train_features: list, test_features, num_labels: int) -> dict:
    """The central non-private reference: the product's plain probe (client/personalize.py,
    L2-regularised logistic regression) on every site's training features pooled, scored on the
    test features. Accuracy and macro-F1."""
    import torch
    from torch.utils.data import TensorDataset

    from fedprompt.client.personalize import own_model_features, scores

    pooled = TensorDataset(*(torch.cat(parts) for parts in zip(*(f.tensors for f in train_features), strict=True)))
    s = scores(own_model_features(pooled, num_labels), test_features, num_labels)
    return {"accuracy": float(s["accuracy"]), "macro_f1": float(s["macro_f1"])}


def sample_rows(n_total: int, n: int, seed: int) -> list[int]:
    """n distinct row indices, deterministic by seed."""
    rng = random.Random(seed)
    ix = list(range(n_total))
    rng.shuffle(ix)
    return ix[: min(n, n_total)]


# --- statistics ---------------------------------------------------------------------------------
def quantile(xs: list[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default method)."""
    s = sorted(xs)
    if not s:
        return float("nan")
    pos = (len(s) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def describe(xs: list[float]) -> dict:
    return {
        "n": len(xs),
        "median": quantile(xs, 0.5),
        "q1": quantile(xs, 0.25),
        "q3": quantile(xs, 0.75),
        "iqr": quantile(xs, 0.75) - quantile(xs, 0.25),
        "mean": statistics.fmean(xs) if xs else float("nan"),
        "min": min(xs) if xs else float("nan"),
        "max": max(xs) if xs else float("nan"),
    }


# --- environment --------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return None


def _free_g() -> str | None:
    try:
        return subprocess.run(["free", "-g"], capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict:
    import flwr
    import opacus
    import torch
    import transformers

    return {
        "date_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python -m benchmarks " + " ".join(sys.argv[1:]),
        "nproc": os.cpu_count(),
        "sched_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "cpu_model": _cpu_model(),
        "mem_total_gib": _mem_total_gib(),
        "free_g": _free_g(),
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "opacus": opacus.__version__,
        "flwr": flwr.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.cuda.is_available(),
    }


def md_table(header: list[str], rows: list[list]) -> str:
    def cell(v) -> str:
        if isinstance(v, float):
            if math.isnan(v):
                return "n/a"
            return f"{v:.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
        if isinstance(v, int) and not isinstance(v, bool):
            return f"{v:,}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants (Linux /proc), in MB."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            rss = next(line for line in Path(f"/proc/{p}/status").read_text().splitlines() if line.startswith("VmRSS:"))
            total += int(rss.split()[1]) / 1024
        except (OSError, StopIteration):
            pass
    return total
