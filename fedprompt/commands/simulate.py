"""`fedprompt simulate`: the main job, a federation of hospitals on this machine."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from fedprompt.common.exit_codes import ExitCode, epilog

if TYPE_CHECKING:
    from fedprompt.api import SimulationResult

EXIT_CODES = (
    ExitCode.OK,
    ExitCode.FAILED,
    ExitCode.BAD_INPUT,
    ExitCode.LEDGER,
    ExitCode.NOTHING_TRAINED,
    ExitCode.PARTLY_TRAINED,
    ExitCode.INTERRUPTED,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "simulate",
        help="run a federation on this machine (default: a 3-hospital demo)",
        epilog=epilog(*EXIT_CODES),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--workspace", type=Path, help="workspace folder (default: make a 3-hospital demo in OUT/workspace)")
    p.add_argument("--out", type=Path, help="run folder (default: runs/<name>-<time>)")
    p.add_argument("--rounds", type=int, help="override federation.yaml's rounds")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--stop-after", type=int, help="run at most this many rounds now (continue later with --resume)")
    p.add_argument(
        "--backbone",
        type=Path,
        help="aggregator's backbone directory, and the fresh demo's sites' (default: embedded all-MiniLM-L6-v2)",
    )
    p.add_argument(
        "--non-private", action="store_true", help="reference run WITHOUT differential privacy (sites must allow it)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the demo workspace")
    p.add_argument(
        "--engine",
        choices=("ray", "local"),
        default="ray",
        help="ray: Flower's simulation engine (default); local: every hospital in this process, no Ray",
    )
    p.add_argument(
        "--verbose",
        action="store_true",
        help="Flower's, Ray's and the hospitals' output on the console too (always in OUT/logs/)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fedprompt.api import simulate
    from fedprompt.server.outcome import NOTHING_TRAINED, PARTLY_TRAINED, exit_code

    result = simulate(
        args.workspace,
        args.out,
        rounds=args.rounds,
        resume=args.resume,
        stop_after=args.stop_after,
        backbone=args.backbone,
        non_private=args.non_private,
        seed=args.seed,
        verbose=args.verbose,
        engine=args.engine,
    )
    out = result.out_dir
    if result.outcome == NOTHING_TRAINED:
        print(
            f"\n[fedprompt] run {result.run!r} did not train: {result.outcome_reason}; no export written\n"
            f"  metrics   {out / 'metrics.json'}\n  report    {out / 'report.html'}",
            file=sys.stderr,
        )
        return exit_code(NOTHING_TRAINED)
    if result.outcome == PARTLY_TRAINED:  # never "finished": the exit status says so too
        print(f"\n[fedprompt] run {result.run!r} PARTLY TRAINED: {result.outcome_reason}", file=sys.stderr)
    else:
        trained = sum(1 for r in result.rounds if r.round > 0)  # round 0 is the zero-shot start
        print(
            f"\n[fedprompt] run {result.run!r} finished: {trained} round(s), "
            f"{'differential privacy at every hospital' if result.private else 'NON-PRIVATE reference run'}"
        )
    _print_scores(result)
    return exit_code(result.outcome)


def _print_scores(result: SimulationResult) -> None:
    """The last round against the zero-shot start, each hospital's comparison, where the files are."""
    from fedprompt.client.comparison import format_comparison

    out = result.out_dir
    first, last = result.rounds[0], result.rounds[-1]
    for key, now, start in (("evaluate", last.evaluate, first.evaluate), ("test", last.test, first.test)):
        if now:
            zero = f"  (round 0, zero-shot: {start['macro_f1']:.3f})" if first.round == 0 and start else ""
            print(f"  {key:<9} accuracy {now['accuracy']:.3f}  macro-F1 {now['macro_f1']:.3f}{zero}")
    if result.hospital_comparison:
        print("  per hospital, on its own local test split (zero-shot: no data; alone: its own non-private model;")
        print("  federated: the private global model; personalized: the global model adapted at the site):")
        for row in result.hospital_comparison:
            print(format_comparison(row))
    print(
        f"  metrics   {out / 'metrics.json'}\n  report    {out / 'report.html'}\n  logs      {out / 'logs'}\n  "
        f"export    {result.export}"
    )
    print(f'  try       fedprompt predict --model {result.export} --text "chest pain radiating to the left arm"')
