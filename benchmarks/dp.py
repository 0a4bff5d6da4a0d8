"""DP cost on the default backbone: per-step time of the project's DP-SGD step against a non-DP
step (same model, same fixed batches, interleaved), throughput against full fine-tuning, and
peak memory per mode (one subprocess per mode).

What is timed is the trainer's own step (client/trainer.py `_train_private`): `wrap_private`
(GradSampleModule + DPOptimizer), forward, loss, backward, `check_per_sample_shapes`,
`dp_opt.step()` (clip, noise, Adam), `zero_grad`, `loss.item()`. Poisson sampling is left out:
both sides get the same fixed batches of real abstracts, so they do the same work per step.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from .common import Context, describe, load_corpus, md_table, sample_rows

MODES = ("dp", "nondp", "fullft")
LABEL = {"dp": "prompt, DP-SGD", "nondp": "prompt, non-DP", "fullft": "full fine-tuning, non-DP"}
TARGET_RATIO = 1.10
FULLFT_LR = 2e-5


def _quiet() -> None:
    # The prompt's input (frozen embeddings) needs no grad: torch notes that the full backward
    # hook fires on outputs only, which is what the prompt's grad sampler reads (as in the trainer).
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


class FullFineTune(nn.Module):
    """Baseline: the same encoder with every weight trainable, mean pooling, a linear head.

    No prompt (a fine-tuned model needs none), so its sequences are n_virtual tokens shorter;
    dropout on (train mode), as an ordinary fine-tuning run has it.
    """

    def __init__(self, encoder: nn.Module, hidden: int, num_labels: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.encoder.requires_grad_(True)
        self.head = nn.Linear(hidden, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        longest = max(int(attention_mask.sum(dim=1).max().item()), 1)  # cut padding, as PromptClassifier
        input_ids, attention_mask = input_ids[:, :longest], attention_mask[:, :longest]
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1).clamp(min=1.0))


class Bench:
    """The three training steps over one backbone and one list of fixed batches."""

    def __init__(
        self,
        *,
        backbone: str | None,
        data: Path,
        batch: int,
        max_length: int,
        n_virtual: int,
        n_batches: int,
        seed: int,
        modes=MODES,
        copy_encoder_for_ft: bool = True,
    ):
        _quiet()
        from fedprompt.client.dp import check_per_sample_shapes, wrap_private
        from fedprompt.client.trainer import TrainSettings
        from fedprompt.common.backbone import load_backbone
        from fedprompt.common.encoding import encode
        from fedprompt.common.model import PromptConfig, build_model, initial_state

        torch.manual_seed(seed)
        self.backbone = bb = load_backbone(backbone)
        records, labels = load_corpus(data)
        rows = sample_rows(len(records), n_batches * batch, seed)
        n_batches = max(1, len(rows) // batch)
        rows = rows[: n_batches * batch]
        enc = encode(bb.tokenizer, [records.texts[i] for i in rows], [records.labels[i] for i in rows], max_length)
        self.dataset = enc.dataset
        self.truncated = enc.truncated
        ids, mask, ys = enc.dataset.tensors
        self.batches = [
            (ids[i * batch : (i + 1) * batch], mask[i * batch : (i + 1) * batch], ys[i * batch : (i + 1) * batch])
            for i in range(n_batches)
        ]
        real = mask.sum(1).float()
        self.tokens = {
            "max_length": max_length,
            "mean_real_tokens": float(real.mean()),
            "share_at_max_length": float((real == max_length).float().mean()),
            "batch_seq_len_prompt_models": [int(m.sum(1).max()) + n_virtual for _, m, _ in self.batches],
        }
        self.settings = settings = TrainSettings()  # the trainer's defaults: Adam, lr 0.01, sigma 1.0, C 1.0
        self.config = PromptConfig(
            labels=labels,
            hidden_size=bb.hidden_size,
            backbone_fingerprint=bb.fingerprint,
            n_virtual_tokens=n_virtual,
            pooling="mean",
            max_length=max_length,
        )
        state0 = initial_state(bb, self.config)
        loss_fn = torch.nn.CrossEntropyLoss()
        self.steps = {}
        self.params = {}
        clock = time.perf_counter

        if "dp" in modes:
            assert settings.noise_multiplier is not None  # the trainer's default sigma
            model = build_model(bb, self.config, state0).train()
            params = list(model.trainable_parameters().values())
            opt = torch.optim.Adam(params, lr=settings.lr)
            gsm, dp_opt, _loader = wrap_private(
                model,
                opt,
                self.dataset,
                sample_rate=batch / len(self.dataset),
                noise_multiplier=settings.noise_multiplier,
                max_grad_norm=settings.max_grad_norm,
            )
            self.gsm, self.dp_opt = gsm, dp_opt

            def dp_step(b):
                x, m, y = b
                t0 = clock()
                loss = loss_fn(gsm(x, m), y)
                t1 = clock()
                loss.backward()
                t2 = clock()
                check_per_sample_shapes(params, len(y))
                t3 = clock()
                dp_opt.step()
                t4 = clock()
                dp_opt.zero_grad(set_to_none=True)
                loss.item()
                t5 = clock()
                return {
                    "forward": t1 - t0,
                    "backward": t2 - t1,
                    "check": t3 - t2,
                    "optimizer": t4 - t3,
                    "rest": t5 - t4,
                }

            self.steps["dp"] = dp_step
            self.params["dp"] = sum(p.numel() for p in params)

        if "nondp" in modes:
            model_np = build_model(bb, self.config, state0).train()  # shares the frozen encoder
            params_np = list(model_np.trainable_parameters().values())
            opt_np = torch.optim.Adam(params_np, lr=settings.lr)

            self.steps["nondp"] = _plain_step(model_np, opt_np, loss_fn, clock)
            self.params["nondp"] = sum(p.numel() for p in params_np)

        if "fullft" in modes:
            encoder = copy.deepcopy(bb.model) if copy_encoder_for_ft else bb.model
            ft = FullFineTune(encoder, bb.hidden_size, len(labels)).train()
            ft_params = [p for p in ft.parameters() if p.requires_grad]
            opt_ft = torch.optim.AdamW(ft_params, lr=FULLFT_LR)

            self.steps["fullft"] = _plain_step(ft, opt_ft, loss_fn, clock)
            self.params["fullft"] = sum(p.numel() for p in ft_params)

    def timed(self, mode: str, i: int) -> dict:
        c0, w0 = time.process_time(), time.perf_counter()
        phases = self.steps[mode](self.batches[i % len(self.batches)])
        w1, c1 = time.perf_counter(), time.process_time()
        return {"wall": w1 - w0, "cpu": c1 - c0, **phases}


# --- peak memory, one subprocess per mode ----------------------------------------------------------
def _rss_now_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _hwm_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    try:  # Linux >= 4.0: "5" resets the peak-RSS high-water mark of this process
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def memory_probe(spec: dict) -> dict:
    """Run in a fresh process: build only `mode`'s model, then measure RSS around `steps` steps.

    Peaks come from the kernel's per-address-space high-water mark (VmHWM), reset after setup.
    getrusage's ru_maxrss is kept for reference only: Linux carries the forking parent's peak
    into the child across fork + exec, so in a probe started by a large parent it reports the
    parent's peak, not the probe's.
    """
    mode = spec["mode"]
    bench = Bench(
        backbone=spec["backbone"],
        data=Path(spec["data"]),
        batch=spec["batch"],
        max_length=spec["max_length"],
        n_virtual=spec["n_virtual"],
        n_batches=spec["steps"],
        seed=spec["seed"],
        modes=(mode,),
        copy_encoder_for_ft=False,
    )
    gc.collect()
    setup_peak = _hwm_mb()
    rss_before = _rss_now_mb()
    reset = _reset_hwm()
    for i in range(spec["steps"]):
        bench.timed(mode, i)
    train_peak = _hwm_mb() if reset else None
    if train_peak is None:  # no VmHWM reset (not Linux >= 4.0): fall back to the whole-process peak
        train_peak = _hwm_mb() or _maxrss_mb()
    return {
        "mode": mode,
        "steps": spec["steps"],
        "setup_peak_mb": setup_peak,  # loading backbone, fingerprint, tokenizing, building the model
        "rss_after_setup_mb": rss_before,
        "train_peak_rss_mb": train_peak,  # peak while the training steps ran
        "peak_rss_mb": max(x for x in (setup_peak, train_peak) if x is not None),
        # what training adds at its peak over the settled post-setup RSS
        "train_peak_over_setup_mb": max(0.0, train_peak - rss_before),
        "hwm_reset": reset,
        "ru_maxrss_mb_inherited": _maxrss_mb(),
    }


def _memory(ctx: Context, common: dict, steps: int) -> dict:
    """One fresh process per mode (RSS is per process); run side by side: memory, not time."""
    procs = {}
    for mode in MODES:
        spec = {**common, "mode": mode, "steps": steps}
        procs[mode] = subprocess.Popen(
            [sys.executable, "-m", "benchmarks", "_memprobe", json.dumps(spec)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=str(Path(__file__).resolve().parents[1]),
        )
    out = {}
    for mode, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"memory probe {mode} failed:\n{stderr[-3000:]}")
        out[mode] = json.loads(stdout.strip().splitlines()[-1])
        ctx.log(
            f"dp: memory {mode}: peak {out[mode]['peak_rss_mb']:.0f} MB, training "
            f"+{out[mode]['train_peak_over_setup_mb']:.0f} MB"
        )
    return out


# --- optimizer-step breakdown ------------------------------------------------------------------------
def _optimizer_breakdown(bench: Bench, steps: int) -> dict:
    """Time DPOptimizer's phases (clip, noise, scale, Adam) by wrapping them on the instance."""
    opt = bench.dp_opt
    acc: dict[str, list[float]] = {}

    def wrap(obj, name, key):
        fn = getattr(obj, name)

        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                acc.setdefault(key, []).append(time.perf_counter() - t)

        setattr(obj, name, timed)
        return lambda: delattr(obj, name)

    undo = [
        wrap(opt, "clip_and_accumulate", "clip_and_accumulate"),
        wrap(opt, "add_noise", "add_noise"),
        wrap(opt, "scale_grad", "scale_grad"),
        wrap(opt.original_optimizer, "step", "adam_step"),
    ]
    try:
        for i in range(steps):
            bench.timed("dp", i)
    finally:
        for u in undo:
            u()
    return {k: describe(v)["median"] for k, v in acc.items()}


def _torch_profile(bench: Bench, steps: int) -> dict:
    """Top CPU ops of DP vs non-DP steps (self time), to see where any DP extra goes."""
    from torch.profiler import ProfilerActivity, profile

    totals: dict[str, dict[str, list[float]]] = {"dp": {}, "nondp": {}}
    for i in range(steps):  # alternate, so that both sides see the same machine load
        for mode in ("dp", "nondp") if i % 2 == 0 else ("nondp", "dp"):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                bench.timed(mode, i)
            for e in prof.key_averages():
                t = totals[mode].setdefault(e.key, [0.0, 0.0])
                t[0] += e.self_cpu_time_total / 1000
                t[1] += e.count
    res = {}
    for mode, ops in totals.items():
        top = sorted(ops.items(), key=lambda kv: kv[1][0], reverse=True)[:12]
        res[mode] = [{"op": k, "self_ms_per_step": v[0] / steps, "calls_per_step": v[1] / steps} for k, v in top]
    return res


def run(ctx: Context) -> dict:
    pairs = int(ctx.knob("pairs", 30, 8))
    warmup = int(ctx.knob("warmup", 3, 2))
    batch = int(ctx.knob("batch", 16, 16))
    max_length = int(ctx.knob("max_length", 128, 128))
    n_virtual = int(ctx.knob("n_virtual", 20, 20))
    n_batches = int(ctx.knob("n_batches", 8, 4))
    mem_steps = int(ctx.knob("mem_steps", 4, 2))
    ctx.log(f"dp: loading backbone and {n_batches} fixed batches of {batch} (max_length {max_length})")
    bench = Bench(
        backbone=ctx.backbone,
        data=ctx.data,
        batch=batch,
        max_length=max_length,
        n_virtual=n_virtual,
        n_batches=n_batches,
        seed=ctx.seed,
    )

    ctx.log(f"dp: {warmup} warm-up cycles, then {pairs} interleaved cycles (dp, nondp, fullft)")
    for i in range(warmup):
        for mode in MODES:
            bench.timed(mode, i)
    samples: dict[str, list[dict]] = {m: [] for m in MODES}
    dp_first: list[bool] = []
    t_start = time.perf_counter()
    for i in range(pairs):
        # Interleaved and counterbalanced: the step right after full fine-tuning runs on a
        # memory/cache state that FT left behind, so DP and non-DP take turns going first.
        order = ("dp", "nondp", "fullft") if i % 2 == 0 else ("nondp", "dp", "fullft")
        dp_first.append(i % 2 == 0)
        for mode in order:
            samples[mode].append(bench.timed(mode, i))
        if (i + 1) % 5 == 0:
            ctx.log(f"dp: {i + 1}/{pairs} cycles")
    ctx.log(f"dp: timed cycles took {time.perf_counter() - t_start:.0f} s")

    wall = {m: [s["wall"] for s in samples[m]] for m in MODES}
    cpu = {m: [s["cpu"] for s in samples[m]] for m in MODES}
    ratio = [d / n for d, n in zip(wall["dp"], wall["nondp"], strict=True)]
    ratio_cpu = [d / n for d, n in zip(cpu["dp"], cpu["nondp"], strict=True)]
    by_order = {
        "dp_first": describe([x for x, f in zip(ratio, dp_first, strict=True) if f]),
        "nondp_first": describe([x for x, f in zip(ratio, dp_first, strict=True) if not f]),
    }
    # throughput ratio per cycle: (batch / t_dp) / (batch / t_ft) = t_ft / t_dp
    thr_dp_ft = [f / d for d, f in zip(wall["dp"], wall["fullft"], strict=True)]
    thr_np_ft = [f / n for n, f in zip(wall["nondp"], wall["fullft"], strict=True)]
    phases = {
        m: {
            k: describe([s[k] for s in samples[m]])["median"]
            for k in ("forward", "backward", "check", "optimizer", "rest")
        }
        for m in MODES
    }
    fb_extra = [
        (d["forward"] + d["backward"]) - (n["forward"] + n["backward"])
        for d, n in zip(samples["dp"], samples["nondp"], strict=True)
    ]
    opt_extra = [
        (d["check"] + d["optimizer"]) - (n["check"] + n["optimizer"])
        for d, n in zip(samples["dp"], samples["nondp"], strict=True)
    ]

    ctx.log("dp: optimizer-phase breakdown and torch profile")
    breakdown = _optimizer_breakdown(bench, int(ctx.knob("breakdown_steps", 10, 3)))
    profile_steps = int(ctx.knob("profile_steps", 4, 0))
    profile = _torch_profile(bench, profile_steps) if profile_steps else {}

    common = {
        "backbone": ctx.backbone,
        "data": str(ctx.data),
        "batch": batch,
        "max_length": max_length,
        "n_virtual": n_virtual,
        "seed": ctx.seed,
    }
    ctx.log("dp: peak memory, one subprocess per mode")
    memory = _memory(ctx, common, mem_steps)

    med_ratio = describe(ratio)
    return {
        "config": {
            "backbone": str(bench.backbone.path),
            "backbone_params": sum(p.numel() for p in bench.backbone.model.parameters()),
            "batch": batch,
            "max_length": max_length,
            "n_virtual_tokens": n_virtual,
            "pooling": "mean",
            "fixed_batches": len(bench.batches),
            "pairs": pairs,
            "warmup_cycles": warmup,
            "noise_multiplier": bench.settings.noise_multiplier,
            "max_grad_norm": bench.settings.max_grad_norm,
            "optimizer": f"{bench.settings.optimizer} lr {bench.settings.lr}",
            "fullft_optimizer": f"adamw lr {FULLFT_LR}",
            "trainable_params": bench.params,
            "torch_threads": torch.get_num_threads(),
            "tokens": bench.tokens,
            "truncated_texts": bench.truncated,
            "order": "interleaved, counterbalanced: even cycles dp, nondp, fullft; odd cycles nondp, dp, fullft",
        },
        "step_seconds": {m: describe(wall[m]) for m in MODES},
        "step_cpu_seconds": {m: describe(cpu[m]) for m in MODES},
        "throughput_examples_per_s": {m: batch / describe(wall[m])["median"] for m in MODES},
        "ratio_dp_over_nondp": med_ratio,
        "ratio_dp_over_nondp_cpu_time": describe(ratio_cpu),
        "ratio_dp_over_nondp_by_order": by_order,
        "throughput_ratio_dp_over_fullft": describe(thr_dp_ft),
        "throughput_ratio_nondp_over_fullft": describe(thr_np_ft),
        "phases_median_seconds": phases,
        "dp_extra_seconds": {
            "forward_backward_hooks": describe(fb_extra)["median"],
            "check_and_optimizer": describe(opt_extra)["median"],
        },
        "dp_optimizer_breakdown_seconds": breakdown,
        "torch_profile_top_ops": profile,
        "memory": memory,
        "target": {"dp_over_nondp_max": TARGET_RATIO, "met": med_ratio["median"] <= TARGET_RATIO},
        "raw_wall_seconds": wall,
        "raw_cpu_seconds": cpu,
        "raw_dp_first": dp_first,
    }


def markdown(r: dict) -> str:
    c = r["config"]
    rows = []
    for m in MODES:
        s, mem = r["step_seconds"][m], r["memory"][m]
        rows.append(
            [
                LABEL[m],
                f"{c['trainable_params'][m]:,}",
                s["median"],
                f"{s['q1']:.3f}-{s['q3']:.3f}",
                r["throughput_examples_per_s"][m],
                mem.get("train_peak_rss_mb", float("nan")),
                mem["train_peak_over_setup_mb"],
                mem.get("setup_peak_mb", float("nan")),
            ]
        )
    t1 = md_table(
        [
            "mode",
            "trainable params",
            "step s (median)",
            "step s (IQR)",
            "examples/s",
            "peak RSS while training, MB",
            "training adds, MB",
            "setup peak, MB",
        ],
        rows,
    )
    rr, rc = r["ratio_dp_over_nondp"], r["ratio_dp_over_nondp_cpu_time"]
    tf, tn = r["throughput_ratio_dp_over_fullft"], r["throughput_ratio_nondp_over_fullft"]
    t2 = md_table(
        ["ratio (per cycle)", "median", "IQR (q1-q3)", "n"],
        [
            ["DP / non-DP step time (wall)", rr["median"], f"{rr['q1']:.3f}-{rr['q3']:.3f}", rr["n"]],
            ["DP / non-DP step time (process CPU time)", rc["median"], f"{rc['q1']:.3f}-{rc['q3']:.3f}", rc["n"]],
            *[
                [
                    f"DP / non-DP step time (wall), cycles with {k.replace('_', ' ')}",
                    v["median"],
                    f"{v['q1']:.3f}-{v['q3']:.3f}",
                    v["n"],
                ]
                for k, v in r.get("ratio_dp_over_nondp_by_order", {}).items()
            ],
            ["prompt-DP / full-FT throughput", tf["median"], f"{tf['q1']:.3f}-{tf['q3']:.3f}", tf["n"]],
            ["prompt-non-DP / full-FT throughput", tn["median"], f"{tn['q1']:.3f}-{tn['q3']:.3f}", tn["n"]],
        ],
    )
    ph = r["phases_median_seconds"]
    t3 = md_table(
        ["phase (median s)", *[LABEL[m] for m in MODES]],
        [[k, *[ph[m][k] for m in MODES]] for k in ("forward", "backward", "check", "optimizer", "rest")],
    )
    bd = r["dp_optimizer_breakdown_seconds"]
    t4 = md_table(["DPOptimizer phase", "median s"], [[k, v] for k, v in bd.items()])
    ex = r["dp_extra_seconds"]
    met = "MET" if r["target"]["met"] else "MISSED"
    tok = c["tokens"]
    return "\n\n".join(
        [
            f"Backbone `{Path(c['backbone']).name}` ({c['backbone_params']:,} params), batch {c['batch']}, max_length "
            f"{c['max_length']} (mean real tokens {tok['mean_real_tokens']:.1f}, {tok['share_at_max_length']:.0%} of "
            f"texts fill all {c['max_length']}), {c['n_virtual_tokens']} virtual tokens, mean pooling, sigma "
            f"{c['noise_multiplier']}, C {c['max_grad_norm']}, {c['pairs']} interleaved cycles after "
            f"{c['warmup_cycles']} warm-up cycles, {c['torch_threads']} torch threads.",
            t1,
            t2,
            f"Target DP/non-DP <= {r['target']['dp_over_nondp_max']}: **{met}** (median {rr['median']:.3f}, IQR "
            f"{rr['q1']:.3f}-{rr['q3']:.3f}).",
            "Where the DP step's time goes (median seconds per step):",
            t3,
            f"Paired DP extra: forward+backward (grad-sampler hooks) {ex['forward_backward_hooks'] * 1000:+.1f} ms, "
            f"check + optimizer (clip, noise) {ex['check_and_optimizer'] * 1000:+.1f} ms.",
            t4,
        ]
    )


def plot(r: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wall = r["raw_wall_seconds"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    axes[0].boxplot([wall[m] for m in MODES], tick_labels=[LABEL[m] for m in MODES])
    axes[0].set_ylabel("seconds per step")
    axes[0].set_title("step time, interleaved (median marked)")
    ratios = [[d / n for d, n in zip(wall["dp"], wall["nondp"], strict=True)]]
    names = ["wall time"]
    if "raw_cpu_seconds" in r:
        cpu = r["raw_cpu_seconds"]
        ratios.append([d / n for d, n in zip(cpu["dp"], cpu["nondp"], strict=True)])
        names.append("process CPU time")
    axes[1].boxplot(ratios, tick_labels=names)
    axes[1].axhline(r["target"]["dp_over_nondp_max"], color="red", linestyle="--", label="target 1.10")
    axes[1].axhline(1.0, color="grey", linewidth=0.8)
    axes[1].set_title("per-cycle DP / non-DP step-time ratio")
    axes[1].legend()
    fig.tight_layout()
    path = out / "dp_step_times.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path.name]


def _plain_step(model, optimizer, loss_fn, clock):
    """A timed ordinary (non-DP) training step, phase by phase like the DP step."""

    def step(b):
        x, m, y = b
        t0 = clock()
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x, m), y)
        t1 = clock()
        loss.backward()
        t2 = clock()
        optimizer.step()
        t4 = clock()
        loss.item()
        t5 = clock()
        return {"forward": t1 - t0, "backward": t2 - t1, "check": 0.0, "optimizer": t4 - t2, "rest": t5 - t4}

    return step
