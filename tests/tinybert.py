"""The tests' tiny random BERT (benchmarks/tiny_backbone.py) and a toy label space over its vocabulary."""

from __future__ import annotations

from benchmarks.tiny_backbone import WORDS, make_tiny_backbone

__all__ = ["TOY_KEYWORDS", "TOY_LABELS", "TOY_NEUTRAL", "WORDS", "make_tiny_backbone"]

# A three-class toy label space over words the tiny vocabulary holds whole: each class's keywords,
# and words that say nothing about the class (tests/test_audit.py, tests/test_personalize.py).
TOY_LABELS = ["tumour", "digestive", "neuro"]
TOY_KEYWORDS = [
    ["tumor", "cancer", "mass", "carcinoma", "neoplasm"],
    ["stomach", "liver", "bowel", "gastric", "colon"],
    ["brain", "seizure", "stroke", "nerve", "neurologic"],
]
TOY_NEUTRAL = ["the", "patient", "pain", "fever", "history", "exam", "normal", "denies", "reports"]
