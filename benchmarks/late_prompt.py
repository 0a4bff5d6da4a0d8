"""What a trained prompt costs per DP step, by where it enters (PromptConfig.prompt_layer), on the
default backbone, CPU: the head alone on cached features (today's private recipe), the head on
features computed in the step (what caching saves), a late prompt + head on cached layer-k states
(k = 3 and 5 of 6: layers k..5 run forward and backward per step), and today's input-layer prompt +
head on token ids (all six layers). Same fixed batches of real abstracts for every mode, timed in
interleaved cycles, one run; and the layer cache's memory per record (float32 and bf16).

Each step is the trainer's DP step (client/trainer.py `_train_private`): forward, loss, backward,
`check_per_sample_shapes`, `dp_opt.step()` (clip, noise, SGD), `zero_grad`.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import TensorDataset

from .common import Context, describe, load_corpus, md_table, sample_rows

TARGET_RATIO = 3.0  # issue 21: a late prompt's DP step <= 3 x the head-only DP step
LATE_LAYERS = (3, 5)


def _modes() -> tuple[str, ...]:
    return ("head", "head_uncached", *(f"late{k}" for k in LATE_LAYERS), "input")


LABEL = {
    "head": "head only, cached features",
    "head_uncached": "head only, features computed in the step",
    **{f"late{k}": f"late prompt before layer {k} + head, cached layer-{k} states" for k in LATE_LAYERS},
    "input": "input-layer prompt + head, token ids",
}


class _FeaturesInStep(torch.nn.Module):
    """The head on features the frozen encoder computes inside the step (no cache)."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            features = self.model.features(input_ids, attention_mask)
        return self.model.head(features)


def run(ctx: Context) -> dict:
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    from fedprompt.client.dp import check_per_sample_shapes, wrap_private
    from fedprompt.common.backbone import load_backbone
    from fedprompt.common.encoding import encode
    from fedprompt.common.features import extract_features, extract_layer_states, state_bytes
    from fedprompt.common.model import LayerStateClassifier, PromptConfig, build_model

    batch = int(ctx.knob("batch", 32, 8))
    max_length = int(ctx.knob("max_length", 256, 64))
    n_virtual = int(ctx.knob("n_virtual", 4, 4))
    n_batches = int(ctx.knob("n_batches", 2, 2))
    cycles = int(ctx.knob("pairs", 5, 2))
    warmup = int(ctx.knob("warmup", 1, 1))
    torch.manual_seed(ctx.seed)
    bb = load_backbone(ctx.backbone)
    layers = int(bb.model.config.num_hidden_layers)
    late = [k for k in LATE_LAYERS if k < layers] or [layers - 1]
    records, labels = load_corpus(ctx.data)
    rows = sample_rows(len(records), n_batches * batch, ctx.seed)[: n_batches * batch]
    enc = encode(bb.tokenizer, [records.texts[i] for i in rows], [records.labels[i] for i in rows], max_length)
    data = enc.dataset
    ctx.log(f"late_prompt: {len(rows)} abstracts, batch {batch}, max_length {max_length}, layers {late}")

    def config(k: int) -> PromptConfig:
        return PromptConfig(
            labels=labels,
            hidden_size=bb.hidden_size,
            backbone_fingerprint=bb.fingerprint,
            n_virtual_tokens=n_virtual,
            max_length=max_length,
            prompt_layer=k,
            normalize=True,
        )

    def split(ds) -> list[tuple[torch.Tensor, ...]]:
        return [tuple(t[i * batch : (i + 1) * batch] for t in ds.tensors) for i in range(n_batches)]

    steps: dict[str, tuple] = {}
    trainable: dict[str, int] = {}
    cache: dict[str, Any] = {}

    def dp_step(module, params, ds):
        opt = torch.optim.SGD(params, lr=0.1)
        gsm, dp_opt, _ = wrap_private(
            module, opt, ds, sample_rate=batch / len(ds), expected_batch=batch, noise_multiplier=1.0, max_grad_norm=1.0
        )
        loss_fn = torch.nn.CrossEntropyLoss()

        def step(b):
            *inputs, y = b
            loss = loss_fn(gsm(*inputs), y)
            loss.backward()
            check_per_sample_shapes(params, len(y))
            dp_opt.step()
            dp_opt.zero_grad(set_to_none=True)
            loss.item()

        return step

    head_model = build_model(bb, config(0)).train()
    t0 = time.perf_counter()
    features = extract_features(head_model, data)
    cache["features_seconds_per_record"] = (time.perf_counter() - t0) / len(rows)
    cache["features_bytes_per_record"] = features.tensors[0][0].numel() * 4
    steps["head"] = (dp_step(head_model.head, list(head_model.head.parameters()), features), split(features))
    trainable["head"] = sum(p.numel() for p in head_model.head.parameters())
    uncached = build_model(bb, config(0)).train()
    uncached.prompt.requires_grad_(False)
    steps["head_uncached"] = (
        dp_step(_FeaturesInStep(uncached), list(uncached.head.parameters()), data),
        split(data),
    )
    trainable["head_uncached"] = trainable["head"]
    for k in late:
        model = build_model(bb, config(k)).train()
        t0 = time.perf_counter()
        states = extract_layer_states(model, data)
        seconds = (time.perf_counter() - t0) / len(rows)
        half = TensorDataset(states.tensors[0].to(torch.bfloat16), *states.tensors[1:])  # what bf16 storage holds
        tokens = states.tensors[0].shape[1]
        cache[f"layer{k}"] = {
            "build_seconds_per_record": seconds,
            "stored_tokens_per_record": tokens,  # the corpus sample's longest record
            "bytes_per_record_fp32": state_bytes(states) / len(rows),
            "bytes_per_record_bf16": state_bytes(half) / len(rows),
            "bytes_per_record_fp32_at_max_length": max_length * bb.hidden_size * 4,
            "bytes_per_record_bf16_at_max_length": max_length * bb.hidden_size * 2,
        }
        params = list(model.trainable_parameters().values())
        steps[f"late{k}"] = (dp_step(LayerStateClassifier(model), params, states), split(states))
        trainable[f"late{k}"] = sum(p.numel() for p in params)
    model0 = build_model(bb, config(0)).train()
    params0 = list(model0.trainable_parameters().values())
    steps["input"] = (dp_step(model0, params0, data), split(data))
    trainable["input"] = sum(p.numel() for p in params0)
    modes = [m for m in _modes() if m in steps]

    def timed(mode: str, i: int) -> tuple[float, float]:
        """(wall, CPU) seconds: on a shared host the process' CPU time is the steadier of the two."""
        fn, batches = steps[mode]
        w0, c0 = time.perf_counter(), time.process_time()
        fn(batches[i % len(batches)])
        return time.perf_counter() - w0, time.process_time() - c0

    for i in range(warmup):
        for mode in modes:
            timed(mode, i)
    wall: dict[str, list[float]] = {m: [] for m in modes}
    cpu: dict[str, list[float]] = {m: [] for m in modes}
    for i in range(cycles):
        for mode in modes if i % 2 == 0 else modes[::-1]:  # counterbalanced order
            w, c = timed(mode, i)
            wall[mode].append(w)
            cpu[mode].append(c)
        ctx.log(f"late_prompt: cycle {i + 1}/{cycles}")

    def ratios(times: dict[str, list[float]], base: str) -> dict[str, float]:
        """Per-cycle ratio to `base`, median over cycles."""
        return {
            m: describe([x / b for x, b in zip(times[m], times[base], strict=True)])["median"]
            for m in modes
            if m != base
        }

    ratio = ratios(wall, "head")
    worst_late = max(ratio[f"late{k}"] for k in late)
    return {
        "config": {
            "backbone": str(bb.path),
            "layers": layers,
            "batch": batch,
            "max_length": max_length,
            "mean_real_tokens": float(data.tensors[1].sum(1).float().mean()),
            "n_virtual_tokens": n_virtual,
            "fixed_batches": n_batches,
            "cycles": cycles,
            "torch_threads": torch.get_num_threads(),
            "trainable_params": trainable,
            "optimizer": "sgd lr 0.1, sigma 1.0, C 1.0",
        },
        "step_seconds": {m: describe(wall[m]) for m in modes},
        "step_cpu_seconds": {m: describe(cpu[m]) for m in modes},
        "ratio_over_head_cached": ratio,
        "ratio_over_head_cached_cpu_time": ratios(cpu, "head"),
        "ratio_over_head_uncached": ratios(wall, "head_uncached"),
        "ratio_over_input": ratios(wall, "input"),
        "cache": cache,
        "target": {"late_over_head_max": TARGET_RATIO, "met": worst_late <= TARGET_RATIO},
        "raw_wall_seconds": wall,
        "raw_cpu_seconds": cpu,
    }


def markdown(r: dict) -> str:
    c = r["config"]
    rows = []
    for m, s in r["step_seconds"].items():
        rows.append(
            [
                LABEL.get(m, m),
                c["trainable_params"][m],
                s["median"],
                r["step_cpu_seconds"][m]["median"],
                r["ratio_over_head_cached"].get(m, 1.0),
                r["ratio_over_head_uncached"].get(m, 1.0),
                r["ratio_over_input"].get(m, 1.0),
            ]
        )
    lines = [
        "## Late prompt: DP step cost by where the prompt enters",
        "",
        f"Backbone {c['backbone']} ({c['layers']} layers), batch {c['batch']}, max_length {c['max_length']} "
        f"(mean real tokens {c['mean_real_tokens']:.0f}), {c['n_virtual_tokens']} virtual tokens, "
        f"{c['cycles']} interleaved cycles, {c['torch_threads']} torch threads, CPU.",
        "",
        md_table(
            ["mode", "trainable values", "wall s/step", "CPU s/step", "x head cached", "x head uncached", "x input"],
            rows,
        ),
        "",
    ]
    cache_rows = [
        [
            k,
            v["stored_tokens_per_record"],
            v["bytes_per_record_fp32"],
            v["bytes_per_record_bf16"],
            v["bytes_per_record_fp32_at_max_length"],
            v["build_seconds_per_record"],
        ]
        for k, v in r["cache"].items()
        if isinstance(v, dict)
    ]
    lines += [
        md_table(
            [
                "cache",
                "tokens stored",
                "bytes/record fp32",
                "bytes/record bf16",
                "fp32 at max_length",
                "s/record build",
            ],
            cache_rows,
        ),
        "",
        f"Cached features: {r['cache']['features_bytes_per_record']} bytes/record. Target late <= "
        f"{r['target']['late_over_head_max']}x head: {'met' if r['target']['met'] else 'missed'}.",
    ]
    return "\n".join(lines)


def plot(r: dict, out: Path) -> list[str]:
    return []
