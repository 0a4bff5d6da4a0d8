"""`fedprompt selftest`: a hospital checks DP exactness on its own hardware before joining."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("selftest", help="check exact per-sample gradients and DP steps on this machine")
    p.add_argument("--backbone", help="local HuggingFace encoder directory (default: embedded all-MiniLM-L6-v2)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fedprompt.client.selftest import TOLERANCE, run_selftest
    from fedprompt.client.trainer import resolve_device
    from fedprompt.common.backbone import load_backbone

    result = run_selftest(load_backbone(args.backbone), resolve_device(args.device))
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"fedprompt selftest on {result['device']}, frozen encoder in {result['dtype']} (tolerance {TOLERANCE:g}, "
            f"backbone {result['backbone'][:16]}...)"
        )
        for c in result["checks"]:
            diff = "n/a" if c["max_abs_diff"] is None else f"{c['max_abs_diff']:.3g}"
            print(f"  {'PASS' if c['passed'] else 'FAIL'}  {c['name']:<24} max_abs_diff={diff:<10} {c['detail']}")
        print(
            "all checks passed" if result["passed"] else "SELFTEST FAILED: do not join a federation from this machine"
        )
    return 0 if result["passed"] else 1
