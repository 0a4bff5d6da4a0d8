"""`python -m benchmarks run [--suite accuracy|recipe|dp|comm|round|scale|all] [--quick] --out DIR`

Writes DIR/results.json, DIR/results.md and PNG plots (matplotlib Agg).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from . import SUITES  # noqa: E402
from .common import DEFAULT_DATA, Context, environment  # noqa: E402

# Hidden size knobs (tests, experiments): --name-with-dashes INT, read by the suites through Context.knob.
KNOBS = (
    "pairs",
    "warmup",
    "batch",
    "max_length",
    "n_virtual",
    "n_batches",
    "mem_steps",
    "breakdown_steps",
    "profile_steps",
    "acc_rows",
    "acc_rounds",
    "acc_seeds",
    "acc_prompt_epochs",
    "scale_rounds",
)


def _json_safe(o):
    if isinstance(o, dict):
        return {str(k): _json_safe(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_json_safe(v) for v in o]
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if hasattr(o, "item") and callable(o.item):  # numpy / torch scalars
        return _json_safe(o.item())
    if isinstance(o, Path):
        return str(o)
    return o


def _header(meta: dict, quick: bool) -> list[str]:
    return [
        f"# fedprompt benchmarks{' (quick)' if quick else ''}",
        "",
        f"`{meta['command']}` — {meta['date_utc']}, {meta['cpu_model']}, {meta['nproc']} CPUs, torch {meta['torch']}, "
        f"opacus {meta['opacus']}, flwr {meta['flwr']}",
    ]


def _render(directory: Path) -> int:
    results = json.loads((directory / "results.json").read_text())
    md = _header(results["meta"], results["meta"].get("quick", False))
    plots: list[str] = []
    for name, res in results["suites"].items():
        mod = importlib.import_module(f".{name}", __package__)
        md += ["", f"## {name}", "", mod.markdown(res)]
        plots += mod.plot(res, directory)
    md += ["", "Plots: " + ", ".join(f"`{p}`" for p in plots)]
    (directory / "results.md").write_text("\n".join(md) + "\n")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run benchmark suites")
    r.add_argument("--suite", action="append", choices=[*SUITES, "all"], help="suite to run (repeatable; default: all)")
    r.add_argument("--quick", action="store_true", help="small sizes: all suites in a few minutes")
    r.add_argument("--out", required=True, type=Path, help="output directory")
    r.add_argument("--seed", type=int, default=0, help="seed for data selection and splits (default 0)")
    # Hidden options (tests, experiments): another backbone directory, data file, sizes.
    r.add_argument("--backbone", default=None, help=argparse.SUPPRESS)
    r.add_argument("--data", type=Path, default=DEFAULT_DATA, help=argparse.SUPPRESS)
    for knob in KNOBS:
        r.add_argument(f"--{knob.replace('_', '-')}", dest=knob, type=int, default=None, help=argparse.SUPPRESS)
    r.add_argument("--scale-sizes", dest="scale_sizes", type=int, nargs="+", default=None, help=argparse.SUPPRESS)
    m = sub.add_parser("_memprobe", help=argparse.SUPPRESS)  # internal: one dp memory probe per process
    m.add_argument("spec")
    g = sub.add_parser("_render", help=argparse.SUPPRESS)  # internal: results.md + plots again from results.json
    g.add_argument("dir", type=Path)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.cmd == "_memprobe":
        from .dp import memory_probe

        print(json.dumps(memory_probe(json.loads(args.spec))))
        return 0

    if args.cmd == "_render":
        return _render(args.dir)

    suites = list(SUITES) if not args.suite or "all" in args.suite else list(dict.fromkeys(args.suite))
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    knobs = {k: getattr(args, k) for k in (*KNOBS, "scale_sizes")}
    ctx = Context(out=out, quick=args.quick, backbone=args.backbone, data=args.data, seed=args.seed, overrides=knobs)
    results: dict = {
        "meta": {
            **environment(),
            "quick": args.quick,
            "suites": suites,
            "backbone": args.backbone or "default (all-MiniLM-L6-v2)",
            "data": str(args.data),
        },
        "suites": {},
    }
    md = _header(results["meta"], args.quick)
    plots: list[str] = []
    for name in suites:
        mod = importlib.import_module(f".{name}", __package__)
        t0 = time.perf_counter()
        ctx.log(f"suite {name}: start")
        res = mod.run(ctx)
        res["seconds"] = round(time.perf_counter() - t0, 1)
        results["suites"][name] = res
        ctx.log(f"suite {name}: done in {res['seconds']} s")
        md += ["", f"## {name}", "", mod.markdown(res)]
        plots += mod.plot(res, out)
        # Written after every suite so that a later failure keeps what was measured.
        (out / "results.json").write_text(json.dumps(_json_safe(results), indent=2) + "\n")
        (out / "results.md").write_text("\n".join(md) + "\n")
    results["meta"]["plots"] = plots
    results["meta"]["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    (out / "results.json").write_text(json.dumps(_json_safe(results), indent=2) + "\n")
    md += ["", "Plots: " + ", ".join(f"`{p}`" for p in plots)]
    (out / "results.md").write_text("\n".join(md) + "\n")
    print(out / "results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
