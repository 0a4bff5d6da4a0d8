"""A tiny randomly initialised BERT + WordPiece tokenizer, saved as a real HF directory: the backbone
of the scale benchmark's many hospitals, and of the tests (tests/tinybert.py)."""

from __future__ import annotations

import string
from pathlib import Path

import torch
from transformers import BertConfig, BertModel, BertTokenizer  # the fast one in transformers 5

WORDS = (
    "the patient pain chest abdominal headache fever tumor cancer mass heart blood pressure "
    "stomach liver bowel nerve brain seizure stroke denies reports history of with and no "
    "cardiac carcinoma neoplasm gastric colon neurologic infection inflammation normal exam"
).split()


def make_tiny_backbone(
    directory: Path,
    seed: int = 0,
    hidden: int = 32,
    layers: int = 2,
    words: list[str] | None = None,
    init_range: float = 0.02,
    max_positions: int = 256,
) -> Path:
    """`words` extends the vocabulary (e.g. with a corpus' frequent words) so that short
    max_length settings still cover whole sentences instead of single characters."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab = (
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + ["##" + c for c in chars] + WORDS + list(words or [])
    )
    vocab = list(dict.fromkeys(vocab))
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True).save_pretrained(directory)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=max_positions,
        initializer_range=init_range,
    )
    BertModel(config).save_pretrained(directory)
    return directory
