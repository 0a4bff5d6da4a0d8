"""Bytes per hospital per round: raw trainable-tensor bytes against what Flower serializes.

The messages are built as the project builds them: the hospital's train reply exactly as
client/hospital.py `train_round` (state_to_arrays + whitelisted metrics + status), its evaluate
reply as `evaluate_round`, and the aggregator's instruction as Flower's FedAvg `configure_train`
does through server/strategy.py (arrays + the RoundPlan config record + round keys). Serialized
size = the sum of `deflate()` over each message's object tree (Message -> RecordDict -> records
-> arrays -> chunks), i.e. Flower's own wire objects, before gRPC framing and TLS.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path

from .common import Context, md_table

N_LABELS_DEFAULT = 5
N_VIRTUAL = 20
LORA_RANK = 8
UPLOAD_OVER_RAW_MAX = 1.1
BACKBONE_FRACTION_MAX = 1 / 1000


def wire_bytes(o) -> bytes:
    """Flower's serialized form of an inflatable object and everything below it."""
    return o.deflate() + b"".join(wire_bytes(c) for c in (o.children or {}).values())


def by_type(o, acc: dict | None = None) -> dict:
    """Serialized bytes per Flower object type in a message tree (where the overhead sits)."""
    acc = {} if acc is None else acc
    acc[type(o).__name__] = acc.get(type(o).__name__, 0) + len(o.deflate())
    for c in (o.children or {}).values():
        by_type(c, acc)
    return acc


def _metadata(message_type: str, *, reply: bool):
    from flwr.app import Metadata

    # Realistic field sizes: 64-bit ids as Flower assigns them, 64-hex message ids.
    return Metadata(
        run_id=secrets.randbits(63),
        message_id=secrets.token_hex(32),
        src_node_id=secrets.randbits(63),
        dst_node_id=secrets.randbits(63),
        reply_to_message_id=secrets.token_hex(32) if reply else "",
        group_id="1",
        created_at=time.time(),
        ttl=43200.0,
        message_type=message_type,
    )


def _sizes(content, message_type: str, *, reply: bool) -> dict:
    from flwr.app import Message

    # flwr's own constructor form for a received message (metadata=...), not in its public overloads
    msg = Message(content=content, metadata=_metadata(message_type, reply=reply))  # type: ignore[call-overload]
    return {"message": len(wire_bytes(msg)), "content": len(wire_bytes(content)), "by_object_type": by_type(msg)}


def _backbone_facts(backbone: str | None) -> dict:
    from fedprompt.common.backbone import default_backbone_dir, load_backbone

    directory = default_backbone_dir() if backbone is None else Path(backbone)
    bb = load_backbone(directory)
    files = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("*.bin"))
    cfg = bb.model.config
    return {
        "bb": bb,
        "path": str(directory),
        "weights_files": [f.name for f in files],
        "weights_bytes_on_disk": sum(f.stat().st_size for f in files),
        "param_bytes_float32": sum(p.numel() for p in bb.model.parameters()) * 4,
        "hidden": int(cfg.hidden_size),
        "layers": int(cfg.num_hidden_layers),
    }


def _label_names(data: Path) -> list[str]:
    names = Path(data).parent / "medical_tc_labels.csv"
    if names.is_file():
        from fedprompt.client.partition import read_label_names

        return list(read_label_names(names).values())
    return [f"class-{i}" for i in range(N_LABELS_DEFAULT)]


def run(ctx: Context) -> dict:
    from flwr.app import ConfigRecord, RecordDict

    from fedprompt.common.config import FederationConfig
    from fedprompt.common.plan import RoundPlan, initial_global_state_for, prompt_config
    from fedprompt.common.wire import (
        ARRAYS,
        CONFIG,
        Counts,
        EvaluateReply,
        LedgerChain,
        Status,
        TrainMetrics,
        TrainReply,
        payload_bytes,
        state_to_arrays,
    )

    facts = _backbone_facts(ctx.backbone)
    bb = facts.pop("bb")
    labels = _label_names(ctx.data)
    C, H = len(labels), facts["hidden"]
    n_virtual = int(ctx.knob("n_virtual", N_VIRTUAL, N_VIRTUAL))
    # the product's own model, round-0 state and plan for this federation (its defaults but n_virtual)
    fed = FederationConfig.model_validate(
        {"name": "benchmark", "labels": labels, "model": {"n_virtual_tokens": n_virtual}}
    )
    state = initial_global_state_for(fed, bb)
    raw = sum(t.numel() * t.element_size() for t in state.values())
    shapes = {k: list(t.shape) for k, t in state.items()}

    # --- the aggregator's train instruction (download) --------------------------------------------
    plan = RoundPlan.for_run(fed, prompt_config(fed, bb), round=1)
    config = ConfigRecord(dict(plan.to_config_record()))
    config["fp.round"] = 1  # ValidatedStrategy.configure_train
    config["server-round"] = 1  # FedAvg.configure_train
    down_train = RecordDict({ARRAYS: state_to_arrays(state), CONFIG: config})

    # --- the hospital's train reply (upload), as client/hospital.py train_round builds it ---------
    # (the declared weight, the privacy fields, a status record and the ledger chain of a 2-round
    # run's 2nd round: docs/deployment.md section 5)
    up_train = TrainReply(
        status=Status.ok("hospital-1"),
        metrics=TrainMetrics(num_examples=1.0, private=1, epsilon_spent=2.71828, epsilon_cap=8.0, delta=1e-5),
        ledger=LedgerChain(chain=["0" * 64, "f" * 64]),
    ).to_content(state_to_arrays(state))
    # --- evaluate round trip (evaluate_round's reply; Flower sends arrays + config again) ---------
    # The largest evaluate reply: a site that shares noised per-class counts (the default sends
    # the status record alone).
    down_eval = RecordDict({ARRAYS: state_to_arrays(state), CONFIG: config})
    counts = Counts(tp=[10.123456789] * C, fp=[3.123456789] * C, fn=[4.123456789] * C)
    up_eval = EvaluateReply(status=Status.ok("hospital-1"), metrics=counts).to_content()

    msgs = {
        "train_download": _sizes(down_train, "train", reply=False),
        "train_upload": _sizes(up_train, "train", reply=True),
        "evaluate_download": _sizes(down_eval, "evaluate", reply=False),
        "evaluate_upload": _sizes(up_eval, "evaluate", reply=True),
    }
    lora = facts["layers"] * 2 * LORA_RANK * (H + H) * 4  # q and v of every layer: A (r x H) + B (H x r)
    upload = msgs["train_upload"]["message"]
    backbone_bytes = facts["weights_bytes_on_disk"]
    per_round_up = msgs["train_upload"]["message"] + msgs["evaluate_upload"]["message"]
    per_round_down = msgs["train_download"]["message"] + msgs["evaluate_download"]["message"]
    return {
        "config": {
            "labels": C,
            "hidden": H,
            "n_virtual_tokens": n_virtual,
            "shapes": shapes,
            "lora_rank": LORA_RANK,
            "layers": facts["layers"],
        },
        "backbone": facts,
        "raw_trainable_bytes": raw,
        "messages": msgs,
        # numpy .npy framing Flower puts around each array's bytes (Array.data - raw tensor bytes)
        "npy_framing_bytes": payload_bytes(up_train.array_records[ARRAYS]) - raw,
        "per_round_per_hospital": {"upload_bytes": per_round_up, "download_bytes": per_round_down},
        "lora_r8_qv_bytes": lora,
        "lora_r8_qv_plus_head_bytes": lora + (C * H + C) * 4,
        "ratios": {
            "upload_over_raw": upload / raw,
            "upload_over_backbone": upload / backbone_bytes,
            "backbone_over_upload": backbone_bytes / upload,
            "lora_over_raw": lora / raw,
        },
        "targets": {
            "upload_over_raw_max": UPLOAD_OVER_RAW_MAX,
            "upload_over_raw_met": upload <= UPLOAD_OVER_RAW_MAX * raw,
            "upload_over_backbone_max": BACKBONE_FRACTION_MAX,
            "upload_over_backbone_met": upload <= BACKBONE_FRACTION_MAX * backbone_bytes,
        },
    }


def markdown(r: dict) -> str:
    c, m = r["config"], r["messages"]
    raw = r["raw_trainable_bytes"]
    s = c["shapes"]
    first = ["raw trainable tensors (" + " + ".join("x".join(map(str, v)) for v in s.values()) + ", float32)", raw, 1.0]
    rows = (
        [first]
        + [[f"{k.replace('_', ' ')}: Flower message", v["message"], v["message"] / raw] for k, v in m.items()]
        + [[f"{k.replace('_', ' ')}: RecordDict only", v["content"], v["content"] / raw] for k, v in m.items()]
    )
    rows += [
        [
            "per round per hospital, upload (train + evaluate replies)",
            r["per_round_per_hospital"]["upload_bytes"],
            r["per_round_per_hospital"]["upload_bytes"] / raw,
        ],
        [
            "per round per hospital, download (train + evaluate instructions)",
            r["per_round_per_hospital"]["download_bytes"],
            r["per_round_per_hospital"]["download_bytes"] / raw,
        ],
        [
            f"LoRA r={c['lora_rank']} on query+value, {c['layers']} layers (computed, float32)",
            r["lora_r8_qv_bytes"],
            r["lora_r8_qv_bytes"] / raw,
        ],
        [
            f"LoRA r={c['lora_rank']} q+v plus the same head",
            r["lora_r8_qv_plus_head_bytes"],
            r["lora_r8_qv_plus_head_bytes"] / raw,
        ],
        [
            f"backbone on disk ({', '.join(r['backbone']['weights_files'])})",
            r["backbone"]["weights_bytes_on_disk"],
            r["backbone"]["weights_bytes_on_disk"] / raw,
        ],
    ]
    t = md_table(["what", "bytes", "x raw"], rows)
    tg, ra = r["targets"], r["ratios"]
    bt = m["train_upload"]["by_object_type"]
    over = m["train_upload"]["message"] - raw
    return "\n\n".join(
        [
            t,
            f"Where the train upload's {over:,} bytes over raw go: .npy headers {r['npy_framing_bytes']:,} B inside "
            "the array chunks; "
            + ", ".join(f"{k} {v:,} B" for k, v in bt.items() if k != "ArrayChunk")
            + (
                f"; ArrayChunk objects {bt.get('ArrayChunk', 0):,} B in all (tensor bytes + .npy headers + chunk "
                "framing)."
            ),
            f"Target upload <= {tg['upload_over_raw_max']} x raw: "
            f"**{'MET' if tg['upload_over_raw_met'] else 'MISSED'}** ({ra['upload_over_raw']:.4f} x).",
            f"Target upload <= 1/1000 of the backbone: **{'MET' if tg['upload_over_backbone_met'] else 'MISSED'}** "
            f"(1/{ra['backbone_over_upload']:,.0f}: {m['train_upload']['message']:,} B against "
            f"{r['backbone']['weights_bytes_on_disk']:,} B).",
        ]
    )


def plot(r: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = r["messages"]
    items = [
        ("raw prompt+head", r["raw_trainable_bytes"]),
        ("train upload\n(Flower)", m["train_upload"]["message"]),
        ("train download\n(Flower)", m["train_download"]["message"]),
        ("eval upload\n(Flower)", m["evaluate_upload"]["message"]),
        (f"LoRA r{r['config']['lora_rank']} q,v", r["lora_r8_qv_bytes"]),
        ("backbone\non disk", r["backbone"]["weights_bytes_on_disk"]),
    ]
    fig, ax = plt.subplots(figsize=(9, 4.2))
    bars = ax.bar(
        [k for k, _ in items],
        [v for _, v in items],
        color=["#4c72b0", "#55a868", "#8172b2", "#64b5cd", "#ccb974", "#c44e52"],
    )
    ax.set_yscale("log")
    ax.set_ylabel("bytes (log scale)")
    ax.set_title("bytes per hospital per round vs backbone")
    for b, (_, v) in zip(bars, items, strict=True):
        ax.text(b.get_x() + b.get_width() / 2, v * 1.1, f"{v:,}", ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    path = out / "comm_bytes.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path.name]
