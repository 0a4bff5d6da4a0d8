"""`fedprompt simulate`: the main job, a federation of hospitals on this machine."""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("simulate", help="run a federation on this machine (default: a 3-hospital demo)")
    p.add_argument("--workspace", type=Path, help="workspace folder (default: make a 3-hospital demo in OUT/workspace)")
    p.add_argument("--out", type=Path, help="run folder (default: runs/<name>-<time>)")
    p.add_argument("--rounds", type=int, help="override federation.yaml's rounds")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--stop-after", type=int, help="run at most this many rounds now (continue later with --resume)")
    p.add_argument("--backbone", type=Path, help="aggregator's backbone directory (default: embedded all-MiniLM-L6-v2)")
    p.add_argument("--non-private", action="store_true", help="reference run WITHOUT differential privacy (sites must allow it)")
    p.add_argument("--seed", type=int, default=0, help="seed of the demo workspace")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fedprompt.client.comparison import format_comparison
    from fedprompt.client.demo_data import generate_demo, write_demo_workspace
    from fedprompt.common.errors import InputError
    from fedprompt.server.simulate import simulate

    if args.rounds is not None and args.rounds < 1:
        raise InputError.at("--rounds", f"expected >= 1, got {args.rounds}")
    out = args.out or Path("runs") / f"{'demo' if args.workspace is None else args.workspace.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    workspace, fresh = args.workspace, False
    if workspace is None:
        workspace = out / "workspace"
        if not (args.resume and workspace.exists()):
            write_demo_workspace(workspace, generate_demo(hospitals=3, seed=args.seed))
            fresh = True
            print(f"[fedprompt] demo workspace (3 hospitals, synthetic notes) written to {workspace}")
    # Ledgers are created only for the demo written just now; any other site must have its own
    # (`fedprompt privacy init --site ...`): a missing ledger may be a lost one.
    metrics = simulate(
        workspace, out, rounds=args.rounds, resume=args.resume, stop_after=args.stop_after,
        backbone=args.backbone, non_private=args.non_private, create_ledgers=fresh,
    )
    last = metrics["rounds"][-1] if metrics["rounds"] else {}
    trained = sum(1 for r in metrics["rounds"] if r["round"] > 0)  # round 0 is the zero-shot start
    print(f"\n[fedprompt] run {metrics['run']!r} finished: {trained} round(s), "
          f"{'DP-SGD at every hospital' if metrics['private'] else 'NON-PRIVATE reference run'}")
    first = metrics["rounds"][0] if metrics["rounds"] and metrics["rounds"][0]["round"] == 0 else {}
    for key in ("evaluate", "test"):
        if last.get(key):
            start = f"  (round 0, zero-shot: {first[key]['macro_f1']:.3f})" if first.get(key) else ""
            print(f"  {key:<9} accuracy {last[key]['accuracy']:.3f}  macro-F1 {last[key]['macro_f1']:.3f}{start}")
    if metrics.get("hospital_comparison"):
        print("  per hospital, on its own local test split (zero-shot: no data; alone: its own non-private model;")
        print("  federated: the private global model; personalized: the global model adapted at the site):")
        for row in metrics["hospital_comparison"]:
            print(format_comparison(row))
    print(f"  metrics   {out / 'metrics.json'}\n  report    {out / 'report.html'}\n  export    {metrics['export']}")
    print(f"  try       fedprompt predict --model {metrics['export']} --text \"chest pain radiating to the left arm\"")
    return 0
