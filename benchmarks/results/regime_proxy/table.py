import json, sys
from collections import defaultdict
rows = [json.loads(l) for l in open("/work/scratch/study/results.jsonl")]
stage = sys.argv[1]
if stage == "ref":
    for r in rows:
        if r["stage"] == "ref":
            print(r["reg"], "zs %.3f" % r["zeroshot"][0], "central", {c: round(v[0], 3) for c, v in r["central"].items()},
                  "alone mean %.3f max %.3f" % (r["alone_mean"], r["alone_max"]))
if stage == "m1":
    t = defaultdict(dict)
    for r in rows:
        if r["stage"] == "m1":
            key = f"lam{r['lam']}" if "lam" in r else f"k{r['lamk']}"
            t[(r["reg"], r["eps"])][key] = round(r["f1"], 3)
    keys = list(next(iter(t.values())).keys())
    print("reg eps", *keys)
    for (g, e), v in sorted(t.items()):
        print(g, e, *[v.get(k) for k in keys])
if stage in ("m2", "m3"):
    for r in rows:
        if r["stage"] == stage:
            extra = f"f={r['f']} lam={r['lam']} k={r['lamk']} r1={r['r1']:.3f}" if stage == "m3" else ""
            print(r["reg"], r["eps"], extra, json.dumps(r["cfg"]), "final %.3f (min %.3f) last3 %.3f maxupd %.2f ratio %.3f lr %s sig %s T %s"
                  % (r["final"], r["finalmin"], r["last3"], r["max_upd"], r["max_ratio"], r["lr"], r["sig"], r["T"]))
