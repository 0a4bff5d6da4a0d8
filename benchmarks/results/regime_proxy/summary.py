import json
from collections import defaultdict
rows = [json.loads(l) for l in open("/work/scratch/study/results.jsonl")]
ref = {r["reg"]: r for r in rows if r["stage"] == "ref"}
m1 = {(r["reg"], r["eps"]): r["f1"] for r in rows if r["stage"] == "m1" and r.get("lamk") == 30}
m1l0 = {(r["reg"], r["eps"]): r["f1"] for r in rows if r["stage"] == "m1" and r.get("lam") == 0}
t = defaultdict(dict)
ratio = defaultdict(float)
for r in rows:
    if r["stage"] == "m2":
        c = r["cfg"]
        name = "M2 B%s rho%s R%s" % (c.get("bmin", "-"), c.get("rho_ref", "-"), c.get("R", 20))
        if c == {}:
            name = "M2 today"
    elif r["stage"] == "m3":
        c = r["cfg"]
        name = "M3 f%s rho%s R%s" % (r["f"], c.get("rho_ref"), c.get("R", 20))
    else:
        continue
    t[name][(r["reg"], r["eps"])] = "%.3f/%.3f" % (r["final"], r["last3"])
    ratio[(name, r["reg"])] = max(ratio[(name, r["reg"])], r["max_ratio"])
cells = [(g, e) for g in "abcdef" for e in (1, 4, 8)]
print("%-26s" % "", *["%s%d" % c for c in cells])
print("%-26s" % "zero-shot", *["%.3f" % ref[g]["zeroshot"][0] for g, e in cells])
print("%-26s" % "central probe (best C)", *["%.3f" % max(x[0] for x in ref[g]["central"].values()) for g, e in cells])
print("%-26s" % "site alone (max)", *["%.3f" % ref[g]["alone_max"] for g, e in cells])
print("%-26s" % "M1 lam0", *["%.3f" % m1l0[c] for c in cells])
print("%-26s" % "M1 lam=30 sA sqrt(m)", *["%.3f" % m1[c] for c in cells])
for name in sorted(t):
    print("%-26s" % name, *[t[name].get(c, "  -  ") for c in cells])
print()
for (name, g), v in sorted(ratio.items()):
    print(name, g, "max obs/bound %.3f" % v)
