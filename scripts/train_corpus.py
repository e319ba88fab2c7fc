"""The larger training corpus of `train_demo.py --corpus pydoc`: Python's own documentation topics
(`pydoc_data.topics`, shipped with Python), a seeded split of whole topics into training and held-out
text, and calibration text drawn from the training split."""

from __future__ import annotations

import random
from pathlib import Path

PYDOC_CORPUS = "pydoc"  # --corpus value: Python's own documentation topics


def load_topics(corpus: str) -> list[str]:
    """Top-level documents of a corpus: pydoc topics, or the whole file as one."""
    if corpus == PYDOC_CORPUS:
        from pydoc_data.topics import topics

        return [topics[k].strip("\n") for k in sorted(topics)]
    return [Path(corpus).read_text(encoding="utf-8")]


def split_heldout(topics: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded split of whole topics into (train, held-out); fraction 0 keeps all."""
    if fraction <= 0:
        return topics, []
    order = list(range(len(topics)))
    random.Random(seed).shuffle(order)
    n_held = max(1, round(len(topics) * fraction))
    held = set(order[:n_held])
    train = [t for i, t in enumerate(topics) if i not in held]
    return train, [topics[i] for i in sorted(held)]


def calibration_text(docs: list[str], chars: int, seed: int) -> str:
    """Seeded sample of training documents, joined by blank lines, about ``chars`` long."""
    order = list(range(len(docs)))
    random.Random(seed + 1).shuffle(order)
    picked: list[str] = []
    total = 0
    for i in order:
        if total >= chars:
            break
        picked.append(docs[i])
        total += len(docs[i]) + 2
    return "\n\n".join(picked) + "\n"
