"""Per-round checkpoint of the global tensors, round number and metrics history.

`state.json` is the commit point: the tensors of round r are written first under their own
name, then state.json is atomically replaced to point at them. A crash at any moment leaves
the previous complete round loadable.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_tensors

from fedprompt.common.atomic import atomic_write
from fedprompt.common.errors import InputError

from .history import CHECKPOINT_FORMAT, CheckpointState, read_checkpoint_state


@dataclass
class Checkpoint:
    round: int
    state: dict[str, torch.Tensor]
    history: list[dict]
    backbone_fingerprint: str
    run: str


def save_checkpoint(directory: Path, ckpt: Checkpoint) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tensors = f"global-r{ckpt.round:04d}.safetensors"
    # validated before anything is written (the history's rounds are dicts: validated as RoundRecords)
    meta = CheckpointState.model_validate(
        dict(
            format=CHECKPOINT_FORMAT,
            run=ckpt.run,
            round=ckpt.round,
            tensors=tensors,
            backbone_fingerprint=ckpt.backbone_fingerprint,
            history=ckpt.history,
        )
    )
    atomic_write(directory / tensors, save_tensors({k: v.contiguous() for k, v in ckpt.state.items()}))
    atomic_write(directory / "state.json", (json.dumps(meta.model_dump(exclude_unset=True), indent=1) + "\n").encode())
    for old in directory.glob("global-r*.safetensors"):  # keep only the committed round
        if old.name != tensors:
            old.unlink(missing_ok=True)


def load_checkpoint(directory: Path) -> Checkpoint | None:
    path = directory / "state.json"
    if not path.exists():
        return None
    meta = read_checkpoint_state(path)
    try:
        state = load_file(str(directory / meta.tensors))
    except Exception as exc:  # missing, truncated or not safetensors: the checkpoint is unusable
        raise InputError.at(path, f"unreadable checkpoint: {type(exc).__name__}: {exc}") from None
    return Checkpoint(
        meta.round, state, [r.model_dump(exclude_unset=True) for r in meta.history], meta.backbone_fingerprint, meta.run
    )
