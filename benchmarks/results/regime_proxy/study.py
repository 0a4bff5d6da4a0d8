"""Cheap-proxy study of the private recipe on cached frozen features (see report)."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from opacus.accountants import PRVAccountant, RDPAccountant
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score

HERE = Path("/work/scratch/study")
DELTA = 1e-5
K = 5
D = 384 * K + K  # head dimension (W and b)
if (HERE / "features.pt").exists():
    data = torch.load(HERE / "features.pt")
    X = data["x"].numpy().astype(np.float64)
    Y = data["y"].numpy()
    LAB = {k: v.numpy().astype(np.float64) for k, v in data["labels"].items()}


# ---------------------------------------------------------------- splits
def stratified_test(seed=0, frac=0.3):
    rng = np.random.default_rng(seed)
    test = []
    for c in range(K):
        ix = np.flatnonzero(Y == c)
        rng.shuffle(ix)
        test += list(ix[: round(frac * len(ix))])
    test = np.array(sorted(test))
    pool = np.setdiff1d(np.arange(len(Y)), test)
    return test, pool


if (HERE / "features.pt").exists():
    TEST, POOL = stratified_test(0)


def classwise_dirichlet(pool, m, alpha, rng, train_frac=0.75):
    """Regime (a): every class's rows split over m sites by Dirichlet(alpha); 75% of a site's rows train."""
    sites = [[] for _ in range(m)]
    for c in range(K):
        ix = pool[Y[pool] == c].copy()
        rng.shuffle(ix)
        p = rng.dirichlet([alpha] * m)
        cuts = (np.cumsum(p)[:-1] * len(ix)).astype(int)
        for s, part in enumerate(np.split(ix, cuts)):
            sites[s] += list(part)
    out = []
    for s in sites:
        s = np.array(s)
        rng.shuffle(s)
        out.append(np.sort(s[: int(round(train_frac * len(s)))]))
    return out


def sized_dirichlet(pool, sizes, alpha, rng):
    """Sites of given sizes, each with its own Dirichlet(alpha) label mix, disjoint rows."""
    avail = {c: list(rng.permutation(pool[Y[pool] == c])) for c in range(K)}
    out = []
    for n in sizes:
        counts = rng.multinomial(n, rng.dirichlet([alpha] * K))
        take = []
        for c in range(K):
            k = min(counts[c], len(avail[c]))
            take += avail[c][:k]
            avail[c] = avail[c][k:]
        while len(take) < n:  # a class ran out: fill from the largest remaining class
            c = max(avail, key=lambda c: len(avail[c]))
            take.append(avail[c].pop(0))
        out.append(np.sort(np.array(take)))
    return out


def regimes():
    r = {}
    r["a"] = dict(sites=classwise_dirichlet(POOL, 3, 0.5, np.random.default_rng(0)), lab="names")
    r["b"] = dict(sites=sized_dirichlet(POOL, [40, 80, 120], 0.5, np.random.default_rng(1)), lab="names")
    r["c"] = dict(sites=sized_dirichlet(POOL, [60] * 10, 0.5, np.random.default_rng(2)), lab="names")
    r["d"] = dict(sites=sized_dirichlet(POOL, [1000, 50, 50, 50, 50], 0.5, np.random.default_rng(3)), lab="names")
    r["e"] = dict(sites=r["a"]["sites"], lab="code_desc")
    r["f"] = dict(sites=r["b"]["sites"], lab="codes")
    for v in r.values():
        v["n"] = [len(s) for s in v["sites"]]
        v["w"] = [declared(n) for n in v["n"]]
    return r


def declared(n):
    e = 10 ** int(math.floor(math.log10(n)))
    return int(round(n / e) * e)


# ---------------------------------------------------------------- metrics / model
def evaluate(W, b):
    pred = (X[TEST] @ W.T + b).argmax(1)
    return f1_score(Y[TEST], pred, average="macro"), accuracy_score(Y[TEST], pred)


def probe(idx, C=10.0):
    if len(np.unique(Y[idx])) < 2:
        c = np.bincount(Y[idx], minlength=K).argmax()
        pred = np.full(len(TEST), c)
    else:
        clf = LogisticRegression(C=C, max_iter=2000).fit(X[idx], Y[idx])
        pred = clf.predict(X[TEST])
    return f1_score(Y[TEST], pred, average="macro"), accuracy_score(Y[TEST], pred)


# ---------------------------------------------------------------- accounting (PRV), disk-cached
CACHE_F = HERE / "sigma_cache.json"
CACHE = json.loads(CACHE_F.read_text()) if CACHE_F.exists() else {}


def prv_eps(history):
    acc = PRVAccountant()
    acc.history = list(history)
    return float(acc.get_epsilon(DELTA, eps_error=0.05))


def rdp_eps(history):
    acc = RDPAccountant()
    acc.history = list(history)
    return float(acc.get_epsilon(DELTA))


def calibrate(eps, make_history, key):
    """Smallest sigma (1% relative) with PRV epsilon(history(sigma)) <= eps."""
    if key in CACHE:
        return CACHE[key]
    # RDP (fast) is looser than PRV: its sigma is an upper bracket, PRV's sigma lies a little below it
    hi = 0.3
    while rdp_eps(make_history(hi)) > eps:
        hi *= 1.1
    lo = 0.75 * hi
    while prv_eps(make_history(lo)) <= eps and lo > 0.05:
        hi, lo = lo, lo * 0.75
    while hi / lo > 1.02:
        mid = math.sqrt(lo * hi)
        if prv_eps(make_history(mid)) > eps:
            lo = mid
        else:
            hi = mid
    CACHE[key] = hi
    if CACHE_F.exists():  # other study processes write here too: merge, never clobber
        CACHE.update({k: v for k, v in json.loads(CACHE_F.read_text()).items() if k not in CACHE})
    tmp = CACHE_F.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(CACHE))
    tmp.replace(CACHE_F)
    return hi


def sigma_gauss(eps):
    return calibrate(eps, lambda s: [(s, 1.0, 1)], f"gauss|{eps}")


def sigma_sgd(eps, q, steps, eps_a=None):
    if eps_a is None:
        return calibrate(eps, lambda s: [(s, q, steps)], f"sgd|{eps}|{q:.6f}|{steps}")
    sa = sigma_gauss(eps_a)
    return calibrate(eps, lambda s: [(sa, 1.0, 1), (s, q, steps)], f"m3|{eps}|{eps_a}|{q:.6f}|{steps}")


# ---------------------------------------------------------------- mechanisms
def m1_head(reg, eps_a, lam, rng, lam_rule=None):
    sa = sigma_gauss(eps_a)
    labs = LAB[reg["lab"]]
    tot = np.zeros((K, 384))
    for idx in reg["sites"]:
        S = np.zeros((K, 384))
        np.add.at(S, Y[idx], X[idx])
        tot += S + rng.normal(0, sa, S.shape)
    Wtot = sum(reg["w"])
    if lam_rule is not None:
        lam = lam_rule(sa, reg)
    proto = tot / Wtot + (lam / Wtot) * labs
    proto /= np.linalg.norm(proto, axis=1, keepdims=True)
    return 10 * proto, np.zeros(K)


def dpsgd(reg, eps, seed, *, q0=0.25, bmin=None, lr=8.0, R=20, rho_ref=None, init=None, eps_a=None,
          c_clip=1.0):
    """M2 (init None: zero-shot head) or M3 (init = M1 head, eps_a charged; R counts the M1 round)."""
    rng = np.random.default_rng(seed)
    labs = LAB[reg["lab"]]
    if init is None:
        W, b = 10 * labs.copy(), np.zeros(K)
        rounds = R
    else:
        W, b = init(rng)
        rounds = R - 1
    hist = [evaluate(W, b)] if init is None else [evaluate(W, b)]
    wsum = sum(reg["w"])
    plan = []
    for n, w in zip(reg["n"], reg["w"]):
        q = min(1.0, max(q0, (bmin or 0) / w))
        T = int(math.floor(1 / q))
        B = q * w
        sig = sigma_sgd(eps, q, T * rounds, eps_a)
        rho = sig / B
        lr_i = lr * min(1.0, rho_ref / rho) if rho_ref else lr
        bound_n = lr_i * (T * c_clip * n / B + sig * c_clip / B * (math.sqrt(T * D) + 6))
        plan.append(dict(q=q, T=T, B=B, sig=sig, lr=lr_i, bound=bound_n, rho=rho))
    max_ratio, max_norm = 0.0, 0.0
    for _ in range(rounds):
        newW, newb = np.zeros_like(W), np.zeros_like(b)
        for idx, w, p in zip(reg["sites"], reg["w"], plan):
            Wl, bl = W.copy(), b.copy()
            Xs, Ys = X[idx], Y[idx]
            for _t in range(p["T"]):
                m = rng.random(len(idx)) < p["q"]
                xb, yb = Xs[m], Ys[m]
                gW, gb = np.zeros_like(Wl), np.zeros_like(bl)
                if len(yb):
                    z = xb @ Wl.T + bl
                    z -= z.max(1, keepdims=True)
                    P = np.exp(z)
                    P /= P.sum(1, keepdims=True)
                    P[np.arange(len(yb)), yb] -= 1
                    norms = np.linalg.norm(P, axis=1) * np.sqrt((xb**2).sum(1) + 1)
                    P *= np.minimum(1.0, c_clip / np.maximum(norms, 1e-12))[:, None]
                    gW, gb = P.T @ xb, P.sum(0)
                gW = gW + rng.normal(0, p["sig"] * c_clip, gW.shape)
                gb = gb + rng.normal(0, p["sig"] * c_clip, gb.shape)
                Wl -= p["lr"] * gW / p["B"]
                bl -= p["lr"] * gb / p["B"]
            upd = math.sqrt(((Wl - W) ** 2).sum() + ((bl - b) ** 2).sum())
            max_norm = max(max_norm, upd)
            max_ratio = max(max_ratio, upd / p["bound"])
            newW += w * Wl
            newb += w * bl
        W, b = newW / wsum, newb / wsum
        hist.append(evaluate(W, b))
    f1s = [h[0] for h in hist]
    return dict(final=f1s[-1], last3=float(np.mean(f1s[-3:])), acc=hist[-1][1], max_upd=max_norm,
                max_ratio=max_ratio, lr=[round(p["lr"], 3) for p in plan], sig=[round(p["sig"], 3) for p in plan],
                T=[p["T"] for p in plan], curve=[round(f, 4) for f in f1s])


REGS = regimes() if (HERE / "features.pt").exists() else {}
OUT = HERE / "results.jsonl"


def emit(rec):
    with OUT.open("a") as fh:
        fh.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    stage = sys.argv[1]
    regs = sys.argv[2].split(",") if len(sys.argv) > 2 else list(REGS)
    t0 = time.time()
    if stage == "info":
        for k, r in REGS.items():
            print(k, r["n"], r["w"], [np.bincount(Y[s], minlength=K).tolist() for s in r["sites"]][:3])
    if stage == "ref":
        for k in regs:
            r = REGS[k]
            allidx = np.concatenate(r["sites"])
            zs = evaluate(10 * LAB[r["lab"]], np.zeros(K))
            cen = {C: probe(allidx, C) for C in (1.0, 10.0, 100.0)}
            alone = [probe(s) for s in r["sites"]]
            emit(dict(stage="ref", reg=k, zeroshot=zs, central={str(c): v for c, v in cen.items()},
                      alone_mean=float(np.mean([a[0] for a in alone])), alone_max=float(max(a[0] for a in alone))))
    if stage == "m1":
        for k in regs:
            r = REGS[k]
            for eps in (1, 4, 8):
                for lam in (0, 1, 3, 5, 10, 30, 100):
                    f = [evaluate(*m1_head(r, eps, lam, np.random.default_rng(s)))[0] for s in range(3)]
                    emit(dict(stage="m1", reg=k, eps=eps, lam=lam, sigA=sigma_gauss(eps), f1=float(np.mean(f)),
                              f1min=float(min(f))))
                for kk in (1, 3, 10, 30):
                    rule = lambda sa, reg, kk=kk: kk * sa * math.sqrt(len(reg["w"]))
                    f = [evaluate(*m1_head(r, eps, 0, np.random.default_rng(s), rule))[0] for s in range(3)]
                    emit(dict(stage="m1", reg=k, eps=eps, lamk=kk, sigA=sigma_gauss(eps), f1=float(np.mean(f)),
                              f1min=float(min(f))))
    if stage == "m2":
        grid = json.loads(sys.argv[3])
        for k in regs:
            for eps in (1, 4, 8):
                for cfg in grid:
                    runs = [dpsgd(REGS[k], eps, s, **cfg) for s in range(3)]
                    emit(dict(stage="m2", reg=k, eps=eps, cfg=cfg, final=float(np.mean([x["final"] for x in runs])),
                              finalmin=float(min(x["final"] for x in runs)),
                              last3=float(np.mean([x["last3"] for x in runs])),
                              max_upd=max(x["max_upd"] for x in runs), max_ratio=max(x["max_ratio"] for x in runs),
                              lr=runs[0]["lr"], sig=runs[0]["sig"], T=runs[0]["T"], curve=runs[0]["curve"]))
                    print(k, eps, cfg, round(time.time() - t0), flush=True)
    if stage == "m3":
        grid = json.loads(sys.argv[3])  # cfg with keys f, lam (or lamk), + dpsgd kwargs
        for k in regs:
            r = REGS[k]
            for eps in (1, 4, 8):
                for cfg in grid:
                    cfg = dict(cfg)
                    f = cfg.pop("f")
                    lam = cfg.pop("lam", 0)
                    lamk = cfg.pop("lamk", None)
                    rule = (lambda sa, reg, kk=lamk: kk * sa * math.sqrt(len(reg["w"]))) if lamk is not None else None
                    runs = [dpsgd(r, eps, s, init=lambda rng: m1_head(r, f * eps, lam, rng, rule), eps_a=f * eps, **cfg)
                            for s in range(3)]
                    emit(dict(stage="m3", reg=k, eps=eps, f=f, lam=lam, lamk=lamk, cfg=cfg,
                              final=float(np.mean([x["final"] for x in runs])),
                              finalmin=float(min(x["final"] for x in runs)),
                              r1=float(np.mean([x["curve"][0] for x in runs])),
                              last3=float(np.mean([x["last3"] for x in runs])),
                              max_upd=max(x["max_upd"] for x in runs), max_ratio=max(x["max_ratio"] for x in runs),
                              lr=runs[0]["lr"], sig=runs[0]["sig"], T=runs[0]["T"], curve=runs[0]["curve"]))
                    print(k, eps, f, lam, lamk, cfg, round(time.time() - t0), flush=True)
    print("done", round(time.time() - t0))
